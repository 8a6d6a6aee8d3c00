"""FedMM's network on nnU-Net's U-Net (modality-heterogeneous multimodal segmentation, TMI 2025).

One encoder per modality (an nnU-Net encoder of the planned stages with one input channel), a fusion block per
resolution level that averages the features of the modalities present in each sample and mixes them (1x1, 3x3,
1x1 convolutions with nnU-Net's norm and non-linearity), nnU-Net's decoder (with deep supervision) on the fused
features, and one "separate" decoder, shared by the modalities, that segments from each present modality's own
features during training.

A modality is present in a sample when its input channel is not all zero: sites store a channel they do not have
as zeros (fednnunet.preprocessing.with_missing_channels), so the network reads the mask from its input and nnU-Net's
data loaders, augmentation and predictor need no extra argument. A sample in which every channel is zero (a patch of
padding) counts every modality as present. Keys: ``encoders.<m>.*`` belong to modality m (channel m of
dataset.json); ``fusion.*``, ``decoder.*`` and ``separate_decoder.*`` are everyone's.
"""
from typing import Dict, List

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn


def present_modalities(x: torch.Tensor) -> torch.Tensor:
    """(B, M) float mask: 1 where the sample's channel m holds any non-zero value; every modality of a sample whose
    channels are all zero."""
    present = x.detach().flatten(2).ne(0).any(2)
    present = present | ~present.any(1, keepdim=True)
    return present.to(x.dtype)


def masked_mean(features: List[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The mean of the modalities' features (each (B, C, ...)) over the modalities present in each sample."""
    stacked = torch.stack(features, 1)  # (B, M, C, ...)
    weights = mask.view(*mask.shape, *([1] * (stacked.dim() - 2)))
    return (stacked * weights).sum(1) / weights.sum(1).clamp_min(1)


class FusionBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions over the masked mean of one level's modality features."""

    def __init__(self, encoder, channels: int):
        super().__init__()
        conv, bias = encoder.conv_op, encoder.conv_bias

        def norm_and_nonlin():
            return ([encoder.norm_op(channels, **(encoder.norm_op_kwargs or {}))] if encoder.norm_op else []) + \
                ([encoder.nonlin(**(encoder.nonlin_kwargs or {}))] if encoder.nonlin else [])
        self.block = nn.Sequential(conv(channels, channels, 1, bias=bias), *norm_and_nonlin(),
                                   conv(channels, channels, 3, padding=1, bias=bias), *norm_and_nonlin(),
                                   conv(channels, channels, 1, bias=bias))

    def forward(self, features: List[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.block(masked_mean(features, mask))


class FedMMUNet(nn.Module):
    """``input_channels``: the dataset's modalities (one encoder each). ``wrapper``: no settings yet (kept for the
    plans' format, as the other method networks)."""

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str, wrapper: dict,
                 deep_supervision: bool = True, **base_kwargs):
        super().__init__()

        def planned():  # nnU-Net's own builder (class lookup, weight initialisation) for one modality's input
            return get_network_from_plans(base_network_class_name, base_kwargs, [], 1, num_classes, allow_init=True,
                                          deep_supervision=deep_supervision)
        networks = [planned() for _ in range(input_channels)]
        self.encoders = nn.ModuleList(n.encoder for n in networks)
        self.decoder = networks[0].decoder
        self.separate_decoder = planned().decoder
        for decoder in (self.decoder, self.separate_decoder):
            # nnU-Net's decoder keeps its encoder as a submodule (keys decoder.encoder.*); here it reads the skips it
            # is given and no encoder of its own
            del decoder._modules['encoder']
        reference = self.encoders[0]
        self.fusion = nn.ModuleList(FusionBlock(reference, c) for c in reference.output_channels)
        self.fusion.apply(InitWeights_He(1e-2))
        self.num_modalities = input_channels
        self.num_classes = num_classes
        self.conv_op = reference.conv_op
        self.keep_separate = False  # set by the trainer: a training forward keeps the separate outputs
        self._separate: Dict[int, tuple] = {}

    def encode(self, x: torch.Tensor):
        """Each modality's skips (one list per modality) and the presence mask."""
        mask = present_modalities(x)
        return [encoder(x[:, m:m + 1]) for m, encoder in enumerate(self.encoders)], mask

    def fuse(self, skips: List[List[torch.Tensor]], mask: torch.Tensor) -> List[torch.Tensor]:
        return [block([s[level] for s in skips], mask) for level, block in enumerate(self.fusion)]

    def separate_outputs(self, skips: List[List[torch.Tensor]], mask: torch.Tensor) -> Dict[int, tuple]:
        """{m: (the samples in which modality m is present, the separate decoder's output from their skips)}."""
        self.separate_decoder.deep_supervision = self.decoder.deep_supervision
        out = {}
        for m in range(self.num_modalities):
            samples = torch.nonzero(mask[:, m]).flatten()
            if len(samples):
                out[m] = (samples, self.separate_decoder([s[samples] for s in skips[m]]))
        return out

    def forward(self, x: torch.Tensor):
        skips, mask = self.encode(x)
        if self.training and self.keep_separate:  # for the trainer's loss (take_separate), training only
            self._separate = self.separate_outputs(skips, mask)
        return self.decoder(self.fuse(skips, mask))

    def take_separate(self) -> Dict[int, tuple]:
        """The separate decoder's outputs of the last training forward (once)."""
        out, self._separate = self._separate, {}
        return out

    def forward_with_separate(self, x: torch.Tensor):
        """(the fused output, separate_outputs, the (B, M) presence mask)."""
        skips, mask = self.encode(x)
        return self.decoder(self.fuse(skips, mask)), self.separate_outputs(skips, mask), mask


def modality_of_key(key: str):
    """The modality a key belongs to (``encoders.<m>.``), or None for the keys every site shares."""
    if key.startswith('encoders.'):
        return int(key.split('.')[1])
    return None
