"""Local training (baseline): every site trains nnU-Net on its own cases only; nothing leaves a site. A site that lacks
some of the dataset's channels trains on the ones it has (the others are zeros, as in its preprocessed data)."""
from fednnunet.trainers.base import FederatedTrainer


class LocalTrainer(FederatedTrainer):
    method_name = 'local'
    has_local_parts = True
    trains_site_networks = True  # nothing is merged: each site may train the network planned for it
    handles_missing_channels = True

    @classmethod
    def local_keys(cls, network):
        return list(network.state_dict())
