"""Network classes for methods that change nnU-Net's architecture (LC-Fed, FedDP).

Each class builds the planned nnU-Net network itself and keeps its ``encoder`` and ``decoder`` under the same
names, so every nnU-Net key is unchanged, and attaches the method's modules with forward hooks. The classes are
named in the site's plans.json ``architecture``, whose ``arch_kwargs`` keep every planned key (nnU-Net reads
strides, kernel sizes and features from there) plus ``base_network_class_name`` and the method's own ``wrapper``
settings, so nnU-Net's predictor builds them like any planned network.
"""
import copy

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

WRAPPER_KEYS = ('base_network_class_name', 'wrapper')


class HookedUNet(nn.Module):
    """The planned nnU-Net U-Net (its encoder and decoder, nnU-Net's forward) with room for extra modules."""

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str,
                 deep_supervision: bool = True, **base_kwargs):
        super().__init__()
        # nnU-Net's own builder (its class lookup and weight initialization); the kwargs are already imported
        base = get_network_from_plans(base_network_class_name, base_kwargs, [], input_channels, num_classes,
                                      allow_init=True, deep_supervision=deep_supervision)
        self.encoder = base.encoder
        self.decoder = base.decoder
        self.num_classes = num_classes
        self.conv_op = base.encoder.conv_op
        self.dim = 3 if self.conv_op is nn.Conv3d else 2

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @property
    def bottleneck_stage(self) -> nn.Module:
        return self.encoder.stages[-1]

    @property
    def final_head(self) -> nn.Module:
        return self.decoder.seg_layers[-1]


def wrap_architecture(architecture: dict, network_class_name: str, wrapper: dict) -> dict:
    """plans['configurations'][c]['architecture'] for ``network_class_name`` around the planned network."""
    return {
        'network_class_name': network_class_name,
        'arch_kwargs': {**architecture['arch_kwargs'],
                        'base_network_class_name': architecture['network_class_name'], 'wrapper': wrapper},
        '_kw_requires_import': list(architecture['_kw_requires_import']),
    }


def plans_with_network(plans: dict, configuration: str, network_class_name: str, wrapper: dict,
                       method_name: str) -> dict:
    """A copy of ``plans`` whose ``configuration`` trains ``network_class_name`` around its planned network."""
    plans = copy.deepcopy(plans)
    config = plans['configurations'][configuration]
    if 'architecture' not in config:
        raise ValueError(f'{method_name}: configuration {configuration} inherits its architecture; train a '
                         f'configuration that defines one (2d, 3d_fullres, 3d_lowres)')
    config['architecture'] = wrap_architecture(base_architecture(config['architecture']), network_class_name, wrapper)
    return plans


def base_architecture(architecture: dict) -> dict:
    """The planned architecture inside a wrapped one (or the architecture itself)."""
    kwargs = architecture['arch_kwargs']
    if 'base_network_class_name' not in kwargs:
        return architecture
    return {'network_class_name': kwargs['base_network_class_name'],
            'arch_kwargs': {k: v for k, v in kwargs.items() if k not in WRAPPER_KEYS},
            '_kw_requires_import': list(architecture['_kw_requires_import'])}
