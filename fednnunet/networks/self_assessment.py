"""HSSF's self-assessment (confidence) head on any nnU-Net U-Net (Ma et al., TMI 2024; issue 13).

The head reads what the U-Net's last segmentation layer reads and writes: the highest-resolution decoder features F
and the logits z. Captured by a forward hook on ``decoder.seg_layers[-1]`` (present in every nnU-Net U-Net, plain
or residual, with or without deep supervision), so the U-Net itself is untouched: its checkpoint stays nnU-Net's
and loads in nnU-Net's predictor; the head is the method's own module, kept and saved beside it.

Layers, after the paper's public code (YxMa666/HSSF), with nnU-Net's conv/norm/nonlinearity of the network's
dimension in place of its 2d conv + BatchNorm + ReLU, and F's width in place of its 256 channels:

    c1 = CNA(cat[F, z]);            c1 = c1 + c1 * GAP(c1)
    c2 = c1 + CNA(cat[c1, F]);      c2 = c2 + c2 * GAP(c2)
    c3 = c2 + CNA(cat[c1, c2])
    a  = conv1x1(CNA(cat[c3, c2]))  -> one confidence logit per voxel (sigmoid: the probability the label is right)

(CNA: 3x3 conv, instance norm, LeakyReLU.) F and z are not detached, so the confidence loss trains the U-Net too,
as in the paper.
"""
from typing import Optional, Tuple

import torch
from torch import nn


class _CNA(nn.Sequential):
    def __init__(self, conv_op, norm_op, cin: int, cout: int):
        super().__init__(conv_op(cin, cout, 3, padding=1), norm_op(cout, affine=True), nn.LeakyReLU(inplace=True))


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


class SelfAssessmentHead(nn.Module):
    def __init__(self, feature_channels: int, num_classes: int, dim: int):
        super().__init__()
        conv_op = nn.Conv3d if dim == 3 else nn.Conv2d
        norm_op = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        c = feature_channels
        self.c1 = _CNA(conv_op, norm_op, c + num_classes, c)
        self.c2 = _CNA(conv_op, norm_op, 2 * c, c)
        self.c3 = _CNA(conv_op, norm_op, 2 * c, c)
        self.c4 = _CNA(conv_op, norm_op, 2 * c, c)
        self.out = conv_op(c, 1, 1)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(torch.cat([features, logits], 1))
        c1 = c1 + c1 * _gap(c1)
        c2 = c1 + self.c2(torch.cat([c1, features], 1))
        c2 = c2 + c2 * _gap(c2)
        c3 = c2 + self.c3(torch.cat([c1, c2], 1))
        return self.out(self.c4(torch.cat([c3, c2], 1)))


class SelfAssessment:
    """A :class:`SelfAssessmentHead` attached to a U-Net: after every forward of the network, :attr:`last` holds
    (F, z) of its highest-resolution output, and :meth:`confidence_logits` gives the head's output on them."""

    def __init__(self, network: nn.Module, num_classes: int):
        try:
            seg_layer = network.decoder.seg_layers[-1]
        except AttributeError:
            raise ValueError(f'{type(network).__name__} has no decoder.seg_layers: the self-assessment head attaches to '
                             f"nnU-Net's U-Nets") from None
        dim = 3 if isinstance(seg_layer, nn.Conv3d) else 2
        self.head = SelfAssessmentHead(seg_layer.in_channels, num_classes, dim)
        self.last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._hook = seg_layer.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self.last = (inputs[0], output)

    def confidence_logits(self) -> torch.Tensor:
        if self.last is None:
            raise RuntimeError('the network has not run since the head was attached')
        features, logits = self.last
        return self.head(features, logits)

    def detach(self):
        self._hook.remove()
