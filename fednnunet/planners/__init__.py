"""Federated planning: negotiation over nnU-Net's experiment planners, and a CPU preset."""
