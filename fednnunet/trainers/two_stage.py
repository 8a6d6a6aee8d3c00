"""Methods with a federated stage followed by a local stage that uses read-only copies of the other sites' parts
(LC-Fed's head calibration, FedDP's inter-site guided calibration).

``--rounds R`` counts both stages; the last ``stage2_rounds`` rounds are the second stage. In the last round of
the first stage every site also sends the parts the others need (under ``readonly/``); the server hands all of
them to every site with the first round of the second stage (``readonly/<site index>/<key>``) and merges
nothing afterwards. Learning rates: nnU-Net's poly schedule over the first stage's rounds, then a fresh poly
schedule from ``stage2_lr`` over the second stage.
"""
import copy
from typing import Dict

import numpy as np
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from fednnunet.networks import base_architecture, wrap_architecture
from fednnunet.trainers.base import FederatedTrainer

READONLY = 'readonly/'


class StagePolyLR(PolyLRScheduler):
    """nnU-Net's poly schedule for a stage that starts at round ``offset``."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, offset: int):
        self.offset = offset
        super().__init__(optimizer, initial_lr, max_steps)

    def step(self, current_step=None):
        super().step(None if current_step is None else max(0, current_step - self.offset))


def split_readonly(arrays: Dict[str, np.ndarray]):
    """(shared arrays, {site index: {key: array}}) from what the server sent."""
    shared, readonly = {}, {}
    for k, v in arrays.items():
        if k.startswith(READONLY):
            index, key = k[len(READONLY):].split('/', 1)
            readonly.setdefault(int(index), {})[key] = v
        else:
            shared[k] = v
    return shared, readonly


class TwoStageTrainer(FederatedTrainer):
    has_local_parts = True
    uses_hooks = True
    #: the network class this method trains (named in the site's plans.json)
    network_class_name: str = None
    hyperparameters = {'stage2_rounds': 0, 'stage2_lr': 1e-2}

    # ------------------------------------------------------------------ architecture
    @classmethod
    def architecture_kwargs(cls, plans: dict, configuration: str, num_sites: int, site_index: int,
                            hyperparameters: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def adapt_plans(cls, plans, configuration, num_sites, site_index, hyperparameters):
        plans = copy.deepcopy(plans)
        config = plans['configurations'][configuration]
        if 'architecture' not in config:
            raise ValueError(f'{cls.method_name}: configuration {configuration} inherits its architecture; '
                             f'train a configuration that defines one (2d, 3d_fullres, 3d_lowres)')
        values = dict(cls.hyperparameters)
        values.update(hyperparameters or {})
        config['architecture'] = wrap_architecture(base_architecture(config['architecture']), cls.network_class_name,
                                                   cls.architecture_kwargs(plans, configuration, num_sites,
                                                                           site_index, values))
        return plans

    # ------------------------------------------------------------------ stages
    @property
    def stage1_rounds(self) -> int:
        return self.num_epochs - int(self.stage2_rounds)

    def in_stage2(self, round_index: int) -> bool:
        return round_index >= self.stage1_rounds

    def configure_optimizers(self):
        if not 0 <= int(self.stage2_rounds) < self.num_epochs:
            raise ValueError(f'{self.method_name}: stage2_rounds must be in [0, rounds); got {self.stage2_rounds} of '
                             f'{self.num_epochs} rounds')
        optimizer, _ = super().configure_optimizers()
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.stage1_rounds)

    def readonly_state(self) -> Dict[str, np.ndarray]:
        """What the other sites need from this site in the second stage (sent once, read-only)."""
        raise NotImplementedError

    def enter_stage2(self, readonly: Dict[int, Dict[str, np.ndarray]]):
        """Set up the second stage with every site's read-only parts ({site index: {key: array}})."""
        raise NotImplementedError

    def stage2_trainable(self, name: str) -> bool:
        """Which parameters train in the second stage."""
        raise NotImplementedError

    def train_round(self, round_index, shared_state):
        shared, self._readonly = split_readonly(shared_state or {})
        if self.in_stage2(round_index):
            self.lr_scheduler = StagePolyLR(self.optimizer, self.stage2_lr, int(self.stage2_rounds),
                                            self.stage1_rounds)
        return super().train_round(round_index, shared)

    def before_local_training(self, shared_state):
        if self.in_stage2(self.current_epoch):
            if self._readonly:
                self.enter_stage2(self._readonly)
            for name, p in self.unwrapped_network.named_parameters():
                p.requires_grad_(self.stage2_trainable(name))

    def update_arrays(self, round_index: int) -> Dict[str, np.ndarray]:
        if self.in_stage2(round_index):
            return {}
        arrays = self.shared_state()
        if round_index == self.stage1_rounds - 1 and int(self.stage2_rounds) > 0:
            arrays.update({READONLY + k: v for k, v in self.readonly_state().items()})
        return arrays


def as_tensor(array, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).to(device=like.device, dtype=like.dtype)
