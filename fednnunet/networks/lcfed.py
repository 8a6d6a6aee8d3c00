"""LC-Fed's network on nnU-Net's U-Net (Wang, Jin, Wang, ECCV 2022): personalized channel selection (PCS) on
the bottleneck and head calibration (HC) of the full-resolution output.

- PCS: a one-hot site embedding -> two linear maps (K->C, ReLU, C->C) = e; channel attention
  A = sigmoid(fc2([GAP(f); e]) + fc2([GMP(f); e])) with a shared bottleneck MLP fc2 (2C -> C/16 -> C);
  f' = f * A + f. In training it also computes the contrastive site term
  L_con = -(1/(K-1)) sum_{j != k} MSE(A_k, A_j), with A_j from the same features and site j's embedding
  (no gradient).
- HC: on the last decoder features F, every site's final head (copies received read-only) predicts (softmax over
  classes; sigmoid per region for region-based datasets, as the paper's sigmoid outputs); the disagreement
  U = sqrt(sum_i (p_i - p_k)^2 / (K'-1)) over the K' sites whose heads arrived is normalized per sample and class by
  its spatial maximum
  (+eps), its local maxima above a threshold are kept (non-maximum suppression) and spread by a fixed Gaussian
  (peak 1); features are modulated per class by the spread disagreement and by the smoothed prediction
  (F * G(U_c) + F and F * G(P_c) + F), concatenated, and a 3x3(x3) convolution, added to the site's own logits
  (residual, zero-initialised), gives the calibrated logits. HC works on detached features: it learns without
  changing the segmentation network.

The modules attach to the planned network with forward hooks, so every nnU-Net key keeps its name.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fednnunet.networks import HookedUNet


class PersonalizedChannelSelection(nn.Module):
    def __init__(self, channels: int, num_sites: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Sequential(nn.Linear(num_sites, channels, bias=False), nn.ReLU(),
                                 nn.Linear(channels, channels, bias=False))
        self.fc2 = nn.Sequential(nn.Linear(2 * channels, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, channels, bias=False))

    def attention(self, features: torch.Tensor, site_onehot: torch.Tensor) -> torch.Tensor:
        """A in (0, 1), shape (B, C), for features (B, C, *spatial) and one-hot site codes (B, K)."""
        flat = features.flatten(2)
        embedding = self.fc1(site_onehot.to(flat.dtype))
        avg = self.fc2(torch.cat([flat.mean(-1), embedding], 1))
        mx = self.fc2(torch.cat([flat.amax(-1), embedding], 1))
        return torch.sigmoid(avg + mx)

    @staticmethod
    def apply(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return features * attention.view(*attention.shape, *([1] * (features.ndim - 2))) + features


def contrastive_site_loss(own: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_con = -(1/(K-1)) sum_{j != k} MSE(A_k, A_j): pushes a site's channel attention away from the others'."""
    if not others:
        return own.new_zeros(())
    return -sum(F.mse_loss(own, o) for o in others) / len(others)


def gaussian_kernel(size: Sequence[int], sigma: Sequence[float], normalize: str) -> torch.Tensor:
    """A separable Gaussian with per-axis size/sigma, scaled to peak 1 ('peak') or sum 1 ('sum')."""
    grids = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in size], indexing='ij')
    g = np.exp(-sum(x ** 2 / (2 * s ** 2) for x, s in zip(grids, sigma)))
    g = g / (g.max() if normalize == 'peak' else g.sum())
    return torch.from_numpy(g.astype(np.float32))


def hc_kernel_size(patch_size: Sequence[int], reference_patch: int = 384, reference_kernel: int = 31) -> List[int]:
    """The paper's 31-pixel window on 384^2 images, scaled to the planned patch per axis (odd, at least 3)."""
    sizes = []
    for p in patch_size:
        k = max(3, int(round(p * reference_kernel / reference_patch)))
        sizes.append(k if k % 2 else k + 1)
    return sizes


def output_probabilities(logits: torch.Tensor, region_based: bool) -> torch.Tensor:
    """nnU-Net's output non-linearity: softmax over classes, or a sigmoid per region."""
    return torch.sigmoid(logits) if region_based else torch.softmax(logits, 1)


class HeadCalibration(nn.Module):
    def __init__(self, features: int, num_classes: int, num_sites: int, conv_op, kernel_size: Sequence[int],
                 threshold: float = 0.2, eps: float = 1e-8, region_based: bool = False):
        super().__init__()
        self.num_classes, self.num_sites, self.threshold, self.eps = num_classes, num_sites, threshold, eps
        self.region_based = bool(region_based)
        self.kernel_size = list(kernel_size)
        self.calibrate = conv_op(2 * num_classes * features, num_classes, kernel_size=3, padding=1)
        # residual calibration: the calibrated logits are the site's own logits plus this convolution, which starts
        # at zero, so the calibration stage starts from the first stage's model (see documentation/methods/lcfed.md)
        nn.init.zeros_(self.calibrate.weight)
        nn.init.zeros_(self.calibrate.bias)
        dims = len(self.kernel_size)
        # every site's final head (1x1 conv), received read-only at the start of the HC stage
        self.register_buffer('head_weight', torch.zeros(num_sites * num_classes, features, *([1] * dims)))
        self.register_buffer('head_bias', torch.zeros(num_sites * num_classes))
        self.register_buffer('present', torch.zeros(num_sites))  # which sites' heads arrived
        self.register_buffer('active', torch.zeros(()))
        sigma = [k * 6.0 / 31.0 for k in self.kernel_size]  # the paper's sigma 6 for a 31 window
        for name, norm in (('peak_kernel', 'peak'), ('smooth_kernel', 'sum')):
            k = gaussian_kernel(self.kernel_size, sigma, norm)
            self.register_buffer(name, k.expand(num_classes, 1, *k.shape).contiguous(), persistent=False)
        self.conv = F.conv3d if dims == 3 else F.conv2d
        self.max_pool = F.max_pool3d if dims == 3 else F.max_pool2d

    def set_site_heads(self, heads: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
        """The final heads {site index: (weight, bias)} of the sites that handed theirs over; the others stay out of
        the disagreement."""
        weight = torch.zeros_like(self.head_weight)
        bias = torch.zeros_like(self.head_bias)
        present = torch.zeros_like(self.present)
        c = self.num_classes
        for i, (w, b) in heads.items():
            weight[i * c:(i + 1) * c] = w.reshape(c, *self.head_weight.shape[1:])
            bias[i * c:(i + 1) * c] = b.reshape(-1)
            present[i] = 1
        with torch.no_grad():
            self.head_weight.copy_(weight)
            self.head_bias.copy_(bias)
            self.present.copy_(present)

    def disagreement(self, features: torch.Tensor, own_probabilities: torch.Tensor) -> torch.Tensor:
        """U per class, over the sites whose heads arrived, normalized by its spatial maximum per sample and
        class."""
        logits = self.conv(features, self.head_weight.to(features.dtype), self.head_bias.to(features.dtype))
        b = features.shape[0]
        logits = logits.view(b, self.num_sites, self.num_classes, *logits.shape[2:])
        probabilities = torch.sigmoid(logits) if self.region_based else torch.softmax(logits, 2)
        present = self.present.to(features.dtype).view(1, -1, *([1] * (probabilities.ndim - 2)))
        squared = (present * (probabilities - own_probabilities[:, None]) ** 2).sum(1)
        u = torch.sqrt(squared / max(float(self.present.sum()) - 1, 1))
        return u / (u.flatten(2).amax(-1).view(b, self.num_classes, *([1] * (u.ndim - 2))) + self.eps)

    def peaks(self, u: torch.Tensor) -> torch.Tensor:
        """Non-maximum suppression: local maxima (in the kernel window) above the threshold."""
        pooled = self.max_pool(u, kernel_size=self.kernel_size, stride=1, padding=[k // 2 for k in self.kernel_size])
        return ((u == pooled) & (u > self.threshold)).to(u.dtype)

    def forward(self, features: torch.Tensor, own_logits: torch.Tensor) -> torch.Tensor:
        probabilities = output_probabilities(own_logits, self.region_based)
        pad = [k // 2 for k in self.kernel_size]
        spread_u = self.conv(self.peaks(self.disagreement(features, probabilities)),
                             self.peak_kernel.to(features.dtype), padding=pad, groups=self.num_classes)
        smooth_p = self.conv(probabilities, self.smooth_kernel.to(features.dtype), padding=pad,
                             groups=self.num_classes)
        modulated = []
        for c in range(self.num_classes):
            modulated.append(features * spread_u[:, c:c + 1] + features)
            modulated.append(features * smooth_p[:, c:c + 1] + features)
        return own_logits + self.calibrate(torch.cat(modulated, 1))


class LCFedUNet(HookedUNet):
    """``wrapper``: num_sites, site_index, hc_kernel_size, hc_threshold (0.2), pcs_reduction (16), region_based
    (False: softmax outputs)."""

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str, wrapper: dict,
                 deep_supervision: bool = True, **base_kwargs):
        super().__init__(input_channels, num_classes, base_network_class_name, deep_supervision, **base_kwargs)
        self.num_sites, self.site_index = int(wrapper['num_sites']), int(wrapper['site_index'])
        bottleneck_channels = self.encoder.output_channels[-1]
        self.pcs = PersonalizedChannelSelection(bottleneck_channels, self.num_sites, wrapper.get('pcs_reduction', 16))
        self.hc = HeadCalibration(self.final_head.in_channels, num_classes, self.num_sites, self.conv_op,
                                  wrapper['hc_kernel_size'], wrapper.get('hc_threshold', 0.2),
                                  region_based=bool(wrapper.get('region_based', False)))
        self.register_buffer('site_onehot', torch.eye(self.num_sites)[self.site_index], persistent=False)
        self.last_contrastive = None
        self.bottleneck_stage.register_forward_hook(self._channel_selection)
        self.final_head.register_forward_hook(self._head_calibration)

    def _channel_selection(self, module, inputs, output):
        b = output.shape[0]
        own = self.pcs.attention(output, self.site_onehot.expand(b, -1))
        self.last_contrastive = None
        if self.training and self.num_sites > 1:
            with torch.no_grad():
                others = [self.pcs.attention(output, torch.eye(self.num_sites, device=output.device)[j].expand(b, -1))
                          for j in range(self.num_sites) if j != self.site_index]
            self.last_contrastive = contrastive_site_loss(own, others)
        return self.pcs.apply(output, own)

    def _head_calibration(self, module, inputs, output):
        if not bool(self.hc.active):
            return output
        return self.hc(inputs[0].detach(), output.detach())
