"""HSSF: semi-supervised, model-heterogeneous federated segmentation (Ma et al., IEEE TMI 2024; issue 13).

No weights travel: every party (each site, and the server) trains its own network, possibly of a different
architecture (per-site networks, :mod:`fednnunet.planners.site_networks`), and knowledge travels as predictions on a
fixed bank of patches of the server's labelled public set (:mod:`fednnunet.public_patches`,
:mod:`fednnunet.knowledge`). Every network carries a self-assessment (SA) head on its last decoder features and logits
(:mod:`fednnunet.networks.self_assessment`) that predicts, per voxel, whether the segmentation is right.

At a **site**, every local iteration is one optimizer step (nnU-Net's ``train_step``: AMP, gradient clipping) on

- client refinement (RF) on a minibatch of the public bank: nnU-Net's Dice+CE (deep supervision) + ``confidence_weight``
  x the SA head's weighted BCE + ``kl_weight`` x KL(server || site) at temperature ``temperature``, per patch only where
  the server's reliable-pseudo-label accuracy is higher than the site's own accuracy (after the warm-up);
- where the site has labelled training cases: nnU-Net's Dice+CE and the SA loss on a batch of them;
- local semi-supervised learning (LSSL) on a batch of its unlabelled cases (after the warm-up): weak and strong views
  (:mod:`fednnunet.unlabelled_data`), the pseudo-label per voxel from the view whose SA confidence is higher, flipped to
  the runner-up class where that confidence is below ``rpg_threshold`` (RPG), images kept where their mean confidence
  exceeds ``image_threshold``, nnU-Net's Dice+CE on both views to those labels (``unlabelled_weight``), and
  feature-perturbation consistency between the weak view's logits and the logits of its dropped-out last decoder
  features (``fp_weight``, dropout ``fp_dropout``).

At the **server** (the same trainer on the public set), every local iteration is nnU-Net's supervised step on its own
augmented public set + the SA loss + (after the warm-up) server rectification (RC): on a minibatch of the bank, with
Gaussian noise (``rc_noise``) on the images, KL(best site || server) per patch, the best site being the one whose
reliable-pseudo-label accuracy on that patch is the highest, if it beats the server's own and ``teacher_threshold``.
A site's accuracy is computed by the receiver from its predictions and the bank's labels: a site cannot claim to be
accurate, it has to be.

What a site sends (after the warm-up): its probabilities and SA confidence on the bank, float16. What it keeps: its
network (an nnU-Net checkpoint, loadable by nnU-Net's predictor), its SA head (in its round state) and the bank.
documentation/methods/hssf.md lists the deviations from the paper.
"""
import math
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from fednnunet import knowledge, public_patches
from fednnunet.errors import FederationError
from fednnunet.federation import SERVER_DATA
from fednnunet.networks.self_assessment import SelfAssessment
from fednnunet.trainers import hssf_losses as L
from fednnunet.trainers.base import FederatedTrainer
from fednnunet.unlabelled_data import split_views

#: the key prefix of a site's predictions as the server's trainer receives them: ``knowledge/site/<index>/...``
SITE_KNOWLEDGE = 'knowledge/site/'


def site_knowledge_keys(index: int) -> Tuple[str, str]:
    return (f'{SITE_KNOWLEDGE}{index}/probabilities', f'{SITE_KNOWLEDGE}{index}/confidence')


class HSSFTrainer(FederatedTrainer):
    method_name = 'hssf'
    has_local_parts = True  # nothing is merged: every party has its own model
    uses_unlabelled_data = True
    trains_site_networks = True
    uses_hooks = True  # the SA head reads the last decoder layer through a forward hook
    hyperparameters = {'warmup_rounds': None, 'warmup_fraction': 0.1, 'public_patches': 16, 'lr': 1e-4,
                       'weight_decay': 0.02, 'confidence_weight': 4.0, 'kl_weight': 10.0, 'temperature': 2.0,
                       'unlabelled_weight': 1.0, 'fp_weight': 1.0, 'fp_dropout': 0.5, 'rpg_threshold': 0.3,
                       'image_threshold': 0.75, 'teacher_threshold': 0.75, 'rc_noise': 0.1}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise FederationError('hssf pseudo-labels with a softmax over labels; this dataset trains regions or has an '
                                  'ignore label, which it does not support', field='method')
        self.assessment: Optional[SelfAssessment] = None
        self.bank: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # images, labels (CPU)
        self._bank_targets = None  # the labels at nnU-Net's deep-supervision scales
        self.teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the server's probabilities, confidence
        self.site_teachers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # at the server: each site's
        self._batch_indices: Optional[np.ndarray] = None
        self._stats = defaultdict(list)

    @classmethod
    def local_keys(cls, network):
        return list(network.state_dict())

    @classmethod
    def resolve_hyperparameters(cls, given: dict, rounds: int) -> Tuple[dict, List[str]]:
        values, notes = super().resolve_hyperparameters(given, rounds)

        def number(key: str, low: float, high: float, low_open: bool = False) -> float:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high \
                    or (low_open and v == low):
                raise FederationError(f"{key} must be a number in {'(' if low_open else '['}{low}, {high}], not {v!r}",
                                      field=key)
            return float(v)

        def whole(key: str, low: int, high: int) -> int:
            v = number(key, low, high)
            if v != int(v):
                raise FederationError(f'{key} must be a whole number, not {values[key]!r}', field=key)
            return int(v)

        if values['warmup_rounds'] is None:
            values['warmup_rounds'] = int(math.floor(number('warmup_fraction', 0, 1) * rounds + 0.5))
        values['warmup_rounds'] = whole('warmup_rounds', 0, rounds)
        values['public_patches'] = whole('public_patches', 1, public_patches.MAX_PATCHES)
        values['lr'] = number('lr', 0, 10, low_open=True)
        values['temperature'] = number('temperature', 0, 100, low_open=True)
        for key in ('weight_decay', 'confidence_weight', 'kl_weight', 'unlabelled_weight', 'fp_weight', 'rc_noise'):
            values[key] = number(key, 0, 1e6)
        for key in ('fp_dropout', 'rpg_threshold', 'image_threshold', 'teacher_threshold', 'warmup_fraction'):
            values[key] = number(key, 0, 1)
        if values['warmup_rounds'] >= rounds:
            notes.append(f"hssf: the warm-up lasts all {rounds} rounds: no knowledge is exchanged and the unlabelled "
                         f"cases are never used")
        return values, notes

    # ------------------------------------------------------------------ network, head, optimizer
    @property
    def is_server(self) -> bool:
        return self.site_name == SERVER_DATA

    def configure_optimizers(self):
        """AdamW (the paper's, ``lr``, ``weight_decay``) over the U-Net and its SA head, nnU-Net's poly schedule over
        the rounds. The head is attached here: nnU-Net builds the network just before."""
        if self.assessment is None:
            self.assessment = SelfAssessment(self.unwrapped_network, self.label_manager.num_segmentation_heads)
            self.assessment.head.to(self.device)
        parameters = list(self.network.parameters()) + list(self.assessment.head.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.lr, self.num_epochs)

    def confidence(self) -> torch.Tensor:
        """The SA head's confidence logits (B, 1, ...) on the network's latest forward."""
        return self.assessment.confidence_logits()

    def method_state(self) -> dict:
        state = {'head': self.assessment.head.state_dict()}
        if self.bank is not None:
            state['bank_images'], state['bank_labels'] = self.bank
        return state

    def load_method_state(self, state: dict):
        self.assessment.head.load_state_dict(state['head'])
        if 'bank_images' in state:
            self.set_bank(state['bank_images'].numpy(), state['bank_labels'].numpy())

    # ------------------------------------------------------------------ what arrives
    def set_bank(self, images: np.ndarray, labels: np.ndarray):
        self.bank = (torch.from_numpy(np.array(images, dtype=np.float32)),
                     torch.from_numpy(np.array(labels, dtype=np.int16)))
        transforms = self.get_validation_transforms(self._get_deep_supervision_scales(), False,
                                                    self.label_manager.foreground_labels, None, None)
        targets = [transforms(image=self.bank[0][i], segmentation=self.bank[1][i])['segmentation']
                   for i in range(len(self.bank[0]))]
        self._bank_targets = ([torch.stack([t[s] for t in targets]) for s in range(len(targets[0]))]
                              if isinstance(targets[0], list) else torch.stack(targets))

    def take_arrays(self, arrays: Dict[str, np.ndarray]):
        """The bank and the knowledge the server sent (checked: a malicious server cannot feed a site NaN, a wrong
        shape or labels the dataset lacks); anything else is refused."""
        arrays = dict(arrays)
        patch = self.configuration_manager.patch_size
        if public_patches.IMAGES in arrays or public_patches.LABELS in arrays:
            images, labels = public_patches.check_public_patches(
                {k: arrays.pop(k, None) for k in public_patches.KEYS}, self.num_input_channels, patch,
                self.label_manager.all_labels, self.site_name)
            self.set_bank(images, labels)
        if self.bank is None:
            raise FederationError('hssf trains on the public patch bank, and the server has not sent it',
                                  site=self.site_name, field='public patches')
        n, classes = len(self.bank[0]), self.label_manager.num_segmentation_heads
        self.teacher, self.site_teachers = None, {}
        if knowledge.PROBABILITIES in arrays or knowledge.CONFIDENCE in arrays:
            p, c = knowledge.check_predictions({k: arrays.pop(k, None) for k in (knowledge.PROBABILITIES,
                                                                                  knowledge.CONFIDENCE)},
                                               n, classes, patch, SERVER_DATA)
            self.teacher = (torch.from_numpy(p), torch.from_numpy(c))
        if self.is_server:
            for index in sorted({k[len(SITE_KNOWLEDGE):].split('/')[0] for k in arrays if k.startswith(SITE_KNOWLEDGE)}):
                if not index.isdigit() or int(index) >= self.num_sites - 1:  # the public set's index comes last
                    raise FederationError(f'knowledge of site index {index!r} (there are {self.num_sites - 1} sites)',
                                          field='knowledge')
                keys = site_knowledge_keys(int(index))
                p, c = knowledge.check_predictions(
                    {knowledge.PROBABILITIES: arrays.pop(keys[0], None), knowledge.CONFIDENCE: arrays.pop(keys[1], None)},
                    n, classes, patch, f'site index {index}')
                self.site_teachers[int(index)] = (torch.from_numpy(p), torch.from_numpy(c))
        if arrays:
            raise FederationError(f'hssf received arrays it does not use: {sorted(arrays)[:5]}', site=self.site_name,
                                  field='arrays')

    # ------------------------------------------------------------------ the round
    def after_warmup(self) -> bool:
        return self.current_epoch >= self.warmup_rounds

    def can_train_this_round(self) -> bool:
        return self.bank is not None

    def train_round(self, round_index: int, shared_state: Optional[Dict[str, np.ndarray]]):
        self.current_epoch = round_index
        self.take_arrays(shared_state or {})
        self._stats = defaultdict(list)
        _, metrics = super().train_round(round_index, None)
        for key, values in self._stats.items():
            metrics[key] = float(np.mean(values))
        if self._stats:
            self.print_to_log_file(f'round {round_index}: ' + ', '.join(f'{k} {metrics[k]:.4f}' for k in
                                                                      sorted(self._stats)))
        sends = self.is_server or round_index >= self.warmup_rounds
        return (self.predict_bank() if sends else {}), metrics

    def local_step(self) -> dict:
        """nnU-Net's train_step on the party's supervised batch (the server: its public set through nnU-Net's loader;
        a site: a minibatch of the bank), the method's other terms added by :meth:`extra_loss`."""
        if self.is_server:
            return self.train_step(next(self.dataloader_train))
        idx = np.random.choice(len(self.bank[0]), self.batch_size, replace=len(self.bank[0]) < self.batch_size)
        self._batch_indices = idx
        target = ([t[idx] for t in self._bank_targets] if isinstance(self._bank_targets, list)
                  else self._bank_targets[idx])
        return self.train_step({'data': self.bank[0][idx], 'target': target})

    def extra_loss(self, output, target):
        logits = output[0] if isinstance(output, (list, tuple)) else output
        labels = target[0] if isinstance(target, (list, tuple)) else target
        loss = self.confidence_weight * self._record('confidence_loss',
                                                     L.confidence_loss(self.confidence(), logits, labels))
        if self.is_server:
            if self.after_warmup() and self.site_teachers and self.kl_weight > 0:
                loss = loss + self.kl_weight * self._record('rc_kl', self.rectification_loss())
            return loss
        if self.after_warmup() and self.teacher is not None and self.kl_weight > 0:
            loss = loss + self.kl_weight * self._record('rf_kl', self.refinement_loss(logits, labels))
        if self.dataloader_train is not None:
            loss = loss + self._record('labelled_loss', self.labelled_loss())
        if self.after_warmup() and self.has_unlabelled_data and (self.unlabelled_weight > 0 or self.fp_weight > 0):
            loss = loss + self.unlabelled_loss()
        return loss

    def _record(self, key: str, value: torch.Tensor) -> torch.Tensor:
        self._stats[key].append(float(value.detach()))
        return value

    def teacher_accuracy(self, probabilities: torch.Tensor, confidence: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        """Per patch: the accuracy of a party's reliable pseudo-labels (RPG on its probabilities and confidence)."""
        rpg = L.reliable_pseudo_labels(probabilities, confidence[:, 0], self.rpg_threshold)
        return L.pixel_accuracy(rpg, labels)

    def refinement_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """RF: KL(server || site) on the bank minibatch, per patch where the server is more accurate than the site."""
        idx = torch.as_tensor(self._batch_indices)
        p, c = (t[idx].to(self.device) for t in self.teacher)
        gate = (self.teacher_accuracy(p, c, labels) > L.pixel_accuracy(logits.detach().argmax(1), labels)).float()
        self._stats['rf_gate'].append(float(gate.mean()))
        return L.gated_kl(logits, torch.log(p.clamp_min(1e-6)), gate, self.temperature)

    def rectification_loss(self) -> torch.Tensor:
        """RC at the server: KL(best site || server) on a noisy bank minibatch, per patch."""
        n = len(self.bank[0])
        idx = torch.as_tensor(np.random.choice(n, self.batch_size, replace=n < self.batch_size))
        images = self.bank[0][idx].to(self.device)
        labels = self.bank[1][idx].to(self.device)
        images = images + self.rc_noise * torch.randn_like(images)
        logits = self.full_resolution_output(images)
        own = self.teacher_accuracy(torch.softmax(logits.detach().float(), 1), torch.sigmoid(self.confidence().detach()),
                                    labels)
        accuracies, teachers = [], []
        for p, c in self.site_teachers.values():
            p, c = p[idx].to(self.device), c[idx].to(self.device)
            accuracies.append(self.teacher_accuracy(p, c, labels))
            teachers.append(torch.log(p.clamp_min(1e-6)))
        teacher, gate = L.best_teacher(own, logits, accuracies, teachers, self.teacher_threshold)
        self._stats['rc_gate'].append(float(gate.mean()))
        return L.gated_kl(logits, teacher, gate, self.temperature)

    def labelled_loss(self) -> torch.Tensor:
        """nnU-Net's loss (deep supervision) and the SA loss on a batch of the site's labelled training cases."""
        batch = next(self.dataloader_train)
        target = batch['target']
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        output = self.network(batch['data'].to(self.device))
        logits = output[0] if isinstance(output, (list, tuple)) else output
        full = target[0] if isinstance(target, list) else target
        return self.loss.loss(output, target) + self.confidence_weight * L.confidence_loss(self.confidence(), logits,
                                                                                           full)

    def dice_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """nnU-Net's Dice+CE (the full-resolution term of its deep-supervision loss) against labels (B, 1, ...)."""
        inner = self.loss.loss
        inner = getattr(inner, 'loss', inner)  # nnU-Net's DeepSupervisionWrapper holds the Dice+CE as .loss
        return inner(logits, labels)

    def unlabelled_loss(self) -> torch.Tensor:
        """LSSL on a two-view batch of the site's unlabelled cases."""
        weak, strong = split_views(next(self.get_unlabelled_dataloader())['data'].to(self.device, non_blocking=True))
        weak_logits = self.full_resolution_output(weak)
        weak_confidence = torch.sigmoid(self.confidence().detach())[:, 0]
        features = self.assessment.last[0]
        strong_logits = self.full_resolution_output(strong)
        strong_confidence = torch.sigmoid(self.confidence().detach())[:, 0]
        labels, confidence = L.pseudo_labels_from_two_views(weak_logits, strong_logits, weak_confidence,
                                                            strong_confidence, self.rpg_threshold)
        gate = L.image_gate(confidence, self.image_threshold).bool()
        self._stats['image_gate'].append(float(gate.float().mean()))
        self._stats['unlabelled_confidence'].append(float(confidence.mean()))  # what the image gate compares
        self._stats['confident_share'].append(float((confidence >= self.rpg_threshold).float().mean()))
        loss = weak_logits.new_zeros(())
        if self.unlabelled_weight > 0 and gate.any():
            target = labels[gate][:, None]
            pseudo = 0.5 * (self.dice_ce(weak_logits[gate], target) + self.dice_ce(strong_logits[gate], target))
            loss = loss + self.unlabelled_weight * self._record('pseudo_label_loss', pseudo)
        if self.fp_weight > 0:  # the weak view's last decoder features dropped out, through the same last layer
            seg_layer = self.unwrapped_network.decoder.seg_layers[-1]
            dropout = F.dropout3d if features.dim() == 5 else F.dropout2d
            perturbed = seg_layer(dropout(features, self.fp_dropout, training=True))
            loss = loss + self.fp_weight * self._record('fp_loss', L.feature_perturbation_loss(weak_logits, perturbed))
        return loss

    # ------------------------------------------------------------------ what leaves
    def predict_bank(self) -> Dict[str, np.ndarray]:
        """This party's probabilities and SA confidence on every bank patch (eval mode, no gradient), float16."""
        self.network.eval()
        probabilities, confidences = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(self.bank[0]), self.batch_size):
                    logits = self.full_resolution_output(self.bank[0][start:start + self.batch_size].to(self.device))
                    probabilities.append(torch.softmax(logits.float(), 1).cpu())
                    confidences.append(torch.sigmoid(self.confidence().float()).cpu())
        finally:
            self.network.train()
        return knowledge.encode_predictions(torch.cat(probabilities).numpy(), torch.cat(confidences).numpy())
