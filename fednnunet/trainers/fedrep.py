"""FedRep (Collins et al., ICML 2021): heads local, body shared; in every round the site first trains only its
heads (body frozen), then only the body (heads frozen). The split of the round's local iterations follows the
LC-Fed/FedRep code of the lab: 10 of 50 iterations for the head (``head_fraction`` = 0.2)."""
import math

from fednnunet.trainers.base import segmentation_head_keys
from fednnunet.trainers.fedper import FedPerTrainer


class FedRepTrainer(FedPerTrainer):
    method_name = 'fedrep'
    hyperparameters = {'head_fraction': 0.2}

    def head_steps(self) -> int:
        return int(math.ceil(self.head_fraction * self.num_iterations_per_epoch))

    def _set_trainable(self, heads: bool):
        head = set(segmentation_head_keys(self.unwrapped_network))
        for name, p in self.unwrapped_network.named_parameters():
            p.requires_grad_((name in head) == heads)

    def before_train_step(self, step: int):
        if step == 0:
            self._set_trainable(heads=True)
        if step == self.head_steps():
            self._set_trainable(heads=False)

    def after_local_training(self):
        for p in self.unwrapped_network.parameters():
            p.requires_grad_(True)
