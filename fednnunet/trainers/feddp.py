"""FedDP (Wang, Jin, Stoyanov, Wang, TMI 2023) on nnU-Net. See documentation/methods/feddp.md.

Stage 1 (federated): the planned U-Net with self-attention blocks at its lowest-resolution encoder stages; every
query projection stays at its site (Local Query), everything else is averaged. Stage 2, inter-site guided
calibration (the last ``stage2_rounds`` rounds, local): each site fine-tunes with
nnU-Net's loss + lambda * mean(U * CE), where U is the per-voxel disagreement of all sites' final models (the
final global model with each site's queries, received read-only once, frozen): the standard deviation across
sites of their softmax outputs, averaged over classes and divided by its maximum per case.
"""
import copy
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fednnunet.networks.feddp import query_keys
from fednnunet.trainers.base import canonical_state, expand_aliases, state_dict_aliases
from fednnunet.trainers.two_stage import TwoStageTrainer


def igc_weight(probabilities: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """U from the sites' softmax outputs (K, B, C, *spatial): the standard deviation across sites, averaged over
    classes, divided by its maximum per case. Shape (B, 1, *spatial)."""
    u = probabilities.std(0, unbiased=False).mean(1, keepdim=True)
    return u / (u.flatten(1).amax(1).view(-1, *([1] * (u.ndim - 1))) + eps)


def igc_term(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, lam: float,
             ignore_index: int = -100) -> torch.Tensor:
    """lambda * mean(U * CE) over voxels: cross-entropy weighted by the inter-site disagreement."""
    ce = F.cross_entropy(logits.float(), labels, reduction='none', ignore_index=ignore_index)
    return lam * torch.mean(weight[:, 0] * ce)


class FedDPTrainer(TwoStageTrainer):
    method_name = 'feddp'
    network_class_name = 'fednnunet.networks.feddp.FedDPUNet'
    hyperparameters = {'attention_stages': 2, 'igc_lambda': 1.0, 'stage2_rounds': 0, 'stage2_lr': 1e-3}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.frozen: Optional[torch.nn.Module] = None  # the final federated model, queries swapped per site
        self.query_sets: Dict[int, Dict[str, torch.Tensor]] = {}
        self.frozen_state: Optional[dict] = None
        self._last_input = None

    @classmethod
    def architecture_kwargs(cls, plans, configuration, num_sites, site_index, hyperparameters):
        return {'attention_stages': int(hyperparameters['attention_stages'])}

    @classmethod
    def local_keys(cls, network):
        return query_keys(network)

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:
            raise NotImplementedError('FedDP here calibrates softmax outputs; region-based (sigmoid) datasets are '
                                      'not supported')
        self.network.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module, inputs):
        self._last_input = inputs[0]

    # stage 2: inter-site guided calibration
    def readonly_state(self):
        sd = self.unwrapped_network.state_dict()
        return {k: sd[k].detach().cpu().numpy() for k in query_keys(self.unwrapped_network)}

    def enter_stage2(self, readonly):
        self.query_sets = {i: {k: torch.from_numpy(np.array(v)) for k, v in q.items()} for i, q in readonly.items()}
        self.frozen_state = {k: v.detach().cpu().clone() for k, v in canonical_state(self.unwrapped_network).items()}
        self._build_frozen()

    def _build_frozen(self):
        self.frozen = copy.deepcopy(self.unwrapped_network)
        self.frozen.load_state_dict(expand_aliases(self.frozen_state, state_dict_aliases(self.frozen)))
        self.frozen.decoder.deep_supervision = False
        self.frozen.eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        # built once, not per step: the frozen model's tensors (copy_ targets) and every site's queries on the device
        self._frozen_tensors = self.frozen.state_dict()
        self._device_queries = {i: {k: v.to(self.device) for k, v in q.items()} for i, q in self.query_sets.items()}

    def stage2_trainable(self, name: str) -> bool:
        return True

    def disagreement(self, x: torch.Tensor) -> torch.Tensor:
        """U (B, 1, *spatial): std over sites of the frozen models' softmax, mean over classes, / max per case."""
        with torch.no_grad():
            probabilities = []
            for i in sorted(self._device_queries):
                for k, v in self._device_queries[i].items():
                    self._frozen_tensors[k].copy_(v)
                probabilities.append(torch.softmax(self.frozen(x).float(), 1))
            return igc_weight(torch.stack(probabilities))

    def extra_loss(self, output, target):
        if not self.in_stage2(self.current_epoch) or self.frozen is None or self.igc_lambda == 0:
            return None
        logits = output[0] if isinstance(output, (list, tuple)) else output
        labels = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        ignore = self.label_manager.ignore_label
        return igc_term(logits, labels, self.disagreement(self._last_input), self.igc_lambda,
                        ignore if ignore is not None else -100)

    def method_state(self) -> dict:
        if self.frozen_state is None:
            return {}
        return {'frozen': self.frozen_state,
                'queries': {str(i): q for i, q in self.query_sets.items()}}

    def load_method_state(self, state: dict):
        if state:
            self.frozen_state = state['frozen']
            self.query_sets = {int(i): q for i, q in state['queries'].items()}
            self._build_frozen()
