"""FedDP (Wang, Jin, Stoyanov, Wang, TMI 2023) on nnU-Net. See documentation/methods/feddp.md.

Stage 1 (federated): the planned U-Net with self-attention blocks at its lowest-resolution encoder stages; every
query projection stays at its site (Local Query), everything else is averaged. Stage 2, inter-site guided
calibration (the last ``stage2_rounds`` rounds, local): each site fine-tunes with nnU-Net's loss
+ lambda * mean(U * CE) (regions: BCE), where U is the per-voxel disagreement of the sites' final models: the
standard deviation across sites of their softmax (regions: sigmoid) outputs, averaged over classes and divided by
its maximum per case. The sites' final models are the final federated model with each site's queries (after the
last merge they differ only there): the site keeps one frozen reference network, built on its own from the plans
and independent of the network it trains, and swaps each site's queries into it.
"""
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fednnunet.networks.feddp import query_keys
from fednnunet.trainers.base import canonical_state, expand_aliases, state_dict_aliases
from fednnunet.trainers.two_stage import TwoStageTrainer


def igc_weight(probabilities: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """U from the sites' probabilities (K, B, C, *spatial): the standard deviation across sites, averaged over
    classes, divided by its maximum per case. Shape (B, 1, *spatial)."""
    u = probabilities.std(0, unbiased=False).mean(1, keepdim=True)
    return u / (u.flatten(1).amax(1).view(-1, *([1] * (u.ndim - 1))) + eps)


def igc_term(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, lam: float,
             region_based: bool = False, has_ignore_label: bool = False, ignore_label: Optional[int] = None
             ) -> torch.Tensor:
    """lambda * mean(U * loss) over the voxels that are not ignored: the per-voxel cross-entropy (``target``: the
    label map (B, 1, *spatial)) or, for regions, the binary cross-entropy averaged over regions (``target``: nnU-Net's
    region maps (B, R[+1 ignore mask], *spatial)), weighted by the inter-site disagreement ``weight`` (B, 1, ...)."""
    mask = None
    if region_based:
        regions = target.float()
        if has_ignore_label:  # nnU-Net appends the ignore mask as the last channel
            mask, regions = 1 - regions[:, -1:], regions[:, :-1]
        loss = F.binary_cross_entropy_with_logits(logits.float(), regions, reduction='none').mean(1, keepdim=True)
    else:
        labels = target[:, 0].long()
        if has_ignore_label:
            valid = labels != ignore_label
            mask, labels = valid[:, None].float(), torch.where(valid, labels, torch.zeros_like(labels))
        loss = F.cross_entropy(logits.float(), labels, reduction='none')[:, None]
    weighted = weight * loss
    if mask is None:
        return lam * weighted.mean()
    return lam * (weighted * mask).sum() / mask.sum().clamp_min(1)


class FedDPTrainer(TwoStageTrainer):
    method_name = 'feddp'
    network_class_name = 'fednnunet.networks.feddp.FedDPUNet'
    hyperparameters = {'attention_stages': 2, 'igc_lambda': 1.0, 'stage2_rounds': None, 'stage2_fraction': 0.2,
                       'stage2_lr': 1e-3}
    stage2_name = 'inter-site guided calibration'
    without_stage2 = 'FedAvg with local attention queries'

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.reference: Optional[torch.nn.Module] = None  # the final federated model, each site's queries swapped in
        self.query_sets: Dict[int, Dict[str, torch.Tensor]] = {}
        self.reference_state: Optional[dict] = None
        self._last_input = None

    @classmethod
    def architecture_kwargs(cls, plans, configuration, num_sites, site_index, hyperparameters, dataset_json):
        return {'attention_stages': int(hyperparameters['attention_stages'])}

    @classmethod
    def local_keys(cls, network):
        return query_keys(network)

    def initialize(self):
        super().initialize()
        self.network.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module, inputs):
        self._last_input = inputs[0]

    # stage 2: inter-site guided calibration
    @classmethod
    def readonly_keys(cls, network):
        """Every query projection: with the final global weights they make the site's final model."""
        return query_keys(network)

    def enter_stage2(self, readonly):
        self.query_sets = {i: {k: torch.from_numpy(np.array(v)) for k, v in q.items()} for i, q in readonly.items()}
        self.reference_state = {k: v.detach().cpu().clone()
                                for k, v in canonical_state(self.unwrapped_network).items()}
        self._build_reference()

    def _build_reference(self):
        """The frozen reference network: built from the plans like the trained one (nnU-Net's
        build_network_architecture), never a copy of it, so nothing it runs is shared with the live network. Its
        random initialisation is overwritten at once and does not touch the training's random stream."""
        with torch.random.fork_rng(devices=[]):
            reference = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                        self.num_input_channels,
                                                        self.label_manager.num_segmentation_heads,
                                                        enable_deep_supervision=False)
        reference.load_state_dict(expand_aliases(self.reference_state, state_dict_aliases(reference)))
        reference.to(self.device).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        self.reference = reference
        # built once, not per step: the reference's query tensors (copy_ targets) and every site's queries on the device
        self._reference_tensors = reference.state_dict()
        self._device_queries = {i: {k: v.to(self.device) for k, v in q.items()} for i, q in self.query_sets.items()}

    def stage2_trainable(self, name: str) -> bool:
        return True

    def disagreement(self, x: torch.Tensor) -> torch.Tensor:
        """U (B, 1, *spatial): std over sites of the sites' final models' probabilities, mean over classes, / max
        per case."""
        regions = self.label_manager.has_regions
        with torch.no_grad():
            probabilities = []
            for i in sorted(self._device_queries):
                for k, v in self._device_queries[i].items():
                    self._reference_tensors[k].copy_(v)
                logits = self.reference(x).float()
                probabilities.append(torch.sigmoid(logits) if regions else torch.softmax(logits, 1))
            return igc_weight(torch.stack(probabilities))

    def extra_loss(self, output, target):
        if not self.in_stage2(self.current_epoch) or self.reference is None or self.igc_lambda == 0:
            return None
        logits = output[0] if isinstance(output, (list, tuple)) else output
        target = target[0] if isinstance(target, (list, tuple)) else target
        lm = self.label_manager
        return igc_term(logits, target, self.disagreement(self._last_input), self.igc_lambda, lm.has_regions,
                        lm.has_ignore_label, lm.ignore_label)

    def method_state(self) -> dict:
        if self.reference_state is None:
            return {}
        return {'reference': self.reference_state, 'queries': {str(i): q for i, q in self.query_sets.items()}}

    def load_method_state(self, state: dict):
        if state:
            self.reference_state = state['reference']
            self.query_sets = {int(i): q for i, q in state['queries'].items()}
            self._build_reference()
