"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the site loss."""
from typing import Dict, List, Optional

import numpy as np
import torch

from fednnunet.trainers.base import FederatedTrainer


class FedProxTrainer(FederatedTrainer):
    """The proximal term is added to nnU-Net's loss in training (so its gradient mu (w - w_global) is part of the
    clipped gradient); the anchors are the weights received this round."""
    method_name = 'fedprox'
    hyperparameters = {'mu': 0.01}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.global_parameters: Optional[List[torch.Tensor]] = None

    def extra_loss(self, output, target):
        if self.global_parameters is None or self.mu <= 0:
            return None
        params = self.unwrapped_network.parameters()
        return self.mu / 2 * sum(torch.sum((p.float() - a) ** 2) for p, a in zip(params, self.global_parameters))

    def before_local_training(self, shared_state: Dict[str, np.ndarray]):
        self.global_parameters = [p.detach().clone().float() for p in self.unwrapped_network.parameters()]

    def after_local_training(self):
        super().after_local_training()
        self.global_parameters = None
