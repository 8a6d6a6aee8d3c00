"""LC-Fed (Wang, Jin, Wang, ECCV 2022) on nnU-Net. See documentation/methods/lcfed.md.

Stage 1 (federated): PCS on the bottleneck, nnU-Net's loss + alpha * L_con, FedRep-style rounds (the heads alone
for the first ``head_fraction`` of the local iterations, then the body alone); shared and averaged: the U-Net
body and PCS; local: every segmentation head and HC. Stage 2 (the last ``stage2_rounds`` rounds): each site
trains its head calibration on detached features with every site's final head (received read-only once).
"""

import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.networks.lcfed import hc_kernel_size
from fednnunet.trainers.base import segmentation_head_keys
from fednnunet.trainers.head_body_alternation import HeadBodyAlternation
from fednnunet.trainers.two_stage import TwoStageTrainer, as_tensor


class LCFedTrainer(HeadBodyAlternation, TwoStageTrainer):
    method_name = 'lcfed'
    never_alternated = ('hc.',)  # head calibration trains in the second stage only
    network_class_name = 'fednnunet.networks.lcfed.LCFedUNet'
    hyperparameters = {'alpha': 0.1, 'head_fraction': 0.2, 'hc_threshold': 0.2, 'stage2_rounds': None,
                       'stage2_fraction': 0.2, 'stage2_lr': 1e-3}
    stage2_name = 'head calibration'
    without_stage2 = 'FedRep with personalized channel selection'

    @classmethod
    def architecture_kwargs(cls, plans, configuration, num_sites, site_index, hyperparameters, dataset_json):
        pm = PlansManager(plans)
        patch = pm.get_configuration(configuration).patch_size
        return {'num_sites': int(num_sites), 'site_index': int(site_index), 'hc_kernel_size': hc_kernel_size(patch),
                'hc_threshold': float(hyperparameters['hc_threshold']),
                'region_based': bool(pm.get_label_manager(dataset_json).has_regions)}

    @classmethod
    def local_keys(cls, network):
        return segmentation_head_keys(network) + [k for k in network.state_dict() if k.startswith('hc.')]

    @classmethod
    def readonly_keys(cls, network):
        """The final (full-resolution) segmentation head: what every other site's head calibration needs."""
        last = len(network.decoder.seg_layers) - 1
        return [f'decoder.seg_layers.{last}.weight', f'decoder.seg_layers.{last}.bias']

    # stage 1: FedRep-style alternation and the contrastive site term
    def before_train_step(self, step: int):
        if not self.in_stage2(self.current_epoch):
            self.alternate_heads_and_body(step)

    def extra_loss(self, output, target):
        term = self.unwrapped_network.last_contrastive
        if self.in_stage2(self.current_epoch) or term is None or self.alpha == 0:
            return None
        return self.alpha * term

    # stage 2: head calibration
    def enter_stage2(self, readonly):
        weight_key, bias_key = self.readonly_keys(self.unwrapped_network)
        hc = self.unwrapped_network.hc
        hc.set_site_heads({i: (as_tensor(parts[weight_key], hc.head_weight), as_tensor(parts[bias_key], hc.head_bias))
                           for i, parts in readonly.items()})
        with torch.no_grad():
            hc.active.fill_(1)

    def stage2_trainable(self, name: str) -> bool:
        return name.startswith('hc.calibrate.')
