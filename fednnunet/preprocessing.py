"""Per-site preprocessing with the shared plans, into the site's own nnU-Net preprocessed folder.

Every case goes through nnU-Net's own preprocessor (``DefaultPreprocessor.run_case_save`` or whichever
class the plans name), so a site's folder is exactly what ``nnUNetv2_preprocess`` would produce for
those cases: ``<data_identifier>/{case}.b2nd|_seg.b2nd|.pkl``, ``gt_segmentations/``, the plans,
``dataset.json`` and a per-site ``splits_final.json`` that never mixes sites.
"""
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet import server_input
from fednnunet.errors import FederationError
from fednnunet.federation import Site
from fednnunet.jsonio import write_json
from fednnunet.parallel import run_per_case

NNUNET_SPLIT_SEED = 12345
NUM_FOLDS = 5
#: a configuration's unlabelled cases: ``<data_identifier>_unlabelled`` in the site's folder
UNLABELLED_SUFFIX = '_unlabelled'


def site_splits(cases: Sequence[str], num_folds: int = NUM_FOLDS,
                validation: Sequence[str] = ()) -> List[Dict[str, List[str]]]:
    """nnU-Net's seeded 5-fold split of one site's cases, valid for every fold 0..4 whatever the site size.

    5 or more cases: exactly nnU-Net's ``generate_crossval_split``. 2-4 cases: a leave-one-out split
    (nnU-Net's KFold with n folds) repeated to fill 5 folds. 1 case: it trains and validates on it (nnU-Net
    does the same for fold 'all'); the site's validation score is then not a held-out estimate.

    A site that holds out validation cases of its own (sites.json ``validation``) trains on all its cases in every
    fold and validates on those (no cross-validation: the held-out set is the site's choice). A site without
    labelled training cases (unlabelled only) then has folds with an empty training split.
    """
    if validation:
        return [{'train': sorted(cases), 'val': sorted(validation)} for _ in range(num_folds)]
    keys = sorted(cases)
    if not keys:  # unlabelled cases only, no validation case: nothing to split
        return [{'train': [], 'val': []} for _ in range(num_folds)]
    if len(keys) >= num_folds:
        return generate_crossval_split(keys, seed=NNUNET_SPLIT_SEED, n_splits=num_folds)
    if len(keys) == 1:
        return [{'train': list(keys), 'val': list(keys)} for _ in range(num_folds)]
    base = generate_crossval_split(keys, seed=NNUNET_SPLIT_SEED, n_splits=len(keys))
    return [base[i % len(base)] for i in range(num_folds)]


def channel_count(dataset_json: dict) -> int:
    return len(dataset_json['channel_names'] if 'channel_names' in dataset_json else dataset_json['modality'])


def channels_of_files(image_files: Sequence[str], file_ending: str) -> List[int]:
    """The dataset.json channel index of each file named by nnU-Net's convention (``CASE_XXXX<ending>``)."""
    out = []
    for f in image_files:
        m = re.fullmatch(r'.+_(\d{4})' + re.escape(file_ending), os.path.basename(f))
        if m is None:
            raise ValueError(f'{os.path.basename(f)} is not named CASE_XXXX{file_ending} (XXXX: its channel)')
        out.append(int(m.group(1)))
    if len(set(out)) != len(out) or out != sorted(out):
        raise ValueError(f'the channel files {[os.path.basename(f) for f in image_files]} are not one per channel, '
                         f'in channel order')
    return out


def with_missing_channels(preprocessor_class):
    """nnU-Net's ``preprocessor_class`` for cases that have only some of the dataset's channels (a site's sites.json
    ``channels``; a scan to predict without some of its files): the channel files read are placed at their
    dataset.json indices (``present_channels``, or taken from the files' names), every channel is preprocessed as
    nnU-Net does, and the missing ones are left all zero (after normalisation and resampling); the case's properties
    (the .pkl) record ``present_channels``. The network sees the dataset's channel count for every case."""

    class MissingChannelsPreprocessor(preprocessor_class):
        def __init__(self, verbose: bool = False, present_channels: Optional[Sequence[str]] = None):
            super().__init__(verbose=verbose)
            self.present_channels = None if present_channels is None else [int(c) for c in present_channels]
            self._present = None

        def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
            if isinstance(dataset_json, str):
                with open(dataset_json) as f:
                    dataset_json = json.load(f)
            self._present = (self.present_channels if self.present_channels is not None else
                             channels_of_files(image_files, dataset_json['file_ending']))
            self._num_channels = channel_count(dataset_json)
            if len(self._present) != len(image_files) or max(self._present) >= self._num_channels:
                raise ValueError(f'channels {self._present} for {len(image_files)} file(s) of a dataset with '
                                 f'{self._num_channels} channel(s)')
            return super().run_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json)

        def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
            if data.shape[0] != len(self._present):
                raise ValueError(f'{data.shape[0]} channel(s) read from {len(self._present)} channel file(s)')
            full = np.zeros((self._num_channels, *data.shape[1:]), dtype=np.float32)
            full[self._present] = data
            data, seg, properties = super().run_case_npy(full, seg, properties, plans_manager, configuration_manager,
                                                         dataset_json)
            data[[c for c in range(self._num_channels) if c not in self._present]] = 0
            properties['present_channels'] = list(self._present)
            return data, seg, properties

    MissingChannelsPreprocessor.__name__ = preprocessor_class.__name__  # (nnU-Net's class, channels filled in)
    return MissingChannelsPreprocessor


def _preprocess_case(preprocessor_class_name: str, output_truncated: str, image_files: List[str],
                     label_file: Optional[str], plans: dict, configuration: str, dataset_json: dict, site: str,
                     case: str, present_channels: Optional[List[str]] = None):
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    try:
        if present_channels is None:  # every channel: exactly nnU-Net's preprocessing
            preprocessor = cm.preprocessor_class(verbose=False)
        else:
            preprocessor = with_missing_channels(cm.preprocessor_class)(present_channels=present_channels)
        preprocessor.run_case_save(output_truncated, image_files, label_file, plans_manager, cm, dataset_json)
    except FederationError:
        raise
    except Exception as e:
        raise FederationError(f'preprocessing failed ({type(e).__name__}: {e})', site=site, case=case,
                              field=configuration) from e


def _splits_cover(splits_file: str, cases: Sequence[str], validation: Sequence[str] = ()) -> bool:
    """An existing splits_final.json is kept (as nnU-Net does) only if every fold covers exactly this
    site's cases (and validates on its validation cases, where it has some); a stale one from another case list
    is replaced."""
    if not os.path.isfile(splits_file):
        return False
    with open(splits_file) as f:
        splits = json.load(f)
    if validation:
        return splits == site_splits(cases, validation=validation)
    return len(splits) > 0 and all(set(s['train']) | set(s['val']) == set(cases) for s in splits)


def unlabelled_data_folder(site_folder: str, data_identifier: str) -> str:
    """Where a site's preprocessed unlabelled cases of one configuration live (beside the labelled ones)."""
    return os.path.join(site_folder, data_identifier + UNLABELLED_SUFFIX)


def _preprocess_into(final: str, cases: Sequence[Tuple[str, List[str], Optional[str]]], preprocessor_name: str,
                     plans: dict, configuration: str, dataset_json: dict, site: str, num_processes: int, what: str,
                     present_channels: Optional[List[str]] = None):
    """(case, image files, label file or None) through nnU-Net's preprocessor into ``final``, written under a
    ``.partial`` name and renamed when complete. ``present_channels``: the site's channels where it lacks some."""
    partial = final + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    args = [(preprocessor_name, os.path.join(partial, case), images, label, plans, configuration, dataset_json, site,
             case, present_channels) for case, images, label in cases]
    run_per_case(_preprocess_case, args, num_processes, f'[site {site}] {what}')
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def preprocess_site(site: Site, plans: dict, dataset_json: dict, configurations: Sequence[str], out_folder: str,
                    num_processes: int = 1) -> dict:
    """Preprocesses the site's own cases for each configuration. Each output folder is written under a
    ``.partial`` name and renamed when complete, so an interrupted run never leaves a folder that looks
    done. Returns a short report (cases and shapes per configuration) for the server's log."""
    os.makedirs(out_folder, exist_ok=True)
    plans_manager = PlansManager(plans)
    report = {'site': site.name, 'configurations': {}}
    present = site.present_channels if site.missing_channels else None
    for c in configurations:
        if c not in plans_manager.available_configurations:
            raise FederationError(f'configuration {c!r} is not in the plans (available: '
                                  f'{plans_manager.available_configurations})', site=site.name, field='-c')
        cm = plans_manager.get_configuration(c)
        final = server_input.inside(os.path.join(out_folder, server_input.identifier(
            cm.data_identifier, f'configurations.{c}.data_identifier', site.name)), out_folder, 'data_identifier',
            site.name)  # it is removed and replaced below
        # the labelled cases, training and validation-only ones, as nnU-Net's training cases (the splits say which
        # is which); a site with unlabelled cases only gets an empty folder of them
        _preprocess_into(final, [(case, site.image_files(case), site.label_file(case)) for case in site.labelled],
                         cm.preprocessor_name, plans, c, dataset_json, site.name, num_processes, f'preprocess {c}',
                         present)
        report['configurations'][c] = {'data_identifier': cm.data_identifier, 'num_cases': len(site.cases),
                                       'num_validation': len(site.validation)}
        if site.unlabelled:
            # unlabelled cases: nnU-Net's preprocessor without a segmentation (as for its test cases), into a folder
            # of their own beside the labelled one, so that nnU-Net's tools never mistake them for training cases
            _preprocess_into(unlabelled_data_folder(out_folder, cm.data_identifier),
                             [(case, site.unlabelled_image_files(case), None) for case in site.unlabelled],
                             cm.preprocessor_name, plans, c, dataset_json, site.name, num_processes,
                             f'preprocess {c} (unlabelled)', present)
            report['configurations'][c]['num_unlabelled'] = len(site.unlabelled)
        else:
            shutil.rmtree(unlabelled_data_folder(out_folder, cm.data_identifier), ignore_errors=True)  # a stale one

    gt = os.path.join(out_folder, 'gt_segmentations')
    gt_partial = gt + '.partial'
    shutil.rmtree(gt_partial, ignore_errors=True)
    os.makedirs(gt_partial)
    for case in site.labelled:
        shutil.copyfile(site.label_file(case), os.path.join(gt_partial, case + dataset_json['file_ending']))
    shutil.rmtree(gt, ignore_errors=True)
    os.replace(gt_partial, gt)

    write_json(os.path.join(out_folder, 'dataset.json'), dataset_json)
    write_json(server_input.inside(os.path.join(out_folder, server_input.identifier(
        plans['plans_name'], 'plans_name', site.name) + '.json'), out_folder, 'plans_name', site.name), plans)
    splits_file = os.path.join(out_folder, 'splits_final.json')
    if not _splits_cover(splits_file, site.cases, site.validation):
        write_json(splits_file, site_splits(site.cases, validation=site.validation))
    report['num_cases'] = len(site.cases)
    return report
