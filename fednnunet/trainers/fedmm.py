"""FedMM (modality-heterogeneous multimodal federated segmentation, TMI 2025) on nnU-Net.
See documentation/methods/fedmm.md.

Every site trains :class:`fednnunet.networks.fedmm.FedMMUNet` (one encoder per modality of dataset.json, fusion over
the modalities present in each sample, nnU-Net's decoder, a shared separate decoder). A site exchanges the encoders
of the modalities it has, the fusion blocks and both decoders; the encoders of the modalities it lacks never reach it
and never leave it (the server's :class:`fednnunet.strategies.ModalityFedAvg` averages each encoder over the sites
that have that modality). Training: modality dropout on each sample (all its modalities with probability
``full_set_probability``, else a random non-empty proper subset of them), nnU-Net's Dice+CE (with deep supervision)
on the fused output plus ``separate_weight`` x the same loss of the separate decoder on each present modality.
"""
from typing import List

import numpy as np
import torch

from fednnunet.errors import FederationError
from fednnunet.networks import plans_with_network
from fednnunet.networks.fedmm import modality_of_key
from fednnunet.trainers.base import FederatedTrainer


class FedMMTrainer(FederatedTrainer):
    method_name = 'fedmm'
    network_class_name = 'fednnunet.networks.fedmm.FedMMUNet'
    handles_missing_channels = True
    takes_previous_stage_channels = False  # an encoder per image channel
    uses_hooks = True  # the network keeps the separate decoder's outputs of a training forward for the loss
    hyperparameters = {'full_set_probability': 0.6, 'separate_weight': 1.0}

    @classmethod
    def resolve_hyperparameters(cls, given, rounds):
        values, notes = super().resolve_hyperparameters(given, rounds)
        if not 0 <= float(values['full_set_probability']) <= 1:
            raise FederationError(f"full_set_probability must be in [0, 1], not {values['full_set_probability']!r}",
                                  field='full_set_probability')
        if not float(values['separate_weight']) >= 0:
            raise FederationError(f"separate_weight must be >= 0, not {values['separate_weight']!r}",
                                  field='separate_weight')
        return values, notes

    @classmethod
    def adapt_plans(cls, plans, configuration, num_sites, site_index, hyperparameters, dataset_json):
        return plans_with_network(plans, configuration, cls.network_class_name, {}, cls.method_name)

    def initialize(self):
        super().initialize()
        self.unwrapped_network.keep_separate = float(self.separate_weight) > 0
        self.dropped_modalities, self._separate_losses = 0, []  # this round's (logged)

    # ------------------------------------------------------------------ what is exchanged
    def exchanged_keys(self) -> List[str]:
        """The fusion blocks, both decoders, and the encoders of this site's modalities."""
        present = None if self.present_channels is None else {int(c) for c in self.present_channels}
        return [k for k in self.shared_keys(self.unwrapped_network)
                if modality_of_key(k) is None or present is None or modality_of_key(k) in present]

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        if self.network.training and not self.unlabelled_only:
            batch = dict(batch, data=self.drop_modalities(batch['data']))
        return super().train_step(batch)

    def drop_modalities(self, data: torch.Tensor) -> torch.Tensor:
        """Each sample keeps all the site's modalities with probability full_set_probability, else a random non-empty
        proper subset of them (the site's missing channels are zeroed by nnU-Net's train_step here, see
        FederatedTrainer.train_step)."""
        channels = data.shape[1]
        have = (list(range(channels)) if self.present_channels is None
                else sorted(int(c) for c in self.present_channels))
        out = data.clone()
        for b in range(data.shape[0]):
            if len(have) < 2 or float(torch.rand(())) < float(self.full_set_probability):
                continue
            keep = int(torch.randint(1, len(have), ()))
            dropped = [have[i] for i in torch.randperm(len(have))[keep:].tolist()]
            out[b, dropped] = 0
            self.dropped_modalities += len(dropped)
        return out

    def extra_loss(self, output, target):
        """separate_weight x nnU-Net's loss of the separate decoder's output from each present modality, over the
        samples in which that modality is present."""
        separate = self.unwrapped_network.take_separate()
        if not separate or not float(self.separate_weight):
            return None
        base = self.loss.loss  # nnU-Net's (deep-supervised) Dice+CE, inside the method-term wrapper
        total = 0
        for m, (samples, out) in separate.items():
            t = [x[samples] for x in target] if isinstance(target, (list, tuple)) else target[samples]
            total = total + base(out, t)
        self._separate_losses.append(float(total.detach()))
        return float(self.separate_weight) * total

    def train_round(self, round_index: int, shared_state):
        self.dropped_modalities, self._separate_losses = 0, []
        arrays, metrics = super().train_round(round_index, shared_state)
        metrics['dropped_modalities'] = float(self.dropped_modalities)
        if self._separate_losses:
            metrics['separate_loss'] = float(np.mean(self._separate_losses))
            self.print_to_log_file(f"round {round_index}: separate_loss {metrics['separate_loss']:.4f}, "
                                   f"dropped_modalities {self.dropped_modalities}")
        return arrays, metrics
