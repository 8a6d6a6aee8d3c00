"""Methods with a federated stage followed by a local stage that uses read-only copies of the other sites' parts
(LC-Fed's head calibration, FedDP's inter-site guided calibration).

``--rounds R`` counts both stages; the last ``stage2_rounds`` rounds are the second stage (default: the share
``stage2_fraction`` of the rounds, as the papers spend a fifth of their training on the second stage). In the last
round of the first stage every site also sends the parts the others need (under ``readonly/``); the server hands
all of them to every site with the first second-stage round that site attends (``readonly/<site index>/<key>``)
and merges nothing afterwards. Learning rates: nnU-Net's poly schedule over the first stage's rounds, then a fresh
poly schedule from ``stage2_lr`` over the second stage.

A site that did not answer in the last round of the first stage has handed over nothing: every site then
calibrates against the parts of the sites that did (its own parts always from itself), with a warning that names
the missing site indices; fewer than two sites' parts is an error.
"""
import math
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from fednnunet.networks import plans_with_network
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
    #: stage2_rounds None: the share stage2_fraction of the rounds (at least one when there are two rounds or more)
    hyperparameters = {'stage2_rounds': None, 'stage2_fraction': 0.2, 'stage2_lr': 1e-2}
    #: what the second stage is, and what the method is without it (for the warning when it has no second stage)
    stage2_name = 'the second stage'
    without_stage2 = 'the first stage alone'

    @classmethod
    def resolve_hyperparameters(cls, given: dict, rounds: int) -> Tuple[dict, List[str]]:
        values, notes = super().resolve_hyperparameters(given, rounds)
        if values.get('stage2_rounds') is None:
            fraction = float(values['stage2_fraction'])
            if not 0 <= fraction < 1:
                raise ValueError(f'{cls.method_name}: stage2_fraction must be in [0, 1), not {fraction}')
            # a fifth of 20 rounds is 4; at least one round when there are two or more, never every round
            values['stage2_rounds'] = min(max(1, math.floor(fraction * rounds + 0.5)), rounds - 1) if fraction else 0
        values['stage2_rounds'] = int(values['stage2_rounds'])
        if not 0 <= values['stage2_rounds'] < rounds:
            raise ValueError(f'{cls.method_name}: stage2_rounds must be in [0, rounds); got '
                             f'{values["stage2_rounds"]} of {rounds} rounds')
        if values['stage2_rounds'] == 0:
            notes.append(f'{cls.method_name} without its second stage ({cls.stage2_name}): stage2_rounds is 0, so '
                         f'this run is {cls.without_stage2}')
        return values, notes

    # ------------------------------------------------------------------ architecture
    @classmethod
    def architecture_kwargs(cls, plans: dict, configuration: str, num_sites: int, site_index: int,
                            hyperparameters: dict, dataset_json: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def adapt_plans(cls, plans, configuration, num_sites, site_index, hyperparameters, dataset_json):
        values = dict(cls.hyperparameters)
        values.update(hyperparameters or {})
        return plans_with_network(plans, configuration, cls.network_class_name,
                                  cls.architecture_kwargs(plans, configuration, num_sites, site_index, values,
                                                          dataset_json), cls.method_name)

    # ------------------------------------------------------------------ stages
    @property
    def stage1_rounds(self) -> int:
        return self.num_epochs - int(self.stage2_rounds)

    def in_stage2(self, round_index: int) -> bool:
        return round_index >= self.stage1_rounds

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.stage1_rounds)

    @classmethod
    def readonly_keys(cls, network) -> List[str]:
        """The state keys the other sites need from this site in the second stage (sent once, read-only); the
        server checks updates against them."""
        raise NotImplementedError

    def readonly_state(self) -> Dict[str, np.ndarray]:
        """This site's read-only parts (:meth:`readonly_keys`), as sent."""
        sd = self.unwrapped_network.state_dict()
        return {k: sd[k].detach().cpu().numpy() for k in self.readonly_keys(self.unwrapped_network)}

    def enter_stage2(self, readonly: Dict[int, Dict[str, np.ndarray]]):
        """Set up the second stage with every site's read-only parts ({site index: {key: array}}, completed by
        :meth:`handed_over_parts`)."""
        raise NotImplementedError

    def handed_over_parts(self, readonly: Dict[int, Dict[str, np.ndarray]]) -> Dict[int, Dict[str, np.ndarray]]:
        """The parts received, plus the site's own (from itself, if the server had none: the site missed the last
        first-stage round). Sites whose parts never arrived are named in a warning; the second stage needs the parts
        of at least one other site."""
        parts = dict(readonly)
        unknown = sorted(i for i in parts if not 0 <= i < self.num_sites)
        if unknown:
            raise ValueError(f"site '{self.site_name}': read-only parts for site index(es) {unknown}, but the "
                             f"federation has {self.num_sites} sites")
        parts.setdefault(self.site_index, self.readonly_state())
        if len(parts) < 2:
            raise ValueError(f"site '{self.site_name}': no other site's parts arrived for {self.stage2_name} "
                             f"(every other site missed the last round of the first stage)")
        missing = sorted(set(range(self.num_sites)) - set(parts))
        if missing:
            text = (f"site '{self.site_name}': {self.stage2_name} uses the parts of site indices {sorted(parts)}; "
                    f"site index(es) {missing} handed over nothing (they missed the last round of the first stage)")
            warnings.warn(text)
            self.print_to_log_file(text, also_print_to_console=True)
        return parts

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
                self.enter_stage2(self.handed_over_parts(self._readonly))
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
