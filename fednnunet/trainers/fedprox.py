"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the site loss."""
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from fednnunet.trainers.base import FederatedTrainer


class ProximalLoss(nn.Module):
    """nnU-Net's loss plus mu/2 * sum ||w - w_global||^2 over the trainable parameters, during training only
    (validation losses stay nnU-Net's). Wrapping the loss keeps nnU-Net's train_step (AMP, gradient clipping)
    untouched: the proximal gradient mu (w - w_global) is part of the clipped gradient."""

    def __init__(self, loss: nn.Module, trainer: 'FedProxTrainer'):
        super().__init__()
        self.loss = loss
        self.trainer = trainer

    def forward(self, output, target):
        loss = self.loss(output, target)
        anchors: Optional[List[torch.Tensor]] = self.trainer.global_parameters
        if self.trainer.network.training and anchors is not None and self.trainer.mu > 0:
            params = [p for p in self.trainer.unwrapped_network.parameters()]
            prox = sum(torch.sum((p.float() - a) ** 2) for p, a in zip(params, anchors))
            loss = loss + self.trainer.mu / 2 * prox
        return loss


class FedProxTrainer(FederatedTrainer):
    method_name = 'fedprox'
    hyperparameters = {'mu': 0.01}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.global_parameters: Optional[List[torch.Tensor]] = None

    def _build_loss(self):
        return ProximalLoss(super()._build_loss(), self)

    def before_local_training(self, shared_state: Dict[str, np.ndarray]):
        self.global_parameters = [p.detach().clone().float() for p in self.unwrapped_network.parameters()]

    def after_local_training(self):
        self.global_parameters = None
