"""Federated training in simulation on the tiny demo federation (CPU preset, a few rounds and iterations)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fednnunet.errors import FederationError
from fednnunet.cli import evaluate_entry, predict_entry, train_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import Federation, server_folder, site_folder
from fednnunet.inference import load_checkpoint
from fednnunet.methods import METHODS, get_method
from fednnunet.trainers.base import initial_weights_seed, round_seed, seed_everything
from fednnunet.training_server import FederatedTraining, TrainingConfig, check_trainable

from conftest import DATASET_ID, DATASET_NAME, point_nnunet_folder

PLANS = 'nnUNetCPUPlans'
FAST = ['--rounds', '2', '--local-iterations', '3', '--val-iterations', '2', '-p', PLANS, '-device', 'cpu']


def _config(method='fedavg', configuration='3d_fullres', rounds=2, local_iterations=3, **kw):
    return TrainingConfig(DATASET_NAME, configuration, 0, method, PLANS, rounds=rounds,
                          local_iterations=local_iterations, val_iterations=kw.pop('val_iterations', 2), **kw)


def _results(method, configuration='3d_fullres'):
    trainer = get_method(method).trainer if method != 'centralized' else None
    name = (trainer.__name__ if trainer else 'CentralizedTrainer') + f'__{PLANS}__{configuration}'
    return os.path.join(os.environ['nnUNet_results'], DATASET_NAME, name)


class RecordingEngine(SimulationEngine):
    """Keeps every message, to check what leaves a site; can stop the run at a given round."""

    def __init__(self, workers, stop_at_round=None):
        super().__init__(workers)
        self.replies, self.stop_at_round = [], stop_at_round

    def ask(self, requests):
        first = next(iter(requests.values()))
        if first.kind == 'fit' and first.config['round'] == self.stop_at_round:
            raise KeyboardInterrupt('simulated crash')
        replies = super().ask(requests)
        self.replies += [(s, r) for s, r in replies.items()]
        return replies


#: SiteWorker options that _engine passes to every site's worker (the rest go to the engine)
WORKER_OPTIONS = ('state_in_memory', 'keep_trainers')


def _engine(federation, cls=SimulationEngine, **kw):
    """An engine over one CPU SiteWorker per site of ``federation``."""
    from fednnunet.site_worker import SiteWorker
    worker = {k: kw.pop(k) for k in WORKER_OPTIONS if k in kw}
    return cls({n: SiteWorker(s, federation.dataset_name, 1, device='cpu', **worker)
                for n, s in federation.sites.items()}, **kw)


#: the supervised methods; the semi-supervised ones need unlabelled cases (tests/test_unlabelled_data.py); multifedavg
#: is fedavg where every site has every channel (its own tests: tests/test_multifedavg.py)
SUPERVISED = sorted(m for m, method in METHODS.items() if not method.trainer.uses_unlabelled_data
                    and m != 'multifedavg')


@pytest.mark.parametrize('method', SUPERVISED + ['centralized'])
def test_every_method_trains_predicts_and_evaluates(planned, fresh_results, tmp_path, capsys, method):
    train_entry(['501', '3d_fullres', '0', '--method', method] + FAST)
    captured = capsys.readouterr()
    out = captured.out
    assert 'pooled' in out and 'final validation' in out
    assert 'perform_everything_on_device' not in out + captured.err  # nnU-Net's CPU message, once per site before
    base = _results(method)
    has_global = method == 'centralized' or get_method(method).has_global_model
    assert os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth')) == has_global
    if method != 'centralized':
        summary = json.load(open(os.path.join(base, 'fold_0', 'federated_summary.json')))
        for site in 'ABC':
            assert os.path.isfile(os.path.join(base, 'sites', site, 'fold_0', 'checkpoint_final.pth'))
            # the reported Dice is nnU-Net's, recomputed here from the site's predictions and its own labels
            dice = summary['final_validation']['per_site'][site]['foreground_mean']['Dice']
            assert dice == pytest.approx(_nnunet_foreground_dice(
                os.path.join(base, 'sites', site, 'fold_0', 'validation'), site), abs=1e-12)
        assert os.path.isfile(os.path.join(base, 'fold_0', 'progress.png'))
        assert os.path.isfile(os.path.join(base, 'fold_0', 'progress_sites.png'))
        log = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
        assert [r['round'] for r in log] == [0, 1] and set(log[0]['sites']) == {'A', 'B', 'C'}
        # one plain line per round for a log file, with each site's numbers as logged (not a bar's postfix)
        for r in log:
            line = next(x for x in out.splitlines() if f"round {r['round']} (of 0-1) in " in x)
            for site, m in r['sites'].items():
                assert f"{site} loss {m['train_loss']:.3f} Dice {m['pseudo_dice']:.4f}" in line, line

    evaluate_entry(['-d', '501', '-c', '3d_fullres', '--method', method, '-p', PLANS, '-device', 'cpu'])
    table = capsys.readouterr().out
    assert all(f'\n{s} ' in table for s in 'ABC') and '\npooled ' in table
    model = 'global' if has_global else 'site'
    evaluation = json.load(open(os.path.join(base, 'fold_0', f'evaluation_{model}_checkpoint_final.json')))
    assert set(evaluation['per_site']) == {'A', 'B', 'C'}
    tp, fp, fn = (sum(evaluation['pooled'][lb][k] for lb in ('1', '2')) for k in ('TP', 'FP', 'FN'))
    assert tp > 0 and evaluation['per_site']['A']['1']['HD95'] is not None

    images = tmp_path / 'new_scans'
    images.mkdir()
    case = Federation.from_raw(DATASET_ID).sites['C'].cases[0]
    src = Federation.from_raw(DATASET_ID).sites['C'].image_files(case)[0]
    os.symlink(src, images / os.path.basename(src))
    site_args = [] if has_global else ['--site', 'C']
    predict_entry(['-i', str(images), '-o', str(tmp_path / 'pred'), '-d', '501', '-c', '3d_fullres',
                   '--method', method, '-p', PLANS, '-device', 'cpu'] + site_args)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'pred' / f'{case}.nii.gz')))
    assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(src)).shape and set(np.unique(seg)) <= {0, 1, 2}
    if not has_global:
        with pytest.raises(SystemExit):
            predict_entry(['-i', str(images), '-o', str(tmp_path / 'x'), '-d', '501', '-c', '3d_fullres',
                           '--method', method, '-p', PLANS, '-device', 'cpu'])
        assert 'personalized model with --site' in capsys.readouterr().err


def _nnunet_foreground_dice(prediction_folder, site):
    """nnU-Net's mean foreground Dice of a site's validation predictions (its compute_metrics per case against the
    site's own labels, then nnU-Net's means), recomputed without fednnunet."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    cases = sorted(f[:-len('.nii.gz')] for f in os.listdir(prediction_folder) if f.endswith('.nii.gz'))
    splits = json.load(open(os.path.join(site_folder(DATASET_NAME, site), 'splits_final.json')))
    assert cases == sorted(splits[0]['val']), 'the site predicted other cases than its fold-0 validation cases'
    results = [compute_metrics(os.path.join(site_folder(DATASET_NAME, site), 'gt_segmentations', c + '.nii.gz'),
                               os.path.join(prediction_folder, c + '.nii.gz'), SimpleITKIO(), [1, 2])
               for c in cases]
    return float(np.mean([np.nanmean([r['metrics'][lb]['Dice'] for r in results]) for lb in (1, 2)]))


def test_2d_configuration_trains_and_validates_as_nnunet(planned, fresh_results):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    fed = Federation.from_raw(DATASET_ID)
    training = FederatedTraining(_engine(fed), _config('fedavg', '2d'))
    result = training.run()
    final = load_checkpoint(os.path.join(result['results_folder'], 'fold_0', 'checkpoint_final.pth'))
    best = load_checkpoint(os.path.join(result['results_folder'], 'fold_0', 'checkpoint_best.pth'))
    assert final['init_args']['configuration'] == '2d'
    # written by nnU-Net's own save_checkpoint: its keys, its init args, and nnU-Net's inference mirroring axes in the
    # best checkpoint too (before, they were patched in at the end of the run)
    assert set(final) == set(best) == {'network_weights', 'optimizer_state', 'grad_scaler_state', 'logging',
                                       '_best_ema', 'current_epoch', 'init_args', 'trainer_name',
                                       'inference_allowed_mirroring_axes'}
    assert final['trainer_name'] == 'FedAvgTrainer' and final['current_epoch'] == 2
    assert tuple(final['inference_allowed_mirroring_axes']) == tuple(best['inference_allowed_mirroring_axes']) == (0, 1)
    assert len(final['logging']['mean_fg_dice']) == 2  # the server's pooled log, one entry per round
    convs = [v for k, v in final['network_weights'].items() if k.endswith('conv.weight')]
    assert convs and all(v.ndim == 4 for v in convs)  # a 2D U-Net (3D kernels would be 5-D)
    seed_everything(initial_weights_seed(12345))
    fresh = training.method.trainer.build_network_architecture(
        training.checkpoint_trainer().plans_manager, training.checkpoint_trainer().configuration_manager, 1, 3, True)
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, final['network_weights'][k])]
    assert len(changed) > len(convs) // 2, 'the federated rounds did not train the network'
    # each site's validation equals nnU-Net's own evaluation of its predictions (summary.json's numbers)
    for site in 'ABC':
        folder = os.path.join(result['results_folder'], 'sites', site, 'fold_0', 'validation')
        ours = json.load(open(os.path.join(folder, 'summary.json')))
        if site == 'A':  # nnU-Net's compute_metrics_on_folder (a process pool: once)
            theirs = compute_metrics_on_folder(os.path.join(site_folder(DATASET_NAME, site), 'gt_segmentations'),
                                               folder, None, SimpleITKIO(), '.nii.gz', [1, 2], num_processes=1)
            for key in ('Dice', 'IoU', 'TP', 'FP', 'FN'):
                assert ours['foreground_mean'][key] == pytest.approx(theirs['foreground_mean'][key], abs=1e-12)
                for lb in (1, 2):
                    assert ours['mean'][str(lb)][key] == pytest.approx(theirs['mean'][lb][key], abs=1e-12)
        reported = result['final_validation']['per_site'][site]['foreground_mean']['Dice']
        assert reported == pytest.approx(_nnunet_foreground_dice(folder, site), abs=1e-12)


def test_fedavg_round_with_one_site_is_nnunet_training(planned, fresh_results, tmp_path):
    """One FedAvg round at one site = nnU-Net's own validation and train steps (same seeds), bit for bit."""
    fed = Federation.from_raw(DATASET_ID, only_sites=['A'])
    iterations, seed = 4, 12345
    FederatedTraining(_engine(fed), _config(rounds=1, local_iterations=iterations, seed=seed, validate=False)).run()
    federated = load_checkpoint(os.path.join(_results('fedavg'), 'fold_0', 'checkpoint_final.pth'))['network_weights']

    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')))
    plans['continue_training'] = False
    plain = nnUNetTrainer(plans, '3d_fullres', 0, json.load(open(os.path.join(server_folder(DATASET_NAME),
                                                                             'dataset.json'))), torch.device('cpu'))
    plain.preprocessed_dataset_folder_base = site_folder(DATASET_NAME, 'A')
    plain.preprocessed_dataset_folder = os.path.join(site_folder(DATASET_NAME, 'A'), f'{PLANS}_3d_fullres')
    plain.num_epochs, plain.num_iterations_per_epoch, plain.num_val_iterations_per_epoch = 1, iterations, 2
    seed_everything(initial_weights_seed(seed))
    plain.on_train_start()
    seed_everything(round_seed(seed, 0, 0))
    plain.on_epoch_start()
    with torch.no_grad():
        plain.on_validation_epoch_start()
        plain.on_validation_epoch_end([plain.validation_step(next(plain.dataloader_val)) for _ in range(2)])
    plain.on_train_epoch_start()
    for _ in range(iterations):
        plain.train_step(next(plain.dataloader_train))
    reference = plain.network.state_dict()
    assert set(reference) == set(federated)
    for k in reference:
        assert torch.equal(reference[k].cpu(), federated[k]), k


def _final_weights(method='fedavg'):
    base = _results(method)
    path = os.path.join(base, 'fold_0', 'checkpoint_final.pth')
    if os.path.isfile(path):
        return load_checkpoint(path)['network_weights']
    return {s: load_checkpoint(os.path.join(base, 'sites', s, 'fold_0', 'checkpoint_final.pth'))['network_weights']
            for s in 'ABC'}


def _assert_same(a, b):
    if isinstance(a, dict) and not isinstance(next(iter(a.values())), torch.Tensor):
        for k in a:
            _assert_same(a[k], b[k])
        return
    assert set(a) == set(b)
    # two identical runs in one pytest process are equal only up to float32 rounding noise on a busy 2-core CPU
    # (measured between identical runs: up to 1.7e-6 absolute / 2.6e-5 relative on a weight, from the order of CPU
    # thread reductions); a resume that lost momentum, the round counter or the data order differs by orders of
    # magnitude more
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f'{k}: {m}')


@pytest.mark.parametrize('method', ['fedavg', 'fedper'])
def test_resume_equals_uninterrupted(planned, tmp_path, monkeypatch, method):
    fed = Federation.from_raw(DATASET_ID)
    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'straight')
    FederatedTraining(_engine(fed), _config(method, rounds=3, validate=False)).run()
    straight = _final_weights(method)

    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'resumed')
    with pytest.raises(KeyboardInterrupt):
        FederatedTraining(_engine(fed, RecordingEngine, stop_at_round=2), _config(method, rounds=3, validate=False)).run()
    assert not os.path.isfile(os.path.join(_results(method), 'fold_0', 'checkpoint_final.pth'))
    FederatedTraining(_engine(fed), _config(method, rounds=3, validate=False)).run(continue_training=True)
    _assert_same(straight, _final_weights(method))
    log = json.load(open(os.path.join(_results(method), 'fold_0', 'federation_log.json')))
    assert [r['round'] for r in log] == [0, 1, 2]


def test_site_state_in_memory_or_on_disk_gives_identical_rounds(planned, tmp_path, monkeypatch):
    fed = Federation.from_raw(DATASET_ID)
    weights = []
    for in_memory in (True, False):
        point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / f'memory_{in_memory}')
        training = FederatedTraining(_engine(fed, state_in_memory=in_memory), _config('fedbn', validate=False))
        training.run()
        weights.append(_final_weights('fedbn'))
    _assert_same(*weights)
    assert sorted(os.listdir(os.path.join(_results('fedbn'), 'sites', 'A', 'fold_0', 'site_state',
                                          training.run_id))) == \
        ['round_0001.pth', 'round_0002.pth']


@pytest.mark.parametrize('method', ['fedbn', 'fedper', 'fedrep', 'local'])
def test_local_keys_never_leave_a_site(planned, fresh_results, method):
    fed = Federation.from_raw(DATASET_ID)
    engine = _engine(fed, RecordingEngine)
    ft = FederatedTraining(engine, _config(method, validate=False))
    ft.run()
    all_keys = set(ft.initial_network_state())
    local = all_keys - set(ft.shared_keys)
    assert local, 'these methods keep something local'
    if method in ('fedper', 'fedrep'):
        assert local == {k for k in all_keys if k.startswith('decoder.seg_layers.')}
    if method == 'fedbn':
        assert local and all('.norm.' in k for k in local)
    assert engine.replies
    for site, reply in engine.replies:
        assert not set(reply.arrays) & local, f'{site} sent local keys'
        if reply.kind == 'update':
            assert set(reply.arrays) == set(ft.shared_keys)


def test_fedrep_trains_heads_then_body(planned, fresh_results):
    from fednnunet.site_training import build_site_trainer
    from fednnunet.site_worker import SiteWorker
    fed = Federation.from_raw(DATASET_ID)
    worker = SiteWorker(fed.sites['A'], DATASET_NAME, device='cpu')
    ft = FederatedTraining(_engine(fed), _config('fedrep', local_iterations=5))
    trainer = build_site_trainer(worker, ft.site_config('A', round=0))
    trainer.start(0)
    heads = {k for k in trainer.unwrapped_network.state_dict() if k.startswith('decoder.seg_layers.')}
    assert trainer.head_steps() == 1
    trainer.before_train_step(0)
    trainable = {n for n, p in trainer.unwrapped_network.named_parameters() if p.requires_grad}
    assert trainable == heads
    trainer.before_train_step(1)
    trainable = {n for n, p in trainer.unwrapped_network.named_parameters() if p.requires_grad}
    assert trainable and not trainable & heads
    trainer.after_local_training()
    assert all(p.requires_grad for p in trainer.unwrapped_network.parameters())
    trainer.close()


def test_fedprox_loss_adds_the_proximal_term(planned, fresh_results):
    from fednnunet.site_training import build_site_trainer
    from fednnunet.site_worker import SiteWorker
    fed = Federation.from_raw(DATASET_ID)
    worker = SiteWorker(fed.sites['B'], DATASET_NAME, device='cpu')
    ft = FederatedTraining(_engine(fed), _config('fedprox', hyperparameters={'mu': 0.5}))
    trainer = build_site_trainer(worker, ft.site_config('B', round=0))
    trainer.start(0)
    trainer.before_local_training({})
    with torch.no_grad():
        for p in trainer.unwrapped_network.parameters():
            p.add_(0.01)
    batch = next(trainer.dataloader_train)
    trainer.network.train()
    output = trainer.network(batch['data'])
    total = trainer.loss(output, batch['target']).item()
    base = trainer.loss.loss(output, batch["target"]).item()
    n = sum(p.numel() for p in trainer.unwrapped_network.parameters())
    assert total - base == pytest.approx(0.5 / 2 * n * 0.01 ** 2, rel=1e-3)
    trainer.network.eval()
    assert trainer.loss(output, batch['target']).item() == pytest.approx(base)
    trainer.close()


def test_fedavg_can_reset_the_site_momentum_every_round(planned, fresh_results):
    """--hp reset_momentum=1 (issue 12's ablation): the SGD momentum the site built in a round is gone when its
    next round's local steps start; by default it stays, as nnU-Net keeps it from epoch to epoch."""
    from fednnunet.site_training import build_site_trainer
    from fednnunet.site_worker import SiteWorker
    fed = Federation.from_raw(DATASET_ID)
    worker = SiteWorker(fed.sites['B'], DATASET_NAME, device='cpu')
    buffers = {}
    for reset in (0, 1):
        ft = FederatedTraining(_engine(fed), _config('fedavg', hyperparameters={'reset_momentum': reset}))
        trainer = build_site_trainer(worker, ft.site_config('B', round=0))
        trainer.start(0)
        trainer.train_round(0, None)
        assert any('momentum_buffer' in st for st in trainer.optimizer.state.values())
        trainer.before_local_training({})
        buffers[reset] = sum(float(st['momentum_buffer'].abs().sum()) for st in trainer.optimizer.state.values())
        trainer.close()
    assert buffers[0] > 0 and buffers[1] == 0
    with pytest.raises(Exception, match=r'reset_momentum must be 0 .* or 1'):
        FederatedTraining(_engine(fed), _config('fedavg', hyperparameters={'reset_momentum': 2}))


def test_stock_nnunet_predict_loads_the_fedavg_global_model(planned, fresh_results, tmp_path):
    fed = Federation.from_raw(DATASET_ID)
    FederatedTraining(_engine(fed), _config(validate=False)).run()
    images = tmp_path / 'in'
    images.mkdir()
    for case in fed.sites['B'].cases:
        os.symlink(fed.sites['B'].image_files(case)[0], images / os.path.basename(fed.sites['B'].image_files(case)[0]))
    env = dict(os.environ, nnUNet_extTrainer=os.path.dirname(__import__('fednnunet.trainers').trainers.__file__))
    stock = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'nnUNetv2_predict'), '-i', str(images),
                            '-o', str(tmp_path / 'stock'), '-d', '501', '-c', '3d_fullres', '-f', '0',
                            '-tr', 'FedAvgTrainer', '-p', PLANS, '-device', 'cpu', '-npp', '1', '-nps', '1'],
                           env=env, capture_output=True, text=True, timeout=600)
    assert stock.returncode == 0, stock.stderr[-3000:]
    predict_entry(['-i', str(images), '-o', str(tmp_path / 'ours'), '-d', '501', '-c', '3d_fullres', '-p', PLANS,
                   '-device', 'cpu'])
    for case in fed.sites['B'].cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'stock' / f'{case}.nii.gz')))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'ours' / f'{case}.nii.gz')))
        np.testing.assert_array_equal(a, b)


def test_bad_training_requests_are_clear(planned, fresh_results, capsys, monkeypatch):
    from fednnunet import method_names
    monkeypatch.setitem(method_names.PLANNED, 'fedplanned', 'a planned method')
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '--method', 'fedplanned'] + FAST)
    assert 'not implemented yet' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '--method', 'fedavg', '--mu', '0.1'] + FAST)
    assert '--mu is not a hyper-parameter of fedavg' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '--method', 'lcfed', '--hp', 'stage2_lr'] + FAST)
    assert "--hp expects KEY=VALUE, got 'stage2_lr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_lowres', '--method', 'fedavg'] + FAST)  # the tiny plans dropped 3d_lowres
    assert f"the plans '{PLANS}' have no configuration '3d_lowres'" in capsys.readouterr().err
    # nnU-Net's cascade stage (as nnU-Net's planner writes it): a method whose network cannot take the previous
    # stage's segmentation refuses it by name, before anything is written (tests/test_cascade.py trains one)
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')))
    plans['configurations']['3d_cascade_fullres'] = {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}
    from fednnunet.trainers.fedavg import FedAvgTrainer
    from fednnunet.trainers.fedmm import FedMMTrainer
    check_trainable(plans, PLANS, '3d_cascade_fullres', FedAvgTrainer)
    with pytest.raises(FederationError, match='an encoder per image channel'):
        check_trainable(plans, PLANS, '3d_cascade_fullres', FedMMTrainer)
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '--method', 'lcfed', '--hp', 'stage2_lr=fast'] + FAST)
    assert '--hp stage2_lr=fast: the value must be a number' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '--method', 'fedavg', '--continue'] + FAST)
    assert 'no federated_round_latest.pth' in capsys.readouterr().err
