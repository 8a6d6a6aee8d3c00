"""Multi-FedAvg (the multimodal FedAvg baseline of FedMM, TMI 2025) on nnU-Net: FedAvg of nnU-Net's own network on
every channel of dataset.json, at sites that lack some channels too; a site's missing channels are zeros, in its
preprocessed data (fednnunet.preprocessing.with_missing_channels), in every training batch (after nnU-Net's
augmentation) and in prediction. See documentation/methods/multifedavg.md."""
from fednnunet.trainers.fedavg import FedAvgTrainer


class MultiFedAvgTrainer(FedAvgTrainer):
    method_name = 'multifedavg'
    handles_missing_channels = True
