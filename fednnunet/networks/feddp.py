"""FedDP's network on nnU-Net's U-Net (Wang, Jin, Stoyanov, Wang, TMI 2023).

nnU-Net's U-Nets have no attention, and FedDP personalizes attention queries ("Local Query"). This network
inserts a self-attention block after each of the lowest-resolution encoder stages of the planned U-Net: tokens
are the voxels of that stage, a pre-norm multi-head attention with separate query/key/value projections and a
zero-initialised output projection adds its result to the features (so the network starts as the planned
nnU-Net). Every ``attention.<i>.q`` projection stays at its site; everything else is merged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fednnunet.networks import HookedUNet


def attention_heads(channels: int, per_head: int = 32) -> int:
    heads = max(1, channels // per_head)
    while channels % heads:
        heads -= 1
    return heads


class SelfAttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        h = self.norm(tokens)

        def split(t):
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        tokens = tokens + self.proj(out.transpose(1, 2).reshape(b, -1, c))
        return tokens.transpose(1, 2).reshape(b, c, *spatial)


class StageAttention:
    """The forward hook that runs the network's attention block ``index`` on an encoder stage's output.

    It reaches the block through the network that owns it (``network.attention[index]``), never through the block
    object itself: a copy of the network (``copy.deepcopy``, which copies hooks with their objects) then runs its
    own blocks, not the original's."""

    def __init__(self, network: nn.Module, index: int):
        self.network = network
        self.index = index

    def __call__(self, module, inputs, output):
        return self.network.attention[self.index](output)


class FedDPUNet(HookedUNet):
    """``wrapper``: attention_stages (how many of the lowest-resolution encoder stages get attention; 2)."""

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str, wrapper: dict,
                 deep_supervision: bool = True, **base_kwargs):
        super().__init__(input_channels, num_classes, base_network_class_name, deep_supervision, **base_kwargs)
        attention_stages = int(wrapper.get('attention_stages', 2))
        n = len(self.encoder.stages)
        self.attention_stage_indices = list(range(max(0, n - attention_stages), n))
        self.attention = nn.ModuleList()
        for j, i in enumerate(self.attention_stage_indices):
            channels = self.encoder.output_channels[i]
            self.attention.append(SelfAttentionBlock(channels, attention_heads(channels)))
            self.encoder.stages[i].register_forward_hook(StageAttention(self, j))


def query_keys(network: nn.Module) -> list:
    """FedDP's local keys: every query projection of the attention blocks."""
    return [k for k in network.state_dict() if k.startswith('attention.') and '.q.' in k]
