"""Server merge time for 10 site updates of nnU-Net's default 3d_fullres network, measured in one run.

    python benchmarks/merge_time.py [--sites 10]

The network is nnU-Net's default PlainConvUNet for a 3d_fullres plan of a typical CT task (6 stages, features
32..320, deep supervision) built with nnU-Net's own get_network_from_plans.
"""
import argparse
import time

import numpy as np
import torch

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from fednnunet.strategies import FedAvg, SiteUpdate
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.wire import Message, decode, encode

ARCH = {
    'n_stages': 6, 'features_per_stage': (32, 64, 128, 256, 320, 320),
    'conv_op': 'torch.nn.modules.conv.Conv3d',
    'kernel_sizes': ((3, 3, 3),) * 6, 'strides': ((1, 1, 1),) + ((2, 2, 2),) * 5,
    'n_conv_per_stage': (2,) * 6, 'n_conv_per_stage_decoder': (2,) * 5, 'conv_bias': True,
    'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
    'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--sites', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    net = get_network_from_plans('dynamic_network_architectures.architectures.unet.PlainConvUNet', ARCH,
                                 ('conv_op', 'norm_op', 'dropout_op', 'nonlin'), 1, 3, deep_supervision=True)
    sd = net.state_dict()
    state = {k: sd[k].numpy() for k in FedAvgTrainer.shared_keys(net)}  # what FedAvg sites send
    n_params = sum(v.size for v in state.values())
    rs = np.random.RandomState(0)
    updates = [SiteUpdate(f'site{i}', {k: v + rs.standard_normal(v.shape).astype(v.dtype) * 1e-3 for k, v in
                                       state.items()}, num_examples=int(rs.randint(5, 50)))
               for i in range(args.sites)]
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        FedAvg().aggregate(0, updates, state)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    wire = encode(Message('update', {'num_examples': 10}, updates[0].arrays))
    decode(wire)
    t_wire = time.perf_counter() - t
    print(f'network: {n_params / 1e6:.1f} M parameters ({n_params * 4 / 2 ** 20:.0f} MiB float32), '
          f'{len(state)} arrays; torch threads {torch.get_num_threads()}')
    print(f'FedAvg merge of {args.sites} updates: best {min(times):.3f} s (all: {[round(x, 3) for x in times]}); '
          f'goal < 1 s: {"met" if min(times) < 1 else "NOT met"}')
    print(f'wire encode+decode of one update: {t_wire:.3f} s, {len(wire) / 2 ** 20:.1f} MiB')


if __name__ == '__main__':
    main()
