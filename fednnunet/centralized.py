"""``fednnunet_train ... --method centralized``: the pooled-data baseline with nnU-Net's trainer.

The pooled view ``$nnUNet_preprocessed/DatasetXXX/centralized/`` links every site's preprocessed cases and
ground truth, with a split that is the union of the sites' own splits for each fold, so every case validates
in the same fold as in the federated runs and per-site numbers are comparable.
"""
import os
import shutil
from typing import Optional, Sequence

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2.run.run_training import maybe_load_checkpoint

from fednnunet.federation import server_folder, site_folder
from fednnunet.jsonio import write_json
from fednnunet.trainers.base import initial_weights_seed, seed_everything
from fednnunet.trainers.centralized import CentralizedTrainer


def pooled_view(dataset_name: str, sites: Sequence[str], plans_identifier: str, configuration: str) -> str:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    server = server_folder(dataset_name)
    view = join(server, 'centralized')
    plans = load_json(join(server, plans_identifier + '.json'))
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    shutil.rmtree(view, ignore_errors=True)
    os.makedirs(join(view, data_identifier))
    os.makedirs(join(view, 'gt_segmentations'))
    splits = None
    for s in sites:
        src = site_folder(dataset_name, s)
        for sub in (data_identifier, 'gt_segmentations'):
            if not os.path.isdir(join(src, sub)):
                raise FileNotFoundError(f"site '{s}' has no {sub}: run fednnunet_plan_and_preprocess -c {configuration}")
            for f in os.listdir(join(src, sub)):
                os.symlink(os.path.abspath(join(src, sub, f)), join(view, sub, f))
        site_split = load_json(join(src, 'splits_final.json'))
        if splits is None:
            splits = [{'train': [], 'val': []} for _ in site_split]
        for pooled, own in zip(splits, site_split):
            pooled['train'] += own['train']
            pooled['val'] += own['val']
    write_json(join(view, 'splits_final.json'), splits)
    for f in (plans_identifier + '.json', 'dataset.json', 'dataset_fingerprint.json'):
        shutil.copyfile(join(server, f), join(view, f))
    return view


def train_centralized(dataset_name: str, sites: Sequence[str], configuration: str, fold, plans_identifier: str,
                      rounds: int, local_iterations: int, val_iterations: int, seed: int, device: torch.device,
                      continue_training: bool = False, iterations_per_epoch: Optional[int] = None
                      ) -> CentralizedTrainer:
    """nnU-Net's trainer on the pooled view. An epoch has ``iterations_per_epoch`` iterations, by default
    ``local_iterations`` x the number of sites (what all sites train together in one round)."""
    view = pooled_view(dataset_name, sites, plans_identifier, configuration)
    plans = load_json(join(view, plans_identifier + '.json'))
    plans['continue_training'] = continue_training
    trainer = CentralizedTrainer(plans, configuration, fold, load_json(join(view, 'dataset.json')), device)
    trainer.preprocessed_dataset_folder_base = view
    trainer.preprocessed_dataset_folder = join(view, trainer.configuration_manager.data_identifier)
    trainer.num_epochs = rounds
    trainer.num_iterations_per_epoch = iterations_per_epoch or local_iterations * len(sites)
    trainer.num_val_iterations_per_epoch = val_iterations
    seed_everything(initial_weights_seed(seed))
    maybe_load_checkpoint(trainer, continue_training, False)
    trainer.run_training()
    return trainer
