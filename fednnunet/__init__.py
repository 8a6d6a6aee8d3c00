"""fednnunet: nnU-Net's self-configuring segmentation, federated."""
__version__ = '0.1.0'
