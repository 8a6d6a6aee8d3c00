"""Local training (baseline): every site trains nnU-Net on its own cases only; nothing leaves a site."""
from fednnunet.trainers.base import FederatedTrainer


class LocalTrainer(FederatedTrainer):
    method_name = 'local'
    has_local_parts = True

    @classmethod
    def local_keys(cls, network):
        return list(network.state_dict())
