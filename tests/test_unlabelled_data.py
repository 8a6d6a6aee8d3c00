"""A site's unlabelled cases: preprocessed by nnU-Net's preprocessor with the shared plans, outside the fingerprint,
and loaded as a weak and a strong view of the same patch."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from fednnunet.cli import train_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import SITES_FILE, UNLABELLED_IMAGES_FOLDER, Federation, server_folder, site_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.preprocessing import unlabelled_data_folder
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.trainers.fedfixmatch import FedFixMatchTrainer
from fednnunet.unlabelled_data import TwoViewTransform, split_views

from conftest import DATASET_NAME

SITE = 'A'


@pytest.fixture
def with_unlabelled(raw_copy):
    """Site A gets two unlabelled cases: copies of two of its labelled cases' images under new identifiers
    (so the preprocessed images can be compared with nnU-Net's preprocessing of the labelled ones)."""
    with open(raw_copy / SITES_FILE) as f:
        spec = json.load(f)
    copies = {}
    os.makedirs(raw_copy / UNLABELLED_IMAGES_FOLDER)
    for case in spec['sites'][SITE]['cases'][:2]:
        new = f'{case}_u'
        for f in os.listdir(raw_copy / 'imagesTr'):
            if f.startswith(case + '_'):
                shutil.copy(raw_copy / 'imagesTr' / f, raw_copy / UNLABELLED_IMAGES_FOLDER / f.replace(case, new, 1))
        copies[new] = case
    spec['sites'][SITE]['unlabelled'] = sorted(copies)
    with open(raw_copy / SITES_FILE, 'w') as f:
        json.dump(spec, f)
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['2d', '3d_fullres'],
                        'nnUNetPlannerCPU')
    return federation, copies


def test_unlabelled_cases_are_preprocessed_like_labelled_ones_and_stay_out_of_the_fingerprint(with_unlabelled):
    federation, copies = with_unlabelled
    folder = site_folder(DATASET_NAME, SITE)
    labelled = os.path.join(folder, 'nnUNetCPUPlans_3d_fullres')
    unlabelled = unlabelled_data_folder(folder, 'nnUNetCPUPlans_3d_fullres')
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(unlabelled)) == sorted(copies)
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(unlabelled_data_folder(folder, 'nnUNetCPUPlans_2d'))) == \
        sorted(copies)
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(labelled)) == sorted(federation.sites[SITE].cases)
    mine = nnUNetDatasetBlosc2(unlabelled, sorted(copies))
    theirs = nnUNetDatasetBlosc2(labelled, sorted(copies.values()))
    for new, case in copies.items():
        d1, s1, _, p1 = mine.load_case(new)
        d2, s2, _, p2 = theirs.load_case(case)
        np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))  # same image, same plans: same voxels
        assert set(np.unique(np.asarray(s1))) <= {-1, 0}  # no label: only nnU-Net's outside-the-brain mask
        assert 'class_locations' not in p1
        assert p1['bbox_used_for_cropping'] == p2['bbox_used_for_cropping']
    # the fingerprint holds the labelled cases only (its foreground intensities need labels)
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')) as f:
        fingerprint = json.load(f)
    assert len(fingerprint['spacings']) == sum(len(s.cases) for s in federation.sites.values())
    # the other sites have none, and no folder for them
    for other in federation.sites:
        if other != SITE:
            assert not os.path.exists(unlabelled_data_folder(site_folder(DATASET_NAME, other),
                                                             'nnUNetCPUPlans_3d_fullres'))


def _site_trainer(trainer_class, hyperparameters=None, configuration='3d_fullres'):
    """Site A's trainer (CPU, tiny plans), initialized as a site initializes it."""
    folder = site_folder(DATASET_NAME, SITE)
    with open(os.path.join(folder, 'nnUNetCPUPlans.json')) as f:
        plans = json.load(f)
    with open(os.path.join(folder, 'dataset.json')) as f:
        dataset_json = json.load(f)
    plans['continue_training'] = False  # nnU-Net 2.8.1's trainer reads it (fednnunet's site trainer sets it too)
    trainer = trainer_class(plans, configuration, 0, dataset_json, torch.device('cpu'))
    trainer.configure_federation(SITE, 0, folder, str(os.environ['nnUNet_results']), 2, 2, 1, 12345,
                                 hyperparameters)
    trainer.initialize()
    return trainer, dataset_json


@pytest.mark.parametrize('configuration', ['2d', '3d_fullres'])
def test_the_unlabelled_loader_gives_two_aligned_views_of_a_patch(with_unlabelled, configuration):
    federation, copies = with_unlabelled
    trainer, dataset_json = _site_trainer(FedAvgTrainer, configuration=configuration)
    try:
        torch.manual_seed(0)
        np.random.seed(0)
        batch = next(trainer.get_unlabelled_dataloader())
        channels = len(dataset_json['channel_names'])
        patch = tuple(trainer.configuration_manager.patch_size)
        assert batch['data'].shape == (trainer.batch_size, 2 * channels, *patch)
        assert set(batch['keys']) <= set(copies)
        weak, strong = split_views(batch['data'])
        assert (weak - strong).abs().mean() > 0.05  # the strong view is another view
        for b in range(trainer.batch_size):
            w, s = weak[b].flatten(), strong[b].flatten()
            aligned = torch.corrcoef(torch.stack([w, s]))[0, 1]
            shifted = torch.corrcoef(torch.stack([w, strong[b].roll(patch[0] // 3, dims=1).flatten()]))[0, 1]
            assert aligned > 0.5 and aligned > shifted + 0.2, (aligned, shifted)  # the same voxels, not a shift
    finally:
        trainer.close()
    assert trainer.dataloader_unlabelled is None


def test_the_unlabelled_loader_runs_in_nnunets_augmentation_workers_and_stops_with_the_trainer(with_unlabelled,
                                                                                              monkeypatch):
    monkeypatch.setenv('nnUNet_n_proc_DA', '1')  # as nnU-Net runs by default: background workers
    trainer, dataset_json = _site_trainer(FedFixMatchTrainer)
    try:
        loader = trainer.get_unlabelled_dataloader()
        workers = [p for p in getattr(loader, '_processes', [])]
        assert workers and all(p.is_alive() for p in workers)
        batch = next(loader)
        assert batch['data'].shape[1] == 2 * len(dataset_json['channel_names'])
        assert trainer.has_augmentation_workers
        trainer.pause_augmentation_workers()
        trainer.restart_dataloaders()
        assert next(loader)['data'].shape == batch['data'].shape
    finally:
        trainer.close()
    for p in workers:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in workers) and trainer.dataloader_unlabelled is None


class _Times(BasicTransform):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def _apply_to_image(self, img, **params):
        return img * self.factor


def test_two_views_are_the_weak_transform_then_the_strong_one_on_a_copy():
    image = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    out = TwoViewTransform(_Times(2.0), _Times(3.0))(image=image.clone(), segmentation=torch.zeros(1, 4, 4, 4))
    weak, strong = split_views(out['image'][None])
    torch.testing.assert_close(weak[0], 2 * image)
    torch.testing.assert_close(strong[0], 6 * image)
    with pytest.raises(ValueError, match='even number of channels'):
        split_views(torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------- fedfixmatch
def test_fedfixmatch_hyperparameters_resolve_and_refuse_what_cannot_work():
    values, notes = FedFixMatchTrainer.resolve_hyperparameters({}, 20)
    assert values['warmup_rounds'] == 2 and values['confidence'] == 0.95 and values['unlabelled_weight'] == 1.0
    assert FedFixMatchTrainer.resolve_hyperparameters({'warmup_rounds': 0}, 20)[0]['warmup_rounds'] == 0
    assert 'labelled cases only' in ' '.join(FedFixMatchTrainer.resolve_hyperparameters(
        {'unlabelled_weight': 0}, 20)[1])
    for bad, field in (({'warmup_rounds': 20}, 'warmup_rounds'), ({'warmup_rounds': 2.5}, 'warmup_rounds'),
                       ({'confidence': 1.5}, 'confidence'), ({'confidence': None}, 'confidence'),
                       ({'unlabelled_weight': -1}, 'unlabelled_weight'),
                       ({'unlabelled_weight': float('nan')}, 'unlabelled_weight'),
                       ({'warmup_fraction': 1}, 'warmup_fraction')):
        with pytest.raises(FederationError) as e:
            FedFixMatchTrainer.resolve_hyperparameters(bad, 20)
        assert e.value.field == field


def test_fedfixmatch_unlabelled_term_is_the_masked_cross_entropy_and_moves_the_weights(with_unlabelled):
    trainer, _ = _site_trainer(FedFixMatchTrainer, {'warmup_rounds': 0, 'confidence': 0.0})
    try:
        torch.manual_seed(0)
        np.random.seed(0)
        data = next(trainer.get_unlabelled_dataloader())['data']
        weak, strong = split_views(data)
        net = trainer.network
        # by hand: pseudo-label and confidence from the weak view, cross-entropy of the strong view where confident
        with torch.no_grad():
            p = torch.softmax(net(weak)[0].float(), 1)
        confidence, pseudo = p.max(1)
        logp = torch.log_softmax(net(strong)[0].float(), 1)
        ce = -logp.gather(1, pseudo[:, None])[:, 0]
        for threshold in (0.0, float(confidence.median()), 1.0):
            trainer.confidence = threshold
            mask = (confidence >= threshold).float()
            net.zero_grad()
            loss, share = trainer.unlabelled_loss(data)
            assert share == pytest.approx(float(mask.mean()))
            assert float(loss) == pytest.approx(float((ce * mask).mean()), rel=1e-5)
            loss.backward()
            grad = sum(float(q.grad.abs().sum()) for q in net.parameters() if q.grad is not None)
            if threshold == 1.0 and share == 0:
                assert float(loss) == 0 and grad == 0  # nothing confident: the term does nothing
            else:
                assert 0 < share and grad > 0  # confident voxels: the term moves the weights
        assert 0.3 < float(confidence.ge(float(confidence.median())).float().mean()) < 0.7
    finally:
        trainer.close()


def test_fedfixmatch_adds_its_term_to_nnunets_training_loss_only_after_the_warm_up(with_unlabelled):
    trainer, _ = _site_trainer(FedFixMatchTrainer, {'warmup_rounds': 1, 'confidence': 0.0, 'unlabelled_weight': 0.7})
    try:
        torch.manual_seed(0)
        np.random.seed(0)
        fixed = next(trainer.get_unlabelled_dataloader())
        trainer.dataloader_unlabelled = iter([fixed] * 4)  # the same unlabelled batch for every draw
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()  # nnU-Net's labelled loaders
        labelled = next(trainer.dataloader_train)
        net = trainer.network
        net.train()
        out = net(labelled['data'])
        nnunet = trainer.loss.loss(out, labelled['target'])  # nnU-Net's own loss, unwrapped
        trainer.current_epoch = 0  # warm-up: nnU-Net's loss alone
        assert float(trainer.loss(out, labelled['target'])) == pytest.approx(float(nnunet))
        trainer.current_epoch = 1
        total = trainer.loss(out, labelled['target'])
        term, _ = trainer.unlabelled_loss(fixed['data'])
        assert float(term) > 0
        assert float(total) == pytest.approx(float(nnunet) + 0.7 * float(term), rel=1e-5)
        net.eval()  # validation: nnU-Net's loss alone
        assert float(trainer.loss(out, labelled['target'])) == pytest.approx(float(nnunet))
    finally:
        trainer.dataloader_unlabelled = None
        trainer.close()


def test_fedfixmatch_trains_on_the_unlabelled_cases_after_its_warm_up(with_unlabelled, capsys):
    federation, copies = with_unlabelled
    train_entry(['501', '3d_fullres', '0', '--method', 'fedfixmatch', '--rounds', '2', '--local-iterations', '3',
                 '--val-iterations', '1', '-p', 'nnUNetCPUPlans', '-device', 'cpu', '--hp', 'warmup_rounds=1',
                 '--hp', 'confidence=0.5'])
    out = capsys.readouterr().out
    assert 'unlabelled cases: A 2, B 0, C 0' in out
    base = os.path.join(os.environ['nnUNet_results'], DATASET_NAME, 'FedFixMatchTrainer__nnUNetCPUPlans__3d_fullres')
    log = open(os.path.join(base, 'sites', SITE, 'fold_0', 'training_log.txt')).read()
    assert 'round 0: warm-up, no unlabelled term' in log
    term = re.search(r'round 1: unlabelled term over 3 steps: loss ([0-9.]+), confident voxels ([0-9.]+)%', log)
    assert term and float(term.group(2)) > 0, log[-2000:]
    other = open(os.path.join(base, 'sites', 'B', 'fold_0', 'training_log.txt')).read()
    assert 'unlabelled term' not in other and 'no unlabelled cases; labelled cases only' in other  # labels only
    assert os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth'))  # one shared network
    summary = json.load(open(os.path.join(base, 'fold_0', 'federated_summary.json')))
    assert set(summary['final_validation']['per_site']) == set(federation.sites)


def test_fedfixmatch_without_any_unlabelled_case_is_a_clear_error(planned, fresh_results, capsys):
    with pytest.raises(SystemExit):
        train_entry(['501', '3d_fullres', '0', '--method', 'fedfixmatch', '--rounds', '2', '--local-iterations', '1',
                     '--val-iterations', '1', '-p', 'nnUNetCPUPlans', '-device', 'cpu'])
    err = capsys.readouterr().err
    assert "field 'unlabelled'" in err and 'no site has any' in err, err
    assert not os.listdir(fresh_results)  # nothing written


class _LyingEngine(SimulationEngine):
    """Site A answers the training check with a number of unlabelled cases that is not a count."""

    def ask(self, requests):
        replies = super().ask(requests)
        for site, reply in replies.items():
            if reply.kind == 'ready' and site == SITE:
                reply.config['num_unlabelled_cases'] = '10**9'
            elif reply.kind == 'ready':
                reply.config['num_unlabelled_cases'] = 0
        return replies


def test_a_site_count_of_unlabelled_cases_that_is_not_a_number_counts_as_none(with_unlabelled):
    from fednnunet.site_worker import SiteWorker
    from fednnunet.training_server import FederatedTraining, TrainingConfig
    federation, _ = with_unlabelled
    engine = _LyingEngine({n: SiteWorker(s, federation.dataset_name, 1, device='cpu')
                           for n, s in federation.sites.items()})
    training = FederatedTraining(engine, TrainingConfig(DATASET_NAME, '3d_fullres', 0, 'fedfixmatch', 'nnUNetCPUPlans',
                                                        rounds=2, local_iterations=1, val_iterations=1))
    with pytest.raises(FederationError, match='no site has any'):
        training.check_sites_ready()
