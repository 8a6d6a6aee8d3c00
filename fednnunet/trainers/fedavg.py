"""FedAvg (McMahan et al., AISTATS 2017) on nnU-Net: every state key is shared."""
from fednnunet.trainers.base import FederatedTrainer


class FedAvgTrainer(FederatedTrainer):
    method_name = 'fedavg'
