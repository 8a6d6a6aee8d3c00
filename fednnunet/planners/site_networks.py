"""Per-site networks: one configuration per capacity, inheriting from the shared one (nnU-Net's plans format).

Sites that exchange knowledge instead of weights (model-heterogeneous methods) may train different networks, as long
as their predictions align voxel for voxel: the same spacing, patch size, normalisation and preprocessed data. Each
capacity is therefore a configuration that inherits everything from the negotiated one (``inherits_from``, as
nnU-Net's 3d_cascade_fullres inherits from 3d_fullres) and replaces only ``architecture``:

- ``plain``: the negotiated configuration itself (nnU-Net's PlainConvUNet);
- ``resenc``: nnU-Net's ResidualEncoderUNet on the same topology (stages, strides, kernels, features), with the
  encoder blocks per stage of nnU-Net's residual-encoder planners (``ResEncUNetPlanner``: 1, 3, 4, 6, 6, ...) and one
  decoder block per stage: what nnU-Net's ResEnc presets build, at the negotiated patch size;
- ``resenc_wide``: the same with twice the features per stage (capped at nnU-Net's maximum, 320 in 3d, 512 in 2d).

sites.json chooses per participant (``"network": "plain" | "resenc" | "resenc_wide" | "auto"``); ``auto`` takes the
largest network whose memory estimate at the negotiated batch and patch size fits the participant's
``gpu_memory_gb`` (nnU-Net's own estimate, ``ExperimentPlanner.static_estimate_VRAM_usage``, scaled as nnU-Net's
planners scale it). Plans get these configurations only when some participant declares a ``network``; otherwise
they are nnU-Net's, unchanged.
"""
import copy
import os
from typing import Dict, Optional, Tuple

from fednnunet.errors import FederationError

NETWORKS = ('plain', 'resenc', 'resenc_wide')
AUTO = 'auto'
PLAIN_CLASS = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
RESENC_CLASS = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
#: nnU-Net 2.8.1's calibration of its memory estimate: (reference value, batch size) at 8 GB, by network class and
#: dimension (ExperimentPlanner and ResEncUNetPlanner attributes UNet_reference_val_{2d,3d}, *_corresp_bs_*)
NNUNET_REFERENCE = {PLAIN_CLASS: {2: (85e6, 12), 3: (560e6, 2)}, RESENC_CLASS: {2: (135e6, 12), 3: (680e6, 2)}}
NNUNET_REFERENCE_GB = 8.0
NNUNET_MAX_FEATURES = {2: 512, 3: 320}
#: blocks per stage of nnU-Net 2.8.1's residual-encoder planners (ResEncUNetPlanner.UNet_blocks_per_stage_*; instance
#: attributes set after the planner has loaded a dataset, so not readable without one)
NNUNET_RESENC_BLOCKS_ENCODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
NNUNET_RESENC_BLOCKS_DECODER = (1,) * 12


def network_configuration(configuration: str, network: str) -> str:
    """The plans' configuration name of ``network`` for the negotiated ``configuration``."""
    return configuration if network == 'plain' else f'{configuration}_{network}'


def check_network(value, participant: str) -> Optional[str]:
    if value is None or value == AUTO or value in NETWORKS:
        return value
    raise FederationError(f"network {str(value)[:40]!r} is not one of {list(NETWORKS) + [AUTO]}", site=participant,
                          field='network')


def architecture(shared: dict, network: str) -> dict:
    """The ``architecture`` entry of ``network``, built on the shared configuration's (a PlainConvUNet's)."""
    if network == 'plain':
        return copy.deepcopy(shared)
    if shared['network_class_name'] != PLAIN_CLASS:
        raise FederationError(f"per-site networks are built on nnU-Net's PlainConvUNet; these plans have "
                              f"{shared['network_class_name']}", field='network')
    kwargs = copy.deepcopy(shared['arch_kwargs'])
    n = int(kwargs['n_stages'])
    ndim = len(kwargs['kernel_sizes'][0])
    features = list(kwargs['features_per_stage'])
    if network == 'resenc_wide':
        features = [min(2 * f, NNUNET_MAX_FEATURES[ndim]) for f in features]
    kwargs.pop('n_conv_per_stage', None)
    kwargs.update({'features_per_stage': tuple(features), 'n_blocks_per_stage': NNUNET_RESENC_BLOCKS_ENCODER[:n],
                   'n_conv_per_stage_decoder': NNUNET_RESENC_BLOCKS_DECODER[:n - 1]})
    return {'network_class_name': RESENC_CLASS, 'arch_kwargs': kwargs,
            '_kw_requires_import': tuple(shared['_kw_requires_import'])}


def estimated_memory_gb(arch: dict, patch_size, batch_size: int, num_input_channels: int,
                        num_outputs: int) -> float:
    """Device memory the network needs to train at ``batch_size`` x ``patch_size``, by nnU-Net's estimate (feature
    map sizes) scaled as its planners scale it to their 8 GB reference."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    previous = os.environ.get('nnUNet_n_proc_DA')
    if previous is not None and previous.strip() == '0':  # nnU-Net's estimate sets torch's threads to this number
        os.environ['nnUNet_n_proc_DA'] = '1'
    try:
        estimate = ExperimentPlanner.static_estimate_VRAM_usage(tuple(int(p) for p in patch_size), num_input_channels,
                                                                num_outputs, arch['network_class_name'],
                                                                arch['arch_kwargs'], arch['_kw_requires_import'])
    finally:
        if previous is not None:
            os.environ['nnUNet_n_proc_DA'] = previous
    reference, reference_batch = NNUNET_REFERENCE[arch['network_class_name']][len(patch_size)]
    return float(estimate) / reference * NNUNET_REFERENCE_GB * batch_size / reference_batch


def add_site_networks(plans: dict, dataset_json: dict, wishes: Dict[str, dict]) -> Tuple[dict, Dict[str, dict]]:
    """Plans with every chosen network's configuration added, for every negotiated configuration (2d, 3d_fullres,
    3d_lowres; not the cascade's second stage), and {participant: {configuration: its network's configuration}}.

    ``wishes``: {participant: {'network': 'plain' | ... | 'auto' | None, 'gpu_memory_gb': float or None}}; None
    (no choice) is plain; 'auto' without a declared memory is plain. Plans whose shared network is not nnU-Net's
    PlainConvUNet (a residual-encoder planner's) get no other network: ``auto`` keeps the shared one there, and an
    explicit other network is refused, naming the participant."""
    plans = copy.deepcopy(plans)
    num_inputs = len(dataset_json['channel_names'] if 'channel_names' in dataset_json else dataset_json['modality'])
    num_outputs = len(dataset_json['labels'])
    assignment: Dict[str, dict] = {p: {} for p in wishes}
    for name, config in list(plans['configurations'].items()):
        if 'architecture' not in config or 'inherits_from' in config:
            continue  # the cascade's second stage inherits; it is not trained federated
        options = {}

        def option(network: str, participant: str) -> dict:
            if network not in options:
                try:
                    options[network] = architecture(config['architecture'], network)
                except FederationError as e:
                    raise FederationError(str(e), site=participant, field='network') from None
            return options[network]

        for participant, wish in wishes.items():
            network = wish.get('network') or 'plain'
            if network == AUTO:
                memory = wish.get('gpu_memory_gb')
                network = 'plain'
                candidates = NETWORKS if config['architecture']['network_class_name'] == PLAIN_CLASS else ('plain',)
                for candidate in candidates:
                    if memory is not None and estimated_memory_gb(option(candidate, participant), config['patch_size'],
                                                                  config['batch_size'], num_inputs,
                                                                  num_outputs) <= memory:
                        network = candidate
            target = network_configuration(name, network)
            if network != 'plain' and target not in plans['configurations']:
                plans['configurations'][target] = {'inherits_from': name, 'architecture': option(network, participant)}
            assignment[participant][name] = target
    return plans, assignment
