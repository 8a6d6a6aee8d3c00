"""nnU-Net's cascade, federated: ``3d_lowres`` trained on the federation's five folds, every site predicting its own
cases out of fold for the next stage, then ``3d_cascade_fullres`` trained on them.

nnU-Net's trainer of a configuration with a next stage writes, in its final validation, each validation case's
prediction resampled to the next stage's preprocessed shape into ``<model>/predicted_next_stage/<next stage>/``
(``resample_and_save``); after the five folds every training case has one, predicted by the fold that did not train
on it. The next stage's trainer reads them from ``<Trainer>__<plans>__<previous stage>/predicted_next_stage/<stage>``
and feeds them, one-hot, beside the image (nnU-Net's ``is_cascaded``).

Here each site does that with its own model of each fold and its own cases, into its own copy of the model folder
(``<Trainer>__<plans>__3d_lowres/sites/<site>/predicted_next_stage/3d_cascade_fullres/``), and its cascade trainer
reads them from there. Nothing of it leaves the site. A site with fewer cases than folds validates some cases in
several folds (its split, see fednnunet.preprocessing.site_splits): the last fold's prediction is kept; a site with
one case trains and validates on it, so its "out of fold" prediction is not (said in the documentation).
"""
import os
from typing import List, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnunetv2.inference.export_prediction import resample_and_save

from fednnunet.errors import FederationError

NEXT_STAGE_FOLDER = 'predicted_next_stage'


def previous_stage_folder(results_root: str, trainer_name: str, plans_name: str, previous_stage: str,
                          configuration: str, site: str) -> str:
    """Where a site's cascade stage finds its previous stage's out-of-fold predictions."""
    return join(results_root, f'{trainer_name}__{plans_name}__{previous_stage}', 'sites', site, NEXT_STAGE_FOLDER,
                configuration)


def previous_stage_validation_folder(results_root: str, trainer_name: str, plans_name: str, previous_stage: str,
                                     site: str, fold) -> str:
    """The site's previous-stage validation predictions of ``fold`` (what a cascade stage's final validation reads)."""
    return join(results_root, f'{trainer_name}__{plans_name}__{previous_stage}', 'sites', site, f'fold_{fold}',
                'validation')


def refuse_cascade(method_trainer, configuration: str, previous: str):
    """Methods whose networks or data cannot take the previous stage's segmentation as input channels."""
    if not method_trainer.takes_previous_stage_channels:
        raise FederationError(f"'{configuration}' takes '{previous}''s segmentation as input channels; "
                              f"{method_trainer.method_name} builds an encoder per image channel and cannot",
                              field='configuration')
    if method_trainer.uses_unlabelled_data:
        raise FederationError(f"'{configuration}' needs '{previous}''s predictions of every training case; "
                              f"{method_trainer.method_name}'s unlabelled cases have none (train "
                              f"{method_trainer.method_name} on 3d_fullres or '{previous}')", field='configuration')


def export_next_stages(trainer, model_folder: str, cases: List[str], device: torch.device,
                       verbose: bool = False) -> Optional[str]:
    """nnU-Net's next-stage export of a site's final model: each of ``cases`` (its validation cases of the fold,
    preprocessed at this configuration) predicted with nnU-Net's sliding window and resampled to every next stage's
    preprocessed shape (nnU-Net's ``resample_and_save``), into ``<model_folder>/predicted_next_stage/<stage>/``.
    Returns the log line (None without next stages)."""
    from fednnunet.inference import load_predictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    next_stages = trainer.configuration_manager.next_stage_names
    if not next_stages or not cases:
        return None
    predictor = load_predictor(model_folder, trainer.fold, 'checkpoint_final.pth', device, verbose=verbose)
    source = trainer.preprocessed_dataset_folder
    dataset_val = infer_dataset_class(source)(source, cases)
    targets = {}  # next stage: (its preprocessed folder, nnU-Net's dataset class there, or None)
    for n in next_stages:
        target_folder = join(trainer.preprocessed_dataset_folder_base,
                             trainer.plans_manager.get_configuration(n).data_identifier)
        try:
            targets[n] = (target_folder, infer_dataset_class(target_folder) if os.path.isdir(target_folder) else None)
        except AssertionError:  # nnU-Net cannot tell the folder's format (empty): as not preprocessed
            targets[n] = (target_folder, None)
    done, skipped = 0, []
    for case in cases:
        data, _, _, properties = dataset_val.load_case(case)
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:]))).cpu()
        for n in next_stages:
            target_folder, target_class = targets[n]
            try:
                target = target_class(target_folder, [case]).load_case(case)[0] if target_class else None
            except FileNotFoundError:
                target = None
            if target is None:  # nnU-Net logs and goes on; the next stage's training check names what is missing
                skipped.append(f'{n} ({case})')
                continue
            out = join(model_folder, NEXT_STAGE_FOLDER, n)
            os.makedirs(out, exist_ok=True)
            resample_and_save(logits, target.shape[1:], join(out, case), trainer.plans_manager,
                              trainer.configuration_manager, properties, trainer.dataset_json, 1, target_class)
            done += 1
    text = f'next stage(s) {", ".join(next_stages)}: {done} prediction(s) written'
    if skipped:
        text += (f'; not preprocessed here, so skipped: {", ".join(skipped[:5])} (run fednnunet_plan_and_preprocess '
                 f'-c 3d_fullres for the cascade)')
    return text


def missing_previous_stage(folder: str, cases: List[str]) -> List[str]:
    """The cases without a previous-stage prediction in ``folder`` (nnU-Net's .b2nd, or .npz/.npy)."""
    present = set()
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            for ending in ('.b2nd', '.npz', '.npy'):
                if f.endswith(ending):
                    present.add(f[:-len(ending)])
    return [c for c in cases if c not in present]
