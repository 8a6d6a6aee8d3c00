"""FedBN (Li et al., ICLR 2021): normalization layers stay at each site; everything else is averaged.

nnU-Net's U-Nets normalize with InstanceNorm (affine); its scale and shift are the site's own."""
from torch import nn

from fednnunet.trainers.base import FederatedTrainer, keys_of_modules

NORMALIZATION_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
                       nn.LayerNorm)


class FedBNTrainer(FederatedTrainer):
    method_name = 'fedbn'
    has_local_parts = True

    @classmethod
    def local_keys(cls, network):
        return keys_of_modules(network, NORMALIZATION_TYPES)
