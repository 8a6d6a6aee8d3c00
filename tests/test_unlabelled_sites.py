"""Sites without labelled training cases: planned without them, refused by supervised methods, trained on their
unlabelled cases by a semi-supervised one, validated on their ``validation`` cases where they have some."""
import json
import os
import re

import numpy as np
import pytest
import torch

from fednnunet.cli import train_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import SITES_FILE, UNLABELLED_IMAGES_FOLDER, Federation, parse_sites, server_folder, \
    site_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.preprocessing import site_splits, unlabelled_data_folder
from fednnunet.strategies import FedAvg, SiteUpdate
from fednnunet.trainers.fedfixmatch import FedFixMatchTrainer
from fednnunet.training_server import mean_of_measured

from conftest import DATASET_NAME

TRAIN = ['501', '3d_fullres', '0', '--rounds', '2', '--local-iterations', '2', '--val-iterations', '1', '-p',
         'nnUNetCPUPlans', '-device', 'cpu']


def _unlabel(raw, case: str):
    """The case's images move to imagesTrUnlabelled/ and its label is deleted: the site never had one."""
    os.makedirs(raw / UNLABELLED_IMAGES_FOLDER, exist_ok=True)
    for f in os.listdir(raw / 'imagesTr'):
        if f.startswith(case + '_'):
            os.replace(raw / 'imagesTr' / f, raw / UNLABELLED_IMAGES_FOLDER / f)
    for f in os.listdir(raw / 'labelsTr'):
        if f.startswith(case + '.'):
            os.remove(raw / 'labelsTr' / f)


@pytest.fixture
def unlabelled_sites(raw_copy):
    """A keeps its labels. B has unlabelled cases only and no validation case. C has one unlabelled case and one
    labelled case held out for validation only."""
    with open(raw_copy / SITES_FILE) as f:
        spec = json.load(f)
    b, c = spec['sites']['B']['cases'], spec['sites']['C']['cases']
    for case in b + c[:1]:
        _unlabel(raw_copy, case)
    spec['sites']['B'] = {'unlabelled': b}
    spec['sites']['C'] = {'unlabelled': c[:1], 'validation': c[1:]}
    with open(raw_copy / SITES_FILE, 'w') as f:
        json.dump(spec, f)
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
    return federation


def test_sites_without_labelled_training_cases_are_planned_from_the_labelled_ones(unlabelled_sites):
    federation = unlabelled_sites
    a, c = federation.sites['A'], federation.sites['C']
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')) as f:
        fingerprint = json.load(f)
    assert len(fingerprint['spacings']) == len(a.cases)  # only A's labelled training cases are fingerprinted
    negotiation = json.load(open(os.path.join(server_folder(DATASET_NAME), 'federation',
                                              'negotiation_nnUNetCPUPlans.json')))
    assert negotiation['sites']['B'] == {'num_cases': 0, 'num_unlabelled': 2, 'num_validation': 0,
                                         'gpu_memory_gb': None}
    assert negotiation['sites']['C']['num_validation'] == 1
    # C: its validation case is preprocessed with its label, in every fold's validation split and in no training one
    folder = site_folder(DATASET_NAME, 'C')
    assert os.path.isfile(os.path.join(folder, 'nnUNetCPUPlans_3d_fullres', c.validation[0] + '.pkl'))
    assert os.path.isfile(os.path.join(folder, 'gt_segmentations', c.validation[0] + '.nii.gz'))
    splits = json.load(open(os.path.join(folder, 'splits_final.json')))
    assert splits == [{'train': [], 'val': list(c.validation)}] * 5
    assert os.path.isfile(os.path.join(unlabelled_data_folder(folder, 'nnUNetCPUPlans_3d_fullres'),
                                       c.unlabelled[0] + '.pkl'))
    # B: nothing labelled at all
    b_folder = site_folder(DATASET_NAME, 'B')
    assert not [f for f in os.listdir(os.path.join(b_folder, 'nnUNetCPUPlans_3d_fullres')) if f.endswith('.pkl')]
    assert json.load(open(os.path.join(b_folder, 'splits_final.json'))) == [{'train': [], 'val': []}] * 5


def test_a_supervised_method_refuses_a_site_without_labelled_training_cases(unlabelled_sites, capsys):
    with pytest.raises(SystemExit):
        train_entry(TRAIN + ['--method', 'fedavg'])
    err = capsys.readouterr().err
    assert "site 'B'" in err and "field 'cases'" in err and 'semi-supervised method (fedfixmatch, hssf)' in err, err
    assert not os.listdir(os.environ['nnUNet_results'])  # nothing written


def test_fedfixmatch_trains_unlabelled_only_sites_after_the_warm_up_and_validates_where_it_can(unlabelled_sites,
                                                                                              capsys):
    train_entry(TRAIN + ['--method', 'fedfixmatch', '--hp', 'warmup_rounds=1', '--hp', 'confidence=0.5'])
    out = capsys.readouterr().out
    assert 'unlabelled cases: A 0, B 2, C 1' in out
    base = os.path.join(os.environ['nnUNet_results'], DATASET_NAME, 'FedFixMatchTrainer__nnUNetCPUPlans__3d_fullres')
    for site in ('B', 'C'):
        log = open(os.path.join(base, 'sites', site, 'fold_0', 'training_log.txt')).read()
        assert 'round 0: nothing to train on in this round' in log  # the warm-up: no label, no unlabelled term yet
        term = re.search(r'round 1: unlabelled term over 2 steps: loss ([0-9.]+), confident voxels ([0-9.]+)%', log)
        assert term and float(term.group(2)) > 0, log[-2000:]  # after it: the unlabelled term alone, every step
    b_log = open(os.path.join(base, 'sites', 'B', 'fold_0', 'training_log.txt')).read()
    assert 'this site has no validation case' in b_log and 'nothing to validate' in b_log
    rounds = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
    # the merge weights: an idle site weighs 0 in the warm-up, its unlabelled cases afterwards
    assert [r['sites']['B']['num_training_cases'] for r in rounds] == [0, 2]
    assert [r['sites']['C']['num_training_cases'] for r in rounds] == [0, 1]
    assert [r['sites']['A']['num_training_cases'] for r in rounds] == [2, 2]  # fold 0 of A's 3 cases
    assert np.isnan(rounds[0]['sites']['B']['pseudo_dice']) and not np.isnan(rounds[0]['sites']['C']['pseudo_dice'])
    summary = json.load(open(os.path.join(base, 'fold_0', 'federated_summary.json')))
    assert set(summary['final_validation']['per_site']) == {'A', 'C'}  # B has nothing to validate on
    assert summary['final_validation']['per_site']['C']['num_cases'] == 1
    # B's final model is the global one plus what it did not change: a full nnU-Net checkpoint all the same
    assert os.path.isfile(os.path.join(base, 'sites', 'B', 'fold_0', 'checkpoint_final.pth'))
    assert not os.path.isfile(os.path.join(base, 'sites', 'B', 'fold_0', 'checkpoint_best.pth'))


def test_an_unlabelled_step_is_nnunets_train_step_with_the_pseudo_label_loss_alone(unlabelled_sites):
    """At a site without labels, a step's loss is w_u x L_u of the weak view's pseudo-labels, and it moves the
    weights; with nothing confident it is 0 and moves nothing."""
    folder = site_folder(DATASET_NAME, 'B')
    plans = json.load(open(os.path.join(folder, 'nnUNetCPUPlans.json')))
    plans['continue_training'] = False
    trainer = FedFixMatchTrainer(plans, '3d_fullres', 0, json.load(open(os.path.join(folder, 'dataset.json'))),
                                 torch.device('cpu'))
    trainer.configure_federation('B', 1, folder, str(os.environ['nnUNet_results']), 2, 2, 1, 12345,
                                 {'warmup_rounds': 0, 'confidence': 0.0, 'unlabelled_weight': 0.5})
    trainer.unlabelled_cases = list(unlabelled_sites.sites['B'].unlabelled)
    trainer.start(0)
    try:
        assert trainer.dataloader_train is None and trainer.dataloader_val is None
        assert trainer.num_training_cases == 2 and trainer.can_train_this_round()
        net = trainer.unwrapped_network
        seen = {}
        original = trainer.pseudo_label_loss

        def spy(teacher, strong):
            loss, share = original(teacher, strong)
            seen.update(loss=float(loss.detach()))
            return loss, share

        trainer.pseudo_label_loss = spy
        before = [p.detach().clone() for p in net.parameters()]
        out = trainer.unlabelled_step()
        # by hand: cross-entropy of the strong view (the weights before the step) to the weak view's argmax
        assert float(out['loss']) == pytest.approx(0.5 * seen['loss'], rel=1e-5)
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(net.parameters(), before))
        assert moved > 0
        assert any(p.grad is not None and bool(p.grad.any()) for p in net.parameters())
        trainer.confidence = 1.01  # nothing is this confident
        out = trainer.unlabelled_step()
        assert float(out['loss']) == 0.0
        # no gradient at all (the step still applies SGD's weight decay and momentum, as nnU-Net's does)
        assert all(p.grad is None or not bool(p.grad.any()) for p in net.parameters())
        trainer.current_epoch, trainer.warmup_rounds = 0, 1
        assert not trainer.can_train_this_round()  # the warm-up: nothing to train on
    finally:
        trainer.close()


def test_sites_json_lists_validation_cases_and_needs_a_training_case_somewhere(tmp_path):
    sites = parse_sites({'sites': {'A': {'cases': ['a1', 'a2'], 'validation': ['a3']},
                                   'B': {'unlabelled': ['b1']}}}, str(tmp_path))
    assert sites['A'].validation == ('a3',) and sites['A'].labelled == ('a1', 'a2', 'a3')
    assert sites['B'].cases == () and sites['B'].unlabelled == ('b1',)
    with pytest.raises(FederationError, match="'validation' must be a list"):
        parse_sites({'sites': {'A': {'cases': ['a1'], 'validation': 'a3'}}}, str(tmp_path))
    federation = Federation('X', str(tmp_path), parse_sites({'sites': {'A': {'validation': ['a3']}}}, str(tmp_path)))
    with pytest.raises(FederationError, match='no training case') as e:
        federation.validate_assignment()
    assert e.value.site == 'A'
    # a hospital's own sites.json may list only its unlabelled cases (over Flower it lists that hospital alone);
    # the planning refuses a federation in which no participant has a labelled case
    Federation('X', str(tmp_path), parse_sites({'sites': {'A': {'unlabelled': ['a1']}}},
                                               str(tmp_path))).validate_assignment()
    federation = Federation('X', str(tmp_path), parse_sites(
        {'sites': {'A': {'cases': ['a1'], 'validation': ['a2']}, 'B': {'cases': ['a2']}}}, str(tmp_path)))
    with pytest.raises(FederationError, match='assigned to two sites'):
        federation.validate_assignment()
    # held-out validation cases: every fold trains on every training case and validates on them
    assert site_splits(['a1', 'a2'], validation=['a3']) == [{'train': ['a1', 'a2'], 'val': ['a3']}] * 5


def test_a_site_that_trained_on_nothing_weighs_nothing_in_the_merge():
    g = {'w': np.zeros(3, np.float32)}
    trained = SiteUpdate('A', {'w': np.full(3, 2.0, np.float32)}, 4)
    idle = SiteUpdate('B', {'w': np.full(3, 7.0, np.float32)}, 0)
    for weighting in ('num_examples', 'uniform'):
        merged = FedAvg(weighting).aggregate(0, [trained, idle], g)
        np.testing.assert_array_equal(merged['w'], trained.arrays['w'])
    np.testing.assert_array_equal(FedAvg().aggregate(0, [idle], g)['w'], g['w'])  # no one trained: unchanged
    # the logged losses: the weighted mean over the sites that measured one and trained
    assert mean_of_measured([0.5, float('nan')], np.array([4.0, 1.0])) == 0.5
    assert mean_of_measured([0.5, 0.2, 0.1], np.array([3.0, 0.0, 1.0])) == pytest.approx(0.4)
    assert mean_of_measured([0.5, 0.2], np.array([0.0, 0.0])) == pytest.approx(0.35)
    assert np.isnan(mean_of_measured([float('nan')], np.array([1.0])))
