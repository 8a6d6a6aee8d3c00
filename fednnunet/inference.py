"""Prediction with a federated model through nnU-Net's own predictor.

A model folder is nnU-Net's (plans.json, dataset.json, fold_X/checkpoint_*.pth): the global model lives in
``<Trainer>__<plans>__<config>/``, a site's personalized model in ``<Trainer>__<plans>__<config>/sites/<site>/``.
The network is rebuilt by the trainer that trained it (fednnunet's trainers are not on nnU-Net's search path, so
``nnUNetPredictor.manual_initialization`` is used instead of a name lookup); everything else, sliding window,
mirroring, resampling and export, is nnU-Net's.
"""
import os
import re
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from fednnunet.errors import FederationError


def trainer_class_by_name(name: str):
    """fednnunet's trainers first, then nnU-Net's own lookup (its package and nnUNet_extTrainer)."""
    from fednnunet.methods import METHODS
    from fednnunet.trainers.centralized import CentralizedTrainer
    for cls in [m.trainer for m in METHODS.values()] + [CentralizedTrainer]:
        if cls.__name__ == name:
            return cls
    cls = recursive_find_trainer_class_by_name(name)
    if cls is None:
        raise FederationError(f'no trainer class named {name!r}', field='trainer_name')
    return cls


def load_checkpoint(path: str) -> dict:
    """An nnU-Net checkpoint, unpickling nothing but tensors, plain containers and numpy scalars (nnU-Net's
    trainer logs numpy floats)."""
    numpy_scalars = [np._core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in
                                                              (np.float16, np.float32, np.float64, np.int64)]
    with torch.serialization.safe_globals(numpy_scalars):
        return torch.load(path, map_location='cpu', weights_only=True)


def load_predictor(model_folder: str, fold: Union[int, str] = 0, checkpoint_name: str = 'checkpoint_final.pth',
                   device: Optional[torch.device] = None, use_mirroring: bool = True,
                   tile_step_size: float = 0.5, allow_tqdm: bool = False) -> nnUNetPredictor:
    checkpoint_file = join(model_folder, f'fold_{fold}', checkpoint_name)
    if not os.path.isfile(checkpoint_file):
        raise FederationError(f'{checkpoint_file} does not exist; was this model trained (and finished)?',
                              field='checkpoint')
    device = device or torch.device('cpu')
    dataset_json = load_json(join(model_folder, 'dataset.json'))
    plans_manager = PlansManager(load_json(join(model_folder, 'plans.json')))
    checkpoint = load_checkpoint(checkpoint_file)
    configuration_manager = plans_manager.get_configuration(checkpoint['init_args']['configuration'])
    trainer_class = trainer_class_by_name(checkpoint['trainer_name'])
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(checkpoint['network_weights'])
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == 'cuda', device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=allow_tqdm)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [checkpoint['network_weights']],
                                    dataset_json, checkpoint['trainer_name'],
                                    checkpoint.get('inference_allowed_mirroring_axes'))
    return predictor


def predict_cases(predictor: nnUNetPredictor, list_of_lists: List[List[str]], output_truncated: Sequence[str],
                  num_processes: int = 0, save_probabilities: bool = False):
    """nnU-Net's prediction from raw files; ``num_processes`` 0: in this process (nnU-Net's -npp 0 -nps 0)."""
    os.makedirs(os.path.dirname(os.path.abspath(output_truncated[0])), exist_ok=True)
    if num_processes <= 0:
        predictor.predict_from_files_sequential(list_of_lists, list(output_truncated), save_probabilities, True)
    else:
        predictor.predict_from_files(list_of_lists, list(output_truncated), save_probabilities, True,
                                     num_processes, num_processes)


def _listing(names: Sequence[str], shown: int = 5) -> str:
    return ', '.join(names[:shown]) + (f', ... ({len(names)} in all)' if len(names) > shown else '')


def input_files(folder: str, dataset_json: dict) -> List[List[str]]:
    """The cases of an input folder for prediction, as nnU-Net reads them (one list of channel files per case),
    after checking nnU-Net's naming: every file with the dataset's file ending is ``CASE_XXXX<ending>`` with XXXX
    one of dataset.json's channels, and every case has every channel. Files with other endings are ignored, as
    nnU-Net does. A FederationError names the offending files (``-i``)."""
    if not os.path.isdir(folder):
        raise FederationError(f'-i {folder}: not a folder')
    ending = dataset_json['file_ending']
    channels = dataset_json.get('channel_names', dataset_json.get('modality', {}))
    codes = {f'{int(c):04d}': name for c, name in channels.items()}
    pattern = re.compile(r'(.+)_(\d{4})' + re.escape(ending))
    expected = (f"CASE_XXXX{ending} (XXXX: the channel, " +
                ', '.join(f"{code} for {name!r}" for code, name in sorted(codes.items())) + ')')
    files = sorted(f for f in os.listdir(folder) if f.endswith(ending) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise FederationError(f'-i {folder}: no image named {expected}')
    cases, bad = {}, []
    for f in files:
        m = pattern.fullmatch(f)
        if m is None or m.group(2) not in codes:
            bad.append(f)
        else:
            cases.setdefault(m.group(1), set()).add(m.group(2))
    if bad:
        raise FederationError(f'-i {folder}: {len(bad)} file(s) are not named {expected}: {_listing(bad)}')
    missing = [f'{case}_{code}{ending}' for case, have in sorted(cases.items()) for code in sorted(codes)
               if code not in have]
    if missing:
        incomplete = sorted({m[:-len(ending) - 5] for m in missing})
        raise FederationError(f'-i {folder}: {len(incomplete)} case(s) lack a channel (every case needs every '
                              f'channel, {expected}); missing: {_listing(missing)}')
    return create_lists_from_splitted_dataset_folder(folder, ending, sorted(cases), num_processes=1)
