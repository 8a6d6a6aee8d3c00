"""Bytes per round: predictions on a public set (knowledge exchange) against a weight exchange of the same networks.

    python benchmarks/knowledge_bytes.py [--public-patches 100] [--classes 3]

Networks: nnU-Net's default 3d_fullres PlainConvUNet of a typical CT task (6 stages, features 32..320, patch
128x128x128) and the per-site networks fednnunet plans from it (fednnunet.planners.site_networks: the residual-encoder
U-Net on the same topology, and its wide version), built with nnU-Net's own get_network_from_plans. Weights are what a
FedAvg site sends (float32, the encoder once); predictions are what a knowledge-exchange party sends per round (class
probabilities and confidence per voxel of every public patch, float16: fednnunet.knowledge). Both are measured as
encoded on fednnunet's wire, in one run.
"""
import argparse

import numpy as np

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from fednnunet.knowledge import encode_predictions, prediction_bytes
from fednnunet.planners.site_networks import NETWORKS, PLAIN_CLASS, architecture
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.wire import Message, encoded_size

PATCH = (128, 128, 128)
SHARED = {
    'network_class_name': PLAIN_CLASS,
    'arch_kwargs': {
        'n_stages': 6, 'features_per_stage': (32, 64, 128, 256, 320, 320), 'conv_op': 'torch.nn.modules.conv.Conv3d',
        'kernel_sizes': ((3, 3, 3),) * 6, 'strides': ((1, 1, 1),) + ((2, 2, 2),) * 5, 'n_conv_per_stage': (2,) * 6,
        'n_conv_per_stage_decoder': (2,) * 5, 'conv_bias': True,
        'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
        'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
        'nonlin_kwargs': {'inplace': True}},
    '_kw_requires_import': ('conv_op', 'norm_op', 'dropout_op', 'nonlin'),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--public-patches', type=int, default=100, help='public patches predicted per round')
    parser.add_argument('--classes', type=int, default=3)
    args = parser.parse_args()
    n = args.public_patches
    # one patch's predictions, encoded; a round's are n of them (the same bytes per patch)
    one = Message('predictions', arrays=encode_predictions(
        np.full((1, args.classes, *PATCH), 1 / args.classes, np.float32), np.ones((1, 1, *PATCH), np.float32)))
    per_patch = encoded_size(one)
    assert per_patch >= prediction_bytes(1, args.classes, PATCH)
    knowledge = per_patch * n
    print(f'predictions on {n} public patches of {PATCH} with {args.classes} classes: {knowledge / 1e6:.1f} MB per '
          f'party per round (float16)')
    for network in NETWORKS:
        arch = architecture(SHARED, network)
        net = get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'], arch['_kw_requires_import'], 1,
                                     args.classes, deep_supervision=True)
        sd = net.state_dict()
        weights = encoded_size(Message('update', arrays={k: sd[k].numpy() for k in FedAvgTrainer.shared_keys(net)}))
        print(f'{network:12s} weights {weights / 1e6:7.1f} MB; predictions / weights = {knowledge / weights:.2f}; '
              f'public patches at which they weigh the same: {weights / per_patch:.1f}')


if __name__ == '__main__':
    main()
