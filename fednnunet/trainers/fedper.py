"""FedPer (Arivazhagan et al., 2019): the segmentation heads stay at each site; the body is averaged. Heads and
body train jointly in every local step."""
from fednnunet.trainers.base import FederatedTrainer, segmentation_head_keys


class FedPerTrainer(FederatedTrainer):
    method_name = 'fedper'
    has_local_parts = True

    @classmethod
    def local_keys(cls, network):
        return segmentation_head_keys(network)
