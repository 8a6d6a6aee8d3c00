"""Federated trainers: nnUNetTrainer subclasses that run federated rounds in place of epochs."""
