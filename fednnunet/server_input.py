"""What a site accepts from the server, checked before it touches its disk or imports anything.

The server (or whoever took its place) decides names that a site joins to its folders (plans and configuration
names, nnU-Net's data identifier, folds, checkpoint names, file endings) and classes that nnU-Net imports and
instantiates from the plans (``network_class_name`` and the ``_kw_requires_import`` entries, resolved with
``pydoc.locate``: any importable callable, called with keyword arguments from the plans). A site therefore checks:

- every name that reaches the filesystem is an nnU-Net-style identifier (letters, digits, ``_ . + -``, no path
  separator, not starting with a dot), and paths it writes or removes stay inside its own folders;
- every class the plans name is on an allow-list: nnU-Net's U-Nets (dynamic_network_architectures), fednnunet's
  method networks, and torch's convolution, normalization, dropout and non-linearity layers; anything else is
  refused by name, before it is imported. (Preprocessor, normalization, resampling and reader/writer names are
  looked up by nnU-Net inside its own package only; they are checked as identifiers.)

Every check raises :class:`fednnunet.errors.FederationError` naming the field.
"""
import math
import os
import re
from typing import Optional

from fednnunet.errors import FederationError

IDENTIFIER = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$')
FILE_ENDING = re.compile(r'^\.[A-Za-z0-9][A-Za-z0-9.]{0,15}$')
NUM_FOLDS = 5

#: the networks a site builds from plans (nnU-Net's planners write the first three)
NETWORK_CLASSES = frozenset({
    'dynamic_network_architectures.architectures.unet.PlainConvUNet',
    'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet',
    'dynamic_network_architectures.architectures.unet.ResidualUNet',
})
#: fednnunet's method networks, which wrap one of NETWORK_CLASSES (named in ``base_network_class_name``)
METHOD_NETWORK_CLASSES = frozenset({
    'fednnunet.networks.lcfed.LCFedUNet',
    'fednnunet.networks.feddp.FedDPUNet',
})
#: per architecture keyword that nnU-Net imports: the torch layers allowed there
_TORCH_LAYERS = {
    'conv_op': ('conv', ('Conv1d', 'Conv2d', 'Conv3d')),
    'norm_op': (None, ('InstanceNorm1d', 'InstanceNorm2d', 'InstanceNorm3d', 'BatchNorm1d', 'BatchNorm2d',
                       'BatchNorm3d', 'GroupNorm', 'LayerNorm')),
    'dropout_op': ('dropout', ('Dropout', 'Dropout1d', 'Dropout2d', 'Dropout3d', 'AlphaDropout')),
    'nonlin': ('activation', ('LeakyReLU', 'ReLU', 'PReLU', 'ELU', 'GELU', 'SiLU', 'Mish', 'Tanh', 'Sigmoid',
                              'Hardswish')),
}
_NORM_MODULES = {'InstanceNorm': 'instancenorm', 'BatchNorm': 'batchnorm', 'GroupNorm': 'normalization',
                 'LayerNorm': 'normalization'}


def _torch_spellings(key: str) -> frozenset:
    module, names = _TORCH_LAYERS[key]
    out = set()
    for name in names:
        mod = module or next(m for prefix, m in _NORM_MODULES.items() if name.startswith(prefix))
        out |= {f'torch.nn.modules.{mod}.{name}', f'torch.nn.{name}'}
    return frozenset(out)


IMPORTED_KWARGS = {key: _torch_spellings(key) for key in _TORCH_LAYERS}


def identifier(value, field: str, site: Optional[str] = None) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise FederationError(f'{value!r} is not a valid name (letters, digits, _ . + -; no path separator; '
                              f'at most 200 characters)', site=site, field=field)
    return value


def fold(value, site: Optional[str] = None):
    """0-4 (the five folds of every site's splits_final.json) or 'all'."""
    if value == 'all':
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NUM_FOLDS:
        raise FederationError(f'{value!r} is not a fold (0-{NUM_FOLDS - 1} or all)', site=site, field='fold')
    return value


def file_ending(value, site: Optional[str] = None) -> str:
    if not isinstance(value, str) or not FILE_ENDING.match(value):
        raise FederationError(f'{value!r} is not a file ending (e.g. .nii.gz)', site=site, field='file_ending')
    return value


def integer(value, field: str, low: int, high: int, site: Optional[str] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FederationError(f'{value!r} is not an integer in [{low}, {high}]', site=site, field=field)
    return value


def inside(path: str, root: str, field: str, site: Optional[str] = None) -> str:
    """``path`` (resolved, symbolic links followed) lies inside ``root``; returns it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base or real == base:
        raise FederationError(f'{path} is not inside {root}', site=site, field=field)
    return path


def network_class(name, field: str, site: Optional[str] = None, allowed=NETWORK_CLASSES | METHOD_NETWORK_CLASSES):
    if name not in allowed:
        raise FederationError(f'{name!r} is not a network class a site builds (allowed: {sorted(allowed)}); '
                              f'refused before anything was imported', site=site, field=field)
    return name


def architecture(arch, configuration: str, site: Optional[str] = None):
    """A plans ``architecture`` entry: its network class and every class nnU-Net would import from it."""
    field = f'configurations.{configuration}.architecture'
    if not isinstance(arch, dict) or not isinstance(arch.get('arch_kwargs'), dict):
        raise FederationError('must be an object with arch_kwargs', site=site, field=field)
    name = network_class(arch.get('network_class_name'), f'{field}.network_class_name', site)
    kwargs = arch['arch_kwargs']
    if name in METHOD_NETWORK_CLASSES:
        network_class(kwargs.get('base_network_class_name'), f'{field}.arch_kwargs.base_network_class_name', site,
                      allowed=NETWORK_CLASSES)
    imported = arch.get('_kw_requires_import', [])
    if not isinstance(imported, (list, tuple)):
        raise FederationError('must be a list of architecture keywords', site=site,
                              field=f'{field}._kw_requires_import')
    for key in imported:
        if key not in IMPORTED_KWARGS:
            raise FederationError(f'{key!r} is not a keyword nnU-Net may import (allowed: {sorted(IMPORTED_KWARGS)})',
                                  site=site, field=f'{field}._kw_requires_import')
        value = kwargs.get(key)
        if value is not None and value not in IMPORTED_KWARGS[key]:
            raise FederationError(f'{value!r} is not an allowed {key} (torch layers: '
                                  f'{sorted(n for n in IMPORTED_KWARGS[key] if n.startswith("torch.nn.modules"))}); '
                                  f'refused before anything was imported', site=site, field=f'{field}.arch_kwargs.{key}')


def plans(p, site: Optional[str] = None) -> dict:
    """Plans from the server: every name a site joins to a path is an identifier, every class is allowed."""
    if not isinstance(p, dict) or not isinstance(p.get('configurations'), dict):
        raise FederationError('plans must be an object with configurations', site=site, field='plans')
    identifier(p.get('plans_name'), 'plans.plans_name', site)
    identifier(p.get('dataset_name'), 'plans.dataset_name', site)
    if 'image_reader_writer' in p:
        identifier(p['image_reader_writer'], 'plans.image_reader_writer', site)
    for name, c in p['configurations'].items():
        identifier(name, 'plans.configurations', site)
        if not isinstance(c, dict):
            raise FederationError('must be an object', site=site, field=f'configurations.{name}')
        for key in ('data_identifier', 'preprocessor_name', 'inherits_from', 'previous_stage', 'next_stage',
                    'resampling_fn_data', 'resampling_fn_seg', 'resampling_fn_probabilities'):
            if c.get(key) is not None:
                identifier(c[key], f'configurations.{name}.{key}', site)
        for i, scheme in enumerate(c.get('normalization_schemes') or []):
            identifier(scheme, f'configurations.{name}.normalization_schemes[{i}]', site)
        if 'architecture' in c:
            architecture(c['architecture'], name, site)
    return p


def dataset_json(d, site: Optional[str] = None) -> dict:
    if not isinstance(d, dict):
        raise FederationError('dataset.json must be an object', site=site, field='dataset_json')
    file_ending(d.get('file_ending'), site)
    return d


RUN_ID = re.compile(r'^[0-9a-f]{32}$')
#: bounds a site accepts for a training request (nnU-Net's own schedule is 1000 x 250 with 50 validation steps)
MAX_ROUNDS, MAX_ITERATIONS, MAX_SITES = 100_000, 1_000_000, 10_000


def training_config(config, site: Optional[str] = None) -> dict:
    """A ``check_training``/``fit``/``finish`` request: every name, number and flag the site uses."""
    from fednnunet.method_names import METHODS
    if not isinstance(config, dict):
        raise FederationError('the request config must be an object', site=site, field='config')
    if config.get('method') not in METHODS:
        raise FederationError(f"{config.get('method')!r} is not a method this site runs ({sorted(METHODS)})",
                              site=site, field='method')
    identifier(config.get('plans_identifier'), 'plans_identifier', site)
    identifier(config.get('configuration'), 'configuration', site)
    if 'network_configuration' in config:
        identifier(config['network_configuration'], 'network_configuration', site)
    fold(config.get('fold'), site)
    if not isinstance(config.get('run_id'), str) or not RUN_ID.match(config['run_id']):
        raise FederationError(f"{config.get('run_id')!r} is not a run id (32 hex digits)", site=site, field='run_id')
    num_sites = integer(config.get('num_sites'), 'num_sites', 1, MAX_SITES, site)
    integer(config.get('site_index'), 'site_index', 0, num_sites - 1, site)
    rounds = integer(config.get('rounds'), 'rounds', 1, MAX_ROUNDS, site)
    integer(config.get('round', 0), 'round', 0, rounds, site)
    integer(config.get('local_iterations'), 'local_iterations', 1, MAX_ITERATIONS, site)
    integer(config.get('val_iterations'), 'val_iterations', 1, MAX_ITERATIONS, site)
    integer(config.get('seed'), 'seed', 0, 2 ** 63 - 1, site)
    hyper = config.get('hyperparameters') or {}
    if not isinstance(hyper, dict) or not all(isinstance(k, str) and (v is None or (isinstance(v, (int, float))
                                                                                   and not isinstance(v, bool)
                                                                                   and math.isfinite(v)))
                                              for k, v in hyper.items()):
        raise FederationError('hyper-parameters must be names with finite numbers', site=site,
                              field='hyperparameters')
    for flag in ('overwrite', 'continue', 'validate', 'save_probabilities'):
        if flag in config and not isinstance(config[flag], bool):
            raise FederationError(f'{config[flag]!r} is not true or false', site=site, field=flag)
    return config


def results_folder_name(value, site: Optional[str] = None, field: str = 'results_folder_name') -> str:
    """nnU-Net's name of a trained model's folder: Trainer__Plans__configuration, each part an identifier."""
    name = identifier(value, field, site)
    parts = name.split('__')
    if len(parts) != 3 or not all(parts):
        raise FederationError(f'{name!r} is not an nnU-Net results folder name (Trainer__Plans__configuration)',
                              site=site, field=field)
    return name


def evaluate_config(config, site: Optional[str] = None) -> dict:
    """An ``evaluate`` request: the results folder name (<Trainer>__<plans>__<configuration>), the model, the
    checkpoint file name and the fold."""
    if not isinstance(config, dict):
        raise FederationError('the request config must be an object', site=site, field='config')
    results_folder_name(config.get('results_folder_name'), site)
    if config.get('model') not in ('site', 'global'):
        raise FederationError(f"{config.get('model')!r} is not a model (site or global)", site=site, field='model')
    checkpoint = identifier(config.get('checkpoint'), 'checkpoint', site)
    if not checkpoint.endswith('.pth'):
        raise FederationError(f'{checkpoint!r} is not a checkpoint file name (*.pth)', site=site, field='checkpoint')
    fold(config.get('fold'), site)
    return config
