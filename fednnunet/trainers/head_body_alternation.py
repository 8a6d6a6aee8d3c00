"""FedRep's round (Collins et al., ICML 2021), shared by FedRep and LC-Fed: the segmentation heads alone for the
first ``head_fraction`` of the round's local iterations (body frozen), then the body alone (heads frozen). The
base trainer makes everything trainable again after the round."""
import math

from fednnunet.trainers.base import segmentation_head_keys


class HeadBodyAlternation:
    """Mixin for a FederatedTrainer with a ``head_fraction`` hyper-parameter. ``never_alternated``: name prefixes
    of parameters that train in neither phase (e.g. LC-Fed's calibration module in its first stage)."""
    never_alternated: tuple = ()

    def head_steps(self) -> int:
        return int(math.ceil(self.head_fraction * self.num_iterations_per_epoch))

    def alternate_heads_and_body(self, step: int):
        """Call with every step index: step 0 starts the head phase, ``head_steps()`` the body phase (with
        ``head_fraction`` 0 both happen at step 0, so every step trains the body)."""
        for heads_phase, starts_at in ((True, 0), (False, self.head_steps())):
            if step == starts_at:
                heads = set(segmentation_head_keys(self.unwrapped_network))
                for name, p in self.unwrapped_network.named_parameters():
                    p.requires_grad_((name in heads) == heads_phase and not name.startswith(self.never_alternated))
