"""FedRep (Collins et al., ICML 2021): heads local, body shared; in every round the site first trains only its
heads (body frozen), then only the body (heads frozen). The split of the round's local iterations follows the
LC-Fed/FedRep code of the lab: 10 of 50 iterations for the head (``head_fraction`` = 0.2)."""
from fednnunet.trainers.fedper import FedPerTrainer
from fednnunet.trainers.head_body_alternation import HeadBodyAlternation


class FedRepTrainer(HeadBodyAlternation, FedPerTrainer):
    method_name = 'fedrep'
    hyperparameters = {'head_fraction': 0.2}

    def before_train_step(self, step: int):
        self.alternate_heads_and_body(step)
