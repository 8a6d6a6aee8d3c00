"""nnU-Net's ``-device`` names, and whether this machine has the one asked for (imports torch, not nnU-Net).
:func:`fednnunet.site_training.resolve_device` turns a name into a torch device."""
from typing import Optional

DEVICES = ('cuda', 'cpu', 'mps')
AUTO = 'auto'  # the flag not given: cuda if available, else the CPU (with a notice)


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch
    return hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()


def unavailable(name: Optional[str]) -> Optional[str]:
    """The error for an explicit device this machine lacks (as nnU-Net, which fails loudly), else None."""
    if name == 'cuda' and not cuda_available():
        return '-device cuda: CUDA is not available on this machine; use -device cpu'
    if name == 'mps' and not mps_available():
        return '-device mps: MPS is not available on this machine; use -device cpu'
    return None
