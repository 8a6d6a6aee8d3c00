"""FedMM's network: one nnU-Net encoder per modality, fusion over the present modalities only, nnU-Net's decoder and
a shared separate decoder."""
import torch

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from fednnunet.networks.fedmm import FedMMUNet, masked_mean, modality_of_key, present_modalities

PLAIN = {'n_stages': 3, 'features_per_stage': [4, 8, 16], 'conv_op': 'torch.nn.modules.conv.Conv3d',
         'kernel_sizes': [[3, 3, 3]] * 3, 'strides': [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
         'n_conv_per_stage': [1, 1, 1], 'n_conv_per_stage_decoder': [1, 1], 'conv_bias': True,
         'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
         'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
         'nonlin_kwargs': {'inplace': True}}
IMPORTS = ['conv_op', 'norm_op', 'dropout_op', 'nonlin']


def _network(modalities=3, classes=2) -> FedMMUNet:
    torch.manual_seed(0)
    kwargs = dict(PLAIN, base_network_class_name='dynamic_network_architectures.architectures.unet.PlainConvUNet',
                  wrapper={})
    return get_network_from_plans('fednnunet.networks.fedmm.FedMMUNet', kwargs, IMPORTS, modalities, classes,
                                  allow_init=True, deep_supervision=True)


def test_presence_is_read_from_the_input_and_the_mean_is_over_present_modalities():
    x = torch.zeros(3, 2, 4, 4, 4)
    x[0, 0, 1, 1, 1] = 2.0  # sample 0: modality 0 only
    x[1] = 1.0  # sample 1: both
    mask = present_modalities(x)  # sample 2: nothing at all, so everything counts as present
    assert mask.tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    f0, f1 = torch.full((3, 1, 2), 2.0), torch.full((3, 1, 2), 6.0)
    f0[1], f1[1] = torch.tensor([[1.0, 3.0]]), torch.tensor([[5.0, -3.0]])
    fused = masked_mean([f0, f1], mask)
    assert fused[0].tolist() == [[2.0, 2.0]]  # modality 1 is absent: its 6s never enter
    assert fused[1].tolist() == [[3.0, 0.0]]  # (1 + 5) / 2, (3 - 3) / 2
    assert fused[2].tolist() == [[4.0, 4.0]]


def test_the_network_is_built_from_nnunets_plans_with_one_encoder_per_modality_and_owned_keys():
    net = _network()
    assert len(net.encoders) == 3 and len(net.fusion) == 3
    assert all(e.stages[0][0].convs[0].conv.in_channels == 1 for e in net.encoders)
    keys = list(net.state_dict())
    assert not [k for k in keys if '.encoder.' in k or k.startswith('encoder.')]  # no alias of an encoder
    owners = {modality_of_key(k) for k in keys}
    assert owners == {None, 0, 1, 2}
    assert {k.split('.')[0] for k in keys if modality_of_key(k) is None} == {'fusion', 'decoder', 'separate_decoder'}
    out = net(torch.randn(2, 3, 16, 16, 16))
    assert [tuple(o.shape) for o in out] == [(2, 2, 16, 16, 16), (2, 2, 8, 8, 8)]  # deep supervision


def test_an_absent_modality_changes_nothing_and_a_present_one_does():
    net = _network().eval()
    x = torch.randn(2, 3, 16, 16, 16)
    x[:, 2] = 0  # no sample has modality 2
    with torch.no_grad():
        before = net(x)[0]
        for p in net.encoders[2].parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(net(x)[0], before)  # its encoder never reaches the output
        for p in net.encoders[1].parameters():
            p.add_(torch.randn_like(p))
        assert not torch.allclose(net(x)[0], before)
    # each sample is fused over its own modalities: sample 0 without modality 1 is what it is alone
    y = torch.randn(2, 3, 16, 16, 16)
    y[0, 1] = 0
    with torch.no_grad():
        together = net(y)[0]
        alone = net(y[:1])[0]
    torch.testing.assert_close(together[:1], alone)


def test_the_fused_loss_reaches_only_present_encoders_and_the_separate_decoder_sees_each_modality():
    net = _network().train()
    x = torch.randn(2, 3, 16, 16, 16)
    x[:, 0] = 0
    fused, separate, mask = net.forward_with_separate(x)
    assert sorted(separate) == [1, 2] and mask[:, 0].sum() == 0
    assert all(s.tolist() == [0, 1] for s, _ in separate.values())
    separate = {m: out for m, (_, out) in separate.items()}
    fused[0].square().mean().backward(retain_graph=True)
    grads = [sum(float(p.grad.abs().sum()) for p in e.parameters() if p.grad is not None) for e in net.encoders]
    assert grads[0] == 0 and grads[1] > 0 and grads[2] > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in net.separate_decoder.parameters())
    net.zero_grad()
    separate[2][0].square().mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in net.separate_decoder.parameters() if p.grad is not None) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in net.encoders[1].parameters())
    assert sum(float(p.grad.abs().sum()) for p in net.encoders[2].parameters() if p.grad is not None) > 0
    # the separate decoder's output is that decoder on the modality's own skips
    with torch.no_grad():
        torch.testing.assert_close(separate[1][0], net.separate_decoder(net.encoders[1](x[:, 1:2]))[0])
