"""Semi-supervised FedAvg with FixMatch's pseudo-labelling at every site (Sohn et al., NeurIPS 2020; federated as
in FedAvg): one shared network, every weight averaged.

A site trains nnU-Net's supervised step on its labelled cases, and adds, in the same gradient step, an unlabelled
term on its unlabelled cases (``sites.json`` ``unlabelled``): the network's prediction on the weak view of a patch
(nnU-Net's augmentation) gives a pseudo-label per voxel (the argmax) and a confidence (the softmax maximum); the
strong view (the weak view plus intensity and noise transforms, :mod:`fednnunet.unlabelled_data`) is trained to
that pseudo-label with cross-entropy where the confidence is at least ``confidence``:

    L_u = mean over voxels of 1[conf >= confidence] * CE(f(strong), argmax f(weak)),   loss = nnU-Net's + w_u * L_u

(the mean runs over every voxel, so few confident voxels give a small term, as in FixMatch). The first
``warmup_rounds`` rounds (default a tenth of the rounds) train without it, so that pseudo-labels come from a model
that has learnt something. The weak-view pass runs without gradients; both passes use the highest-resolution
output of nnU-Net's deep supervision. This is the homogeneous semi-supervised baseline of issue 13; HSSF's own
pseudo-labelling (a confidence head, reliable pseudo-label generation, per-image gates) is not this.
"""
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fednnunet.errors import FederationError
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.unlabelled_data import split_views


class FedFixMatchTrainer(FedAvgTrainer):
    method_name = 'fedfixmatch'
    uses_unlabelled_data = True
    hyperparameters = {**FedAvgTrainer.hyperparameters, 'unlabelled_weight': 1.0, 'confidence': 0.95,
                       'warmup_rounds': None, 'warmup_fraction': 0.1}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise FederationError('fedfixmatch pseudo-labels with a softmax over labels; this dataset trains regions '
                                  '(sigmoid outputs), which it does not support', field='method')
        self._unlabelled_stats: List[Tuple[float, float]] = []
        self._strong_view: Optional[torch.Tensor] = None

    @classmethod
    def resolve_hyperparameters(cls, given: dict, rounds: int) -> Tuple[dict, List[str]]:
        values, notes = super().resolve_hyperparameters(given, rounds)

        def number(key: str, low: float, high: float) -> float:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
                raise FederationError(f'{key} must be a number in [{low}, {high}], not {v!r}', field=key)
            return float(v)

        if values['warmup_rounds'] is None:
            fraction = number('warmup_fraction', 0, 1)
            if fraction == 1:
                raise FederationError('warmup_fraction must be below 1 (no round would use the unlabelled cases)',
                                      field='warmup_fraction')
            values['warmup_rounds'] = int(math.floor(fraction * rounds + 0.5))
        warmup = number('warmup_rounds', 0, rounds - 1)
        if warmup != int(warmup):
            raise FederationError(f"warmup_rounds must be a whole number of rounds, not {values['warmup_rounds']}",
                                  field='warmup_rounds')
        values['warmup_rounds'] = int(warmup)
        values['confidence'] = number('confidence', 0, 1)
        values['unlabelled_weight'] = number('unlabelled_weight', 0, 1e6)
        if values['unlabelled_weight'] == 0:
            notes.append('fedfixmatch with unlabelled_weight 0 is FedAvg on the labelled cases only')
        return values, notes

    def uses_unlabelled_this_round(self) -> bool:
        return self.current_epoch >= self.warmup_rounds and self.unlabelled_weight > 0 and self.has_unlabelled_data

    def can_train_this_round(self) -> bool:
        return super().can_train_this_round() or self.uses_unlabelled_this_round()

    def pseudo_label_loss(self, teacher: torch.Tensor, strong: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """(L_u, the share of confident voxels): the strong view trained to the pseudo-labels of the weak view's
        logits ``teacher`` (no gradient through them)."""
        confidence, pseudo = torch.softmax(teacher.detach().float(), 1).max(1)
        mask = (confidence >= self.confidence).float()
        student = self.full_resolution_output(strong)
        ce = F.cross_entropy(student.float(), pseudo, reduction='none')
        return (ce * mask).mean(), float(mask.mean())

    def unlabelled_loss(self, data: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """(L_u, the share of confident voxels) for a two-view batch (weak and strong views on the channel axis)."""
        weak, strong = split_views(data)
        with torch.no_grad():
            teacher = self.full_resolution_output(weak)
        return self.pseudo_label_loss(teacher, strong)

    def unlabelled_step(self) -> dict:
        """A local iteration at a site without labelled training cases: nnU-Net's train_step on the weak view of an
        unlabelled batch, whose loss is L_u alone (the weak view's output, detached, is the pseudo-label source)."""
        batch = next(self.get_unlabelled_dataloader())
        weak, self._strong_view = split_views(batch['data'])
        self.unlabelled_only = True
        try:
            return self.train_step({'data': weak, 'target': batch['target']})
        finally:
            self.unlabelled_only, self._strong_view = False, None

    def extra_loss(self, output, target):
        if self.unlabelled_only:  # output: the weak view's (unlabelled_step)
            teacher = output[0] if isinstance(output, (list, tuple)) else output
            loss, share = self.pseudo_label_loss(teacher, self._strong_view.to(self.device, non_blocking=True))
        elif self.uses_unlabelled_this_round():
            batch = next(self.get_unlabelled_dataloader())
            loss, share = self.unlabelled_loss(batch['data'].to(self.device, non_blocking=True))
        else:
            return None
        self._unlabelled_stats.append((float(loss.detach()), share))
        return self.unlabelled_weight * loss

    def train_round(self, round_index: int, shared_state: Optional[Dict[str, np.ndarray]]):
        self._unlabelled_stats = []
        arrays, metrics = super().train_round(round_index, shared_state)
        if self._unlabelled_stats:
            loss, share = np.mean(self._unlabelled_stats, axis=0)
            metrics.update({'unlabelled_loss': float(loss), 'confident_share': float(share)})
            self.print_to_log_file(f'round {round_index}: unlabelled term over {len(self._unlabelled_stats)} steps: '
                                   f'loss {loss:.4f}, confident voxels {share:.1%}')
        elif not self.has_unlabelled_data:
            self.print_to_log_file(f'round {round_index}: this site has no unlabelled cases; labelled cases only')
        elif round_index < self.warmup_rounds:
            self.print_to_log_file(f'round {round_index}: warm-up, no unlabelled term')
        return arrays, metrics
