"""LC-Fed and FedDP: their pieces against hand-computed tensors, what they share (by name), and end to end."""
import json
import os

import numpy as np
import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.cli import evaluate_entry, predict_entry
from fednnunet.federation import Federation, server_folder
from fednnunet.inference import load_checkpoint, load_predictor
from fednnunet.networks.lcfed import (HeadCalibration, PersonalizedChannelSelection, contrastive_site_loss,
                                      gaussian_kernel, hc_kernel_size)
from fednnunet.trainers.feddp import FedDPTrainer, igc_term, igc_weight
from fednnunet.trainers.lcfed import LCFedTrainer
from fednnunet.training_server import FederatedTraining

from conftest import DATASET_ID, DATASET_NAME
from test_training import PLANS, RecordingEngine, _config, _engine


# ---------------------------------------------------------------- PCS and L_con, by hand
def test_pcs_attention_and_contrastive_term_by_hand():
    pcs = PersonalizedChannelSelection(channels=2, num_sites=2, reduction=2)  # hidden = 1
    with torch.no_grad():
        pcs.fc1[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))     # K -> C
        pcs.fc1[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))     # C -> C
        pcs.fc2[0].weight.copy_(torch.tensor([[0.5, -0.5, 1.0, 1.0]]))      # 2C -> 1
        pcs.fc2[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))              # 1 -> C
    f = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])  # (B=1, C=2, N=2)
    onehot = torch.tensor([[1.0, 0.0]])
    # by hand: e = relu(W1 x) -> [1, 0] -> W2 -> [1, 0]; GAP = [2, 1], GMP = [3, 2]
    relu = lambda v: max(v, 0.0)  # noqa: E731
    h_avg = relu(0.5 * 2 - 0.5 * 1 + 1 * 1 + 1 * 0)   # 1.5
    h_max = relu(0.5 * 3 - 0.5 * 2 + 1 * 1 + 1 * 0)   # 1.5
    expected = 1 / (1 + np.exp(-np.array([h_avg + h_max, -(h_avg + h_max)])))
    a = pcs.attention(f, onehot)
    np.testing.assert_allclose(a.detach().numpy()[0], expected, rtol=1e-6)
    out = pcs.apply(f, a)
    np.testing.assert_allclose(out.detach().numpy()[0], f.numpy()[0] * (1 + expected[:, None]), rtol=1e-6)

    own = torch.tensor([[0.2, 0.8]])
    others = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.6, 0.4]])]
    # -(1/(K-1)) sum MSE: MSE1 = (0.04 + 0.04)/2 = 0.04, MSE2 = (0.16 + 0.16)/2 = 0.16
    assert contrastive_site_loss(own, others).item() == pytest.approx(-(0.04 + 0.16) / 2)
    assert contrastive_site_loss(own, []).item() == 0


# ---------------------------------------------------------------- HC: disagreement map, NMS, Gaussian
def test_head_calibration_disagreement_and_nms_by_hand():
    hc = HeadCalibration(features=1, num_classes=2, num_sites=3, conv_op=torch.nn.Conv2d, kernel_size=[3, 3],
                         threshold=0.2)
    # three sites' 1x1 heads on one feature channel: logits (w * f, 0)
    weights = [torch.tensor([[[[w]]], [[[0.0]]]]) for w in (1.0, 2.0, -1.0)]
    hc.set_site_heads({i: (w, torch.zeros(2)) for i, w in enumerate(weights)})
    f = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])  # (1, 1, 2, 2)
    own_logits = torch.cat([f * 1.0, torch.zeros_like(f)], 1)  # the site is site 0
    own_p = torch.softmax(own_logits, 1)
    u = hc.disagreement(f, own_p)

    def p(w, x):
        return 1 / (1 + np.exp(-w * x))  # softmax over (w x, 0), class 0
    fx = f.numpy()[0, 0]
    diff = [(p(w, fx) - p(1.0, fx)) ** 2 for w in (1.0, 2.0, -1.0)]
    u0 = np.sqrt(sum(diff) / 2)  # class 1 has the same magnitude
    np.testing.assert_allclose(u.numpy()[0, 0], u0 / u0.max(), rtol=1e-5)
    np.testing.assert_allclose(u.numpy()[0, 1], u0 / u0.max(), rtol=1e-5)

    grid = torch.tensor([[[[0.1, 0.5, 0.3, 0.0, 0.0],
                           [0.0, 0.2, 0.1, 0.0, 0.15],
                           [0.0, 0.0, 0.0, 0.9, 0.0]]]])
    peaks = hc.peaks(grid.expand(1, 2, 3, 5))[0, 0]
    expected = np.zeros((3, 5))
    expected[0, 1] = expected[2, 3] = 1  # local maxima in a 3x3 window above 0.2 (0.15 is a maximum below it)
    np.testing.assert_array_equal(peaks.numpy(), expected)

    k = gaussian_kernel([31, 31], [6.0, 6.0], 'peak')
    assert k.shape == (31, 31) and k.max() == 1 and k[15, 15] == 1
    assert gaussian_kernel([5, 5, 5], [1.0, 1.0, 1.0], 'sum').sum().item() == pytest.approx(1)
    assert hc_kernel_size([384, 384]) == [31, 31] and hc_kernel_size([24, 40, 32]) == [3, 3, 3]
    out = hc(torch.randn(2, 1, 6, 6), torch.randn(2, 2, 6, 6))
    assert out.shape == (2, 2, 6, 6)


# ---------------------------------------------------------------- IGC weighting, by hand
def test_igc_weight_and_term_by_hand():
    p1 = torch.tensor([[[0.9, 0.5], [0.1, 0.5]]])  # (B=1, C=2, N=2)
    p2 = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    u = igc_weight(torch.stack([p1, p2]))
    # population std of two values = |a - b| / 2: voxel 0 -> 0.2 for both classes, voxel 1 -> 0
    np.testing.assert_allclose(u.numpy()[0, 0], [1.0, 0.0], atol=1e-6)
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([[[0, 1]]])  # nnU-Net's target (B, 1, *spatial)
    ce0 = -np.log(np.exp(2) / (np.exp(2) + 1))
    assert igc_term(logits, labels, u, 1.0).item() == pytest.approx((1.0 * ce0 + 0.0) / 2, rel=1e-5)
    assert igc_term(logits, labels, u, 0.5).item() == pytest.approx(0.5 * ce0 / 2, rel=1e-5)
    # an ignored voxel counts neither in the sum nor in the mean
    uniform = torch.ones(1, 1, 2)
    ce1 = -np.log(np.exp(1) / (np.exp(1) + 1))
    assert igc_term(logits, torch.tensor([[[0, 1]]]), uniform, 1.0).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    assert igc_term(logits, torch.tensor([[[0, 3]]]), uniform, 1.0, has_ignore_label=True,
                    ignore_label=3).item() == pytest.approx(ce0, rel=1e-5)
    # regions: BCE per region, averaged over regions; nnU-Net's ignore mask is the target's last channel
    region_logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]]])  # (B=1, R=2, N=2)
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])

    def bce(x, t):
        return -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))
    voxel0 = (bce(2.0, 1) + bce(0.5, 0)) / 2
    voxel1 = (bce(-1.0, 0) + bce(0.0, 1)) / 2
    assert igc_term(region_logits, regions, u, 1.0, region_based=True).item() == pytest.approx(voxel0 / 2, rel=1e-5)
    with_mask = torch.cat([regions, torch.tensor([[[1.0, 0.0]]])], 1)  # voxel 0 ignored
    assert igc_term(region_logits, with_mask, uniform, 1.0, region_based=True, has_ignore_label=True).item() == \
        pytest.approx(voxel1, rel=1e-5)


# ---------------------------------------------------------------- what is shared, by name
def _network(trainer, plans, configuration='3d_fullres', num_sites=3, site_index=1, hp=None):
    dj = json.load(open(os.path.join(server_folder(DATASET_NAME), 'dataset.json')))
    adapted = trainer.adapt_plans(plans, configuration, num_sites, site_index, hp or {}, dj)
    pm = PlansManager(adapted)
    cm = pm.get_configuration(configuration)
    return trainer.build_network_architecture(pm, cm, 1, pm.get_label_manager(dj).num_segmentation_heads, True), cm


def test_which_keys_each_method_shares(planned):
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')))
    net, cm = _network(LCFedTrainer, plans)
    assert cm.network_arch_class_name == 'fednnunet.networks.lcfed.LCFedUNet'
    shared, local = set(LCFedTrainer.shared_keys(net)), set(LCFedTrainer.local_keys(net))
    assert {'pcs.fc1.0.weight', 'pcs.fc1.2.weight', 'pcs.fc2.0.weight', 'pcs.fc2.2.weight'} <= shared
    assert 'encoder.stages.0.0.convs.0.conv.weight' in shared
    assert not any(k.startswith('decoder.encoder.') for k in shared)  # aliases travel once
    assert {k for k in local if k.startswith('decoder.seg_layers.')} == \
        {k for k in net.state_dict() if k.startswith('decoder.seg_layers.')}
    assert {'hc.calibrate.weight', 'hc.calibrate.bias', 'hc.head_weight', 'hc.head_bias', 'hc.active'} <= local
    assert not shared & local

    net, cm = _network(FedDPTrainer, plans, hp={'attention_stages': 2})
    assert cm.network_arch_class_name == 'fednnunet.networks.feddp.FedDPUNet'
    shared, local = set(FedDPTrainer.shared_keys(net)), set(FedDPTrainer.local_keys(net))
    assert local == {'attention.0.q.weight', 'attention.0.q.bias', 'attention.1.q.weight', 'attention.1.q.bias'}
    assert {'attention.0.k.weight', 'attention.0.v.weight', 'attention.0.proj.weight', 'attention.1.norm.weight',
            'decoder.seg_layers.0.weight'} <= shared
    # the planned nnU-Net keys are untouched by the wrapper
    plain = PlansManager(plans).get_configuration('3d_fullres')
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    base = get_network_from_plans(plain.network_arch_class_name, plain.network_arch_init_kwargs,
                                  plain.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    assert set(base.state_dict()) <= set(net.state_dict())


def test_feddp_network_starts_as_the_planned_unet(planned):
    """The attention blocks are zero-initialised residuals: with the same nnU-Net weights, same output."""
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')))
    net, cm = _network(FedDPTrainer, plans)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    plain = PlansManager(plans).get_configuration('3d_fullres')
    base = get_network_from_plans(plain.network_arch_class_name, plain.network_arch_init_kwargs,
                                  plain.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=False)
    base.load_state_dict({k: v for k, v in net.state_dict().items() if k in base.state_dict()})
    net.decoder.deep_supervision = False
    x = torch.randn(1, 1, *cm.patch_size)
    net.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x))


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
@pytest.mark.parametrize('method', ['lcfed', 'feddp'])
def test_trains_predicts_and_evaluates_with_personalized_models(planned, fresh_results, tmp_path, capsys, method,
                                                                configuration):
    fed = Federation.from_raw(DATASET_ID)
    engine = _engine(fed, RecordingEngine)
    config = _config(method, configuration, rounds=3, hyperparameters={'stage2_rounds': 1})
    ft = FederatedTraining(engine, config)
    result = ft.run()
    assert not os.path.isfile(os.path.join(result['results_folder'], 'fold_0', 'checkpoint_final.pth'))
    shared = set(ft.shared_keys)
    # local keys never leave a site: updates hold the shared keys, plus once (the last federated round) the
    # read-only parts the other sites need for the second stage
    last_head = max(int(k.split('.')[2]) for k in ft.initial_network_state() if k.startswith('decoder.seg_layers.'))
    readonly_expected = {'lcfed': {f'decoder.seg_layers.{last_head}.{p}' for p in ('weight', 'bias')},
                         'feddp': {f'attention.{i}.q.{p}' for i in (0, 1) for p in ('weight', 'bias')}}[method]
    updates = [(s, r) for s, r in engine.replies if r.kind == 'update']
    assert len(updates) == 9
    for i, (site, reply) in enumerate(updates):
        round_index = i // 3
        keys = set(reply.arrays)
        plain = {k for k in keys if not k.startswith('readonly/')}
        readonly = {k[len('readonly/'):] for k in keys if k.startswith('readonly/')}
        if round_index < 2:
            assert plain == shared, (site, round_index)
        else:
            assert plain == set() and readonly == set()
        if round_index == 1:
            assert readonly == readonly_expected
        else:
            assert not readonly
    local = set(ft.initial_network_state()) - shared
    assert local
    for site, reply in engine.replies:
        assert not {k for k in reply.arrays if not k.startswith('readonly/')} & local, site

    site_ckpt = {s: load_checkpoint(os.path.join(result['results_folder'], 'sites', s, 'fold_0',
                                                 'checkpoint_final.pth'))['network_weights'] for s in 'ABC'}
    if method == 'lcfed':  # every site calibrates with every site's final head
        last = max(int(k.split('.')[2]) for k in site_ckpt['A'] if k.startswith('decoder.seg_layers.'))
        for s in 'ABC':
            assert site_ckpt[s]['hc.active'].item() == 1
            for j, other in enumerate('ABC'):
                own_head = site_ckpt[other][f'decoder.seg_layers.{last}.weight']
                torch.testing.assert_close(site_ckpt[s]['hc.head_weight'][j * 3:(j + 1) * 3], own_head)
    else:  # personalized queries; every site calibrates against every site's final queries, kept frozen
        assert not torch.equal(site_ckpt['A']['attention.1.q.weight'], site_ckpt['B']['attention.1.q.weight'])
        states = {s: os.path.join(result['results_folder'], 'sites', s, 'fold_0', 'site_state', ft.run_id)
                  for s in 'ABC'}
        after_stage1 = {s: torch.load(os.path.join(states[s], 'round_0002.pth'), weights_only=True) for s in 'ABC'}
        final_a = torch.load(os.path.join(states['A'], 'round_0003.pth'), weights_only=True)['method']
        assert sorted(final_a['queries']) == ['0', '1', '2']
        for j, other in enumerate('ABC'):
            torch.testing.assert_close(final_a['queries'][str(j)]['attention.1.q.weight'],
                                       after_stage1[other]['network']['attention.1.q.weight'])
    site_plans = json.load(open(os.path.join(result['results_folder'], 'sites', 'B', 'plans.json')))
    arch = site_plans['configurations'][configuration]['architecture']
    assert arch['network_class_name'].startswith('fednnunet.networks.')
    if method == 'lcfed':
        assert arch['arch_kwargs']['wrapper']['site_index'] == 1

    evaluate_entry(['-d', '501', '-c', configuration, '--method', method, '-p', PLANS, '-device', 'cpu'])
    assert '(site model' in capsys.readouterr().out
    case = fed.sites['C'].cases[0]
    images = tmp_path / 'in'
    images.mkdir()
    os.symlink(fed.sites['C'].image_files(case)[0], images / os.path.basename(fed.sites['C'].image_files(case)[0]))
    predict_entry(['-i', str(images), '-o', str(tmp_path / 'out'), '-d', '501', '-c', configuration,
                   '--method', method, '--site', 'C', '-p', PLANS, '-device', 'cpu'])
    assert os.path.isfile(tmp_path / 'out' / f'{case}.nii.gz')
    predictor = load_predictor(os.path.join(result['results_folder'], 'sites', 'C'), 0)
    assert type(predictor.network).__name__ == ('LCFedUNet' if method == 'lcfed' else 'FedDPUNet')


def test_lcfed_first_stage_alternates_heads_and_body(planned, fresh_results):
    from fednnunet.site_training import build_site_trainer
    from fednnunet.site_worker import SiteWorker
    fed = Federation.from_raw(DATASET_ID)
    ft = FederatedTraining(_engine(fed), _config('lcfed', rounds=3, local_iterations=5,
                                                 hyperparameters={'stage2_rounds': 1}))
    trainer = build_site_trainer(SiteWorker(fed.sites['A'], DATASET_NAME, device='cpu'), ft.site_config('A', round=0))
    trainer.start(0)
    trainer.current_epoch = 0
    net = trainer.unwrapped_network
    heads = {n for n, _ in net.named_parameters() if n.startswith('decoder.seg_layers.')}
    trainer.before_train_step(0)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == heads
    trainer.before_train_step(trainer.head_steps())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert 'pcs.fc2.0.weight' in trainable and not trainable & heads and not any(n.startswith('hc.') for n in trainable)
    # head_fraction 0: no head phase, the body trains from the first step
    trainer.head_fraction = 0
    trainer.before_train_step(0)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == trainable
    trainer.after_local_training()
    assert all(p.requires_grad for p in net.parameters())
    trainer.head_fraction = 0.2
    # in the second stage only the calibration trains
    trainer.current_epoch = 2
    assert trainer.in_stage2(2) and not trainer.in_stage2(1)
    assert trainer.stage2_trainable('hc.calibrate.weight') and not trainer.stage2_trainable('pcs.fc1.0.weight')
    # the contrastive term enters the loss with weight alpha in the first stage only
    trainer.current_epoch = 0
    net.train()
    batch = next(trainer.dataloader_train)
    out = trainer.network(batch['data'])
    assert net.last_contrastive is not None and net.last_contrastive.item() <= 0
    torch.testing.assert_close(trainer.loss(out, batch['target']),
                               trainer.loss.loss(out, batch['target']) + 0.1 * net.last_contrastive)
    trainer.close()


# ---------------------------------------------------------------- FedDP's calibration does something
def _stage2_trainer(method, site='A', configuration='2d', rounds=3):
    from fednnunet.site_training import build_site_trainer
    from fednnunet.site_worker import SiteWorker
    fed = Federation.from_raw(DATASET_ID)
    ft = FederatedTraining(_engine(fed), _config(method, configuration, rounds=rounds,
                                                 hyperparameters={'stage2_rounds': 1}))
    trainer = build_site_trainer(SiteWorker(fed.sites[site], DATASET_NAME, device='cpu'),
                                 ft.site_config(site, round=rounds - 1))
    trainer.start(rounds - 1)
    trainer.current_epoch = rounds - 1
    return trainer


def test_feddp_references_are_independent_and_calibration_changes_the_loss(planned, fresh_results):
    import copy
    from fednnunet.networks.feddp import query_keys
    trainer = _stage2_trainer('feddp')
    net = trainer.unwrapped_network
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained network: its attention changes the features (untrained, it adds nothing)
        for p in net.attention.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    queries = query_keys(net)
    sd = net.state_dict()
    readonly = {i: {k: (torch.randn(sd[k].shape, generator=generator) * 0.5).numpy() for k in queries}
                for i in range(3)}
    trainer.enter_stage2(trainer.handed_over_parts(readonly))
    batch = next(trainer.dataloader_train)
    x, target = batch['data'], batch['target']
    trainer.network.eval()
    u = trainer.disagreement(x)
    assert u.shape == (x.shape[0], 1, *x.shape[2:])
    assert u.max().item() == pytest.approx(1.0, abs=1e-5) and u.mean().item() > 0.01  # the sites' models disagree

    # the references do not change when the live network changes (the bug: deep copies ran the live attention)
    with torch.no_grad():
        for p in net.attention.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    torch.testing.assert_close(trainer.disagreement(x), u)
    assert trainer.reference is not net and not any(p is q for p in trainer.reference.parameters()
                                                    for q in net.parameters())
    # and a deep copy of the network runs its own attention blocks, not the original's
    twin = copy.deepcopy(net).eval()
    before = twin(x)[0].detach().clone() if isinstance(twin(x), (list, tuple)) else twin(x).detach().clone()
    with torch.no_grad():
        for p in net.attention.parameters():
            p.mul_(-3.0)
    after = twin(x)
    torch.testing.assert_close(after[0] if isinstance(after, (list, tuple)) else after, before)

    # with every site's queries alike there is no disagreement
    same = {i: readonly[0] for i in range(3)}
    trainer.enter_stage2(same)
    assert trainer.disagreement(x).abs().max().item() < 1e-6
    trainer.enter_stage2(trainer.handed_over_parts(readonly))

    # the calibration term changes the loss and its gradient
    trainer.network.train()
    out = trainer.network(x)
    with_igc = trainer.loss(out, target)
    trainer.igc_lambda = 0.0
    without = trainer.loss(out, target)
    trainer.igc_lambda = 1.0
    expected = igc_term(out[0], target[0], trainer.disagreement(x), 1.0)
    assert expected.item() > 1e-4
    torch.testing.assert_close(with_igc - without, expected, rtol=1e-4, atol=1e-6)
    head = net.decoder.seg_layers[-1].weight
    grad_with = torch.autograd.grad(with_igc, head, retain_graph=True)[0]
    grad_without = torch.autograd.grad(without, head)[0]
    assert (grad_with - grad_without).abs().max().item() > 1e-6
    trainer.close()


def test_head_calibration_sigmoid_for_regions_and_only_the_heads_that_arrived():
    """Region-based datasets: every site's head gives sigmoid probabilities per region (not a softmax over
    regions); a site whose head never arrived stays out of U (the sum and the K'-1 divisor)."""
    hc = HeadCalibration(features=1, num_classes=2, num_sites=3, conv_op=torch.nn.Conv2d, kernel_size=[3, 3],
                         region_based=True)
    weights = {0: torch.tensor([[[[1.0]]], [[[0.5]]]]), 2: torch.tensor([[[[-2.0]]], [[[1.0]]]])}  # site 1 absent
    hc.set_site_heads({i: (w, torch.zeros(2)) for i, w in weights.items()})
    assert hc.present.tolist() == [1.0, 0.0, 1.0]
    f = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    own_logits = torch.cat([f * 1.0, f * 0.5], 1)  # the site is site 0
    u = hc.disagreement(f, torch.sigmoid(own_logits))
    fx = f.numpy()[0, 0]

    def s(x):
        return 1 / (1 + np.exp(-x))
    for region, (w0, w2) in enumerate(((1.0, -2.0), (0.5, 1.0))):
        diff = (s(w0 * fx) - s(w0 * fx)) ** 2 + (s(w2 * fx) - s(w0 * fx)) ** 2  # sites 0 and 2; K' - 1 = 1
        expected = np.sqrt(diff / 1)
        np.testing.assert_allclose(u.numpy()[0, region], expected / expected.max(), rtol=1e-5)
    out = hc(f, own_logits)
    assert out.shape == own_logits.shape
    torch.testing.assert_close(out, own_logits)  # the residual calibration starts at zero


def test_lcfed_plans_say_whether_outputs_are_regions(planned):
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')))
    dj = json.load(open(os.path.join(server_folder(DATASET_NAME), 'dataset.json')))
    regions = dict(dj, labels={'background': 0, 'brain': [1, 2], 'grey_matter': 1}, regions_class_order=[2, 1])
    for dataset_json, expected in ((dj, False), (regions, True)):
        adapted = LCFedTrainer.adapt_plans(plans, '2d', 3, 0, {'hc_threshold': 0.2}, dataset_json)
        arch = adapted['configurations']['2d']['architecture']
        assert arch['arch_kwargs']['wrapper']['region_based'] is expected
        pm = PlansManager(adapted)
        net = LCFedTrainer.build_network_architecture(pm, pm.get_configuration('2d'), 1,
                                                      pm.get_label_manager(dataset_json).num_segmentation_heads)
        assert net.hc.region_based is expected


@pytest.mark.parametrize('method', ['lcfed', 'feddp'])
def test_region_based_dataset_trains_both_stages(raw_copy, method):
    """nnU-Net's region training (sigmoid outputs, DC + BCE, targets as region maps): both second stages work on
    the targets nnU-Net's data loaders give, and the calibration term is active."""
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    with open(raw_copy / 'dataset.json') as f:
        dj = json.load(f)
    dj['labels'] = {'background': 0, 'brain': [1, 2], 'grey_matter': 1}
    dj['regions_class_order'] = [2, 1]
    with open(raw_copy / 'dataset.json', 'w') as f:
        json.dump(dj, f)
    fed = Federation.from_folder(str(raw_copy), only_sites=['A', 'B'])
    plan_and_preprocess(SimulationEngine.for_federation(fed), DATASET_NAME, ['2d'], 'nnUNetPlannerCPU')
    seen = []
    if method == 'feddp':
        original = FedDPTrainer.extra_loss

        def recording(self, output, target):
            term = original(self, output, target)
            if term is not None:
                seen.append(float(term))
            return term
        FedDPTrainer.extra_loss = recording
    try:
        # (FedDP's attention output projection starts at zero, so the queries only start to learn, and to differ
        # between sites, from the second step on)
        result = FederatedTraining(_engine(fed), _config(method, '2d', rounds=2, local_iterations=4,
                                                         hyperparameters={'stage2_rounds': 1})).run()
    finally:
        if method == 'feddp':
            FedDPTrainer.extra_loss = original
    ckpt = load_checkpoint(os.path.join(result['results_folder'], 'sites', 'A', 'fold_0', 'checkpoint_final.pth'))
    if method == 'lcfed':
        assert ckpt['network_weights']['hc.active'].item() == 1
        assert ckpt['network_weights']['hc.calibrate.weight'].abs().sum() > 0  # the calibration trained
    else:
        assert len(seen) == 2 * 4 and all(v > 0 for v in seen)  # both sites' stage-2 steps had an IGC term
    assert len(result['final_validation']['pooled']) == 2  # the two regions, validated
