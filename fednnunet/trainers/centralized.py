"""Centralized baseline: nnU-Net's own trainer on the pooled data of all sites.

This is the upper reference a federation is compared with; it pools the sites' preprocessed cases, which a
real federation cannot do. ``CentralizedTrainer`` is ``nnUNetTrainer`` unchanged but for its name (so its
results folder does not collide with a user's own nnU-Net runs) and the iterations per epoch, which the
command sets to rounds x (local iterations x number of sites): the same number of gradient steps as a
federated run of the same length.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class CentralizedTrainer(nnUNetTrainer):
    method_name = 'centralized'
