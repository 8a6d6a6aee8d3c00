"""FedAvg (McMahan et al., AISTATS 2017) on nnU-Net: every state key is shared."""
from typing import Dict

import numpy as np

from fednnunet.errors import FederationError
from fednnunet.trainers.base import FederatedTrainer


class FedAvgTrainer(FederatedTrainer):
    """``reset_momentum`` 1: the site's SGD momentum starts from zero every round (it is kept by default, as nnU-Net
    keeps it from epoch to epoch); an ablation of issue 12's federated recipe."""
    method_name = 'fedavg'
    hyperparameters = {'reset_momentum': 0}

    @classmethod
    def resolve_hyperparameters(cls, given, rounds):
        values, notes = super().resolve_hyperparameters(given, rounds)
        if values['reset_momentum'] not in (0, 1):
            raise FederationError(f"reset_momentum must be 0 (keep the site's momentum) or 1 (reset it every "
                                  f"round), not {values['reset_momentum']!r}", field='reset_momentum')
        return values, notes

    def before_local_training(self, shared_state: Dict[str, np.ndarray]):
        super().before_local_training(shared_state)
        if self.reset_momentum:
            self.optimizer.state.clear()  # SGD rebuilds its momentum buffer from the first gradient of the round
