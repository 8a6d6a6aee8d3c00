"""FedPer (Arivazhagan et al., 2019): the segmentation heads stay at each site; the body is averaged. Heads and
body train jointly in every local step."""
from fednnunet.trainers.base import FederatedTrainer, segmentation_head_keys


class FedPerTrainer(FederatedTrainer):
    method_name = 'fedper'
    has_local_parts = True

    @classmethod
    def shared_keys(cls, network):
        local = set(segmentation_head_keys(network))
        return [k for k in network.state_dict() if k not in local]
