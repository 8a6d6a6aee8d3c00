"""Prediction with a federated model through nnU-Net's own predictor and its own model loading.

A model folder is nnU-Net's (plans.json, dataset.json, fold_X/checkpoint_*.pth): the global model lives in
``<Trainer>__<plans>__<config>/``, a site's personalized model in ``<Trainer>__<plans>__<config>/sites/<site>/``.
nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder`` loads it (its trainer lookup finds fednnunet's
trainers through ``nnUNet_extTrainer``, as for stock ``nnUNetv2_predict``; several folds are ensembled); the only
change is that checkpoints are read with ``torch.load(weights_only=True)``: nothing in them is unpickled but
tensors, plain containers and numpy scalars. Sliding window, mirroring, resampling and export are nnU-Net's.
"""
import contextlib
import io
import os
import re
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from nnunetv2.utilities.utils import create_paths_fn

import fednnunet.trainers
from fednnunet.errors import FederationError

#: the folder nnU-Net's trainer lookup searches (nnUNet_extTrainer) for fednnunet's trainer classes
TRAINERS_FOLDER = os.path.dirname(os.path.abspath(fednnunet.trainers.__file__))


def _numpy_scalar_globals() -> list:
    """What nnU-Net's checkpoints hold besides tensors (its trainer logs numpy floats)."""
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed np.core to np._core
    return [core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64,
                                                                              np.int64)]


def load_checkpoint(path: str) -> dict:
    """An nnU-Net checkpoint, unpickling nothing but tensors, plain containers and numpy scalars."""
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return torch.load(path, map_location='cpu', weights_only=True)


@contextlib.contextmanager
def checkpoints_loaded_without_pickle():
    """For the duration of a call into nnU-Net: its ``torch.load(..., weights_only=False)`` (which would run any
    pickled code in a checkpoint) reads with ``weights_only=True`` instead."""
    original = torch.load

    def weights_only_load(f, *args, **kwargs):
        kwargs['weights_only'] = True
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return original(f, *args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def fednnunet_trainers_findable():
    """nnU-Net finds a checkpoint's trainer class by name in its own package, then in the folders of
    ``nnUNet_extTrainer``: fednnunet's trainers folder is added there for the call."""
    previous = os.environ.get('nnUNet_extTrainer')
    paths = [p for p in (previous or '').split(os.pathsep) if p]
    if TRAINERS_FOLDER not in paths:
        os.environ['nnUNet_extTrainer'] = os.pathsep.join(paths + [TRAINERS_FOLDER])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop('nnUNet_extTrainer', None)
        else:
            os.environ['nnUNet_extTrainer'] = previous


def load_predictor(model_folder: str, folds: Union[int, str, Sequence] = 0,
                   checkpoint_name: str = 'checkpoint_final.pth', device: Optional[torch.device] = None,
                   use_mirroring: bool = True, tile_step_size: float = 0.5, allow_tqdm: bool = False,
                   verbose: bool = False) -> nnUNetPredictor:
    """nnU-Net's predictor for the model in ``model_folder`` (one fold, or several: nnU-Net ensembles them)."""
    folds = [folds] if isinstance(folds, (int, str)) else list(folds)
    for f in folds:
        checkpoint_file = join(model_folder, f'fold_{f}', checkpoint_name)
        if not os.path.isfile(checkpoint_file):
            raise FederationError(f'{checkpoint_file} does not exist; was this model trained (and finished)?',
                                  field='checkpoint')
    device = device or torch.device('cpu')
    # nnU-Net's predictor prints "perform_everything_on_device=True is only supported for cuda devices" for every
    # non-CUDA device, whatever is asked (once per site and model): the one-line CPU notice has said it already
    with contextlib.redirect_stdout(io.StringIO()) if device.type != 'cuda' else contextlib.nullcontext():
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=device.type == 'cuda', device=device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=allow_tqdm)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext()
    with quiet, fednnunet_trainers_findable(), checkpoints_loaded_without_pickle():  # nnU-Net narrates its lookup
        predictor.initialize_from_trained_model_folder(model_folder, tuple(folds), checkpoint_name)
    if handles_missing_channels(predictor.trainer_name):
        # a case may lack some channel files: its channels are taken from the files' names, the others are zeros
        predictor.configuration_manager = MissingChannelsConfiguration(predictor.configuration_manager.configuration)
    return predictor


def handles_missing_channels(trainer_name: str) -> bool:
    """Whether models of this trainer predict cases without some of their channels: its method trains sites that lack
    channels (FedMM's network reads which ones a case has from its input; Multi-FedAvg's and local models take the
    absent ones as zeros, as they were trained)."""
    from fednnunet.methods import METHODS
    return any(m.trainer.__name__ == trainer_name and m.trainer.handles_missing_channels for m in METHODS.values())


class MissingChannelsConfiguration(ConfigurationManager):
    """nnU-Net's configuration whose preprocessor places a case's channel files at their channel indices and leaves
    the absent channels zero (fednnunet.preprocessing.with_missing_channels)."""

    @property
    def preprocessor_class(self):
        from fednnunet.preprocessing import with_missing_channels
        return with_missing_channels(super().preprocessor_class)


def predict_cases(predictor: nnUNetPredictor, list_of_lists: List[List[str]], output_truncated: Sequence[str],
                  num_processes: int = 0, save_probabilities: bool = False,
                  previous_stage_predictions: Optional[str] = None):
    """nnU-Net's prediction from raw files; ``num_processes`` 0: in this process (nnU-Net's -npp 0 -nps 0).
    ``previous_stage_predictions``: for a cascade stage, the folder of the previous stage's segmentations of the same
    cases (nnU-Net's -prev_stage_predictions); a case without one there is an error naming it."""
    previous = predictor.configuration_manager.previous_stage_name
    if previous is None and previous_stage_predictions is not None:
        raise FederationError('the model is not a cascade stage: it takes no previous-stage predictions',
                              field='-prev_stage_predictions')
    if previous is not None:
        if previous_stage_predictions is None:
            raise FederationError(f"the model is a cascade stage: it needs the '{previous}' predictions of the same "
                                  f"cases (-prev_stage_predictions)", field='-prev_stage_predictions')
        ending = predictor.dataset_json['file_ending']
        lacking = [os.path.basename(o) for o in output_truncated
                   if not os.path.isfile(os.path.join(previous_stage_predictions, os.path.basename(o) + ending))]
        if lacking:
            raise FederationError(f"no '{previous}' prediction of {_listing(lacking)} in {previous_stage_predictions}",
                                  field='-prev_stage_predictions')
    os.makedirs(os.path.dirname(os.path.abspath(output_truncated[0])), exist_ok=True)
    if num_processes <= 0:
        predictor.predict_from_files_sequential(list_of_lists, list(output_truncated), save_probabilities, True,
                                                previous_stage_predictions)
    else:
        predictor.predict_from_files(list_of_lists, list(output_truncated), save_probabilities, True,
                                     num_processes, num_processes, previous_stage_predictions)


def _listing(names: Sequence[str], shown: int = 5) -> str:
    return ', '.join(names[:shown]) + (f', ... ({len(names)} in all)' if len(names) > shown else '')


def input_files(folder: str, dataset_json: dict, missing_channels_ok: bool = False) -> List[List[str]]:
    """The cases of an input folder for prediction, as nnU-Net reads them (one list of channel files per case),
    after checking nnU-Net's naming: every file with the dataset's file ending is ``CASE_XXXX<ending>`` with XXXX
    one of dataset.json's channels, and every case has every channel (``missing_channels_ok``, for a model that
    predicts without some channels: at least one; the case's list then holds the files it has). Files with other
    endings are ignored, as nnU-Net does. A FederationError names the offending files (``-i``)."""
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
    if missing and missing_channels_ok:  # every case has a file (else it would not be a case): its channels
        return [[os.path.join(folder, f'{case}_{code}{ending}') for code in sorted(have)]
                for case, have in sorted(cases.items())]
    if missing:
        incomplete = sorted({m[:-len(ending) - 5] for m in missing})
        raise FederationError(f'-i {folder}: {len(incomplete)} case(s) lack a channel (every case needs every '
                              f'channel, {expected}); missing: {_listing(missing)}')
    # nnU-Net's per-case file matching, without the forking Pool its create_lists_from_splitted_dataset_folder
    # starts (forked from this process's threads, a worker can deadlock)
    files = sorted(os.listdir(folder))
    return [create_paths_fn(folder, files, ending, case) for case in sorted(cases)]
