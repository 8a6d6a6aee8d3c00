"""HSSF end to end (fednnunet/trainers/hssf.py, strategies.KnowledgeExchange): the public patch bank, knowledge in place
of weights, per-site networks, and the mechanisms that must not silently do nothing."""
import json
import os
import re

import numpy as np
import pytest
import torch

from fednnunet import knowledge, public_patches
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import SERVER_DATA, SITES_FILE, Federation
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.server_data import planning_engine

from conftest import DATASET_NAME
from test_unlabelled_sites import _unlabel

PLANS = 'nnUNetCPUPlans'
TRAIN = ['501', '3d_fullres', '0', '--rounds', '3', '--local-iterations', '2', '--val-iterations', '1', '-p', PLANS,
         '-device', 'cpu', '--hp', 'warmup_rounds=1', 'public_patches=4']


@pytest.fixture
def hssf_federation(raw_copy):
    """A: labelled cases, the plain network. B: unlabelled cases only (and no validation case), a residual-encoder
    network. The server: C's labelled cases as its public set, the wide residual-encoder network."""
    spec = json.load(open(raw_copy / SITES_FILE))
    b = spec['sites']['B']['cases']
    for case in b:
        _unlabel(raw_copy, case)
    spec['sites']['B'] = {'unlabelled': b, 'network': 'resenc'}
    spec['server'] = {'cases': spec['sites'].pop('C')['cases'], 'network': 'resenc_wide'}
    json.dump(spec, open(raw_copy / SITES_FILE, 'w'))
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(planning_engine(SimulationEngine.for_federation(federation), federation), DATASET_NAME,
                        ['2d', '3d_fullres'], 'nnUNetPlannerCPU')
    return federation


def _results():
    from fednnunet.site_training import results_folder
    from fednnunet.trainers.hssf import HSSFTrainer
    return results_folder(DATASET_NAME, HSSFTrainer, PLANS, '3d_fullres')


class Spy:
    """Every party's round metrics (site name, round, metrics), through HSSFTrainer.train_round."""

    def __init__(self, mp):
        from fednnunet.trainers.hssf import HSSFTrainer
        self.rounds = []
        original = HSSFTrainer.train_round

        def train_round(trainer, r, arrays):
            self.rounds.append((trainer.site_name, r, sorted(arrays or {})))
            out = original(trainer, r, arrays)
            self.rounds[-1] += (out[1], sorted(out[0]))
            return out
        mp.setattr(HSSFTrainer, 'train_round', train_round)

    def of(self, party):
        return [(r, received, metrics, sent) for p, r, received, metrics, sent in self.rounds if p == party]


def _one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float16)[labels[:, 0]].transpose(0, 4, 1, 2, 3)


def test_hssf_trains_each_party_its_own_network_and_exchanges_only_predictions(hssf_federation):
    """Per-site networks (A plain, B residual encoder, the server wider still), each an nnU-Net checkpoint; the bank
    goes to each site once; in the warm-up nothing travels back and there is no KL or unlabelled term; after it,
    only float16 predictions travel, and every distinctive term is active: with perfect teachers (the server's
    predictions replaced by the bank's labels, site A's too) the refinement and rectification gates open and their KL
    terms are positive, and site B (unlabelled cases only) trains on pseudo-labels and on feature perturbation."""
    from fednnunet.cli import train_entry
    from fednnunet.strategies import KnowledgeExchange
    aggregate, server_step = KnowledgeExchange.aggregate, KnowledgeExchange.server_step

    def perfect_site_a(self, r, updates, state):
        out = aggregate(self, r, updates, state)
        if 'A' in self.site_knowledge:  # A's predictions become the bank's labels: the best teacher there is
            labels = self.bank[public_patches.LABELS]
            self.site_knowledge['A'] = knowledge.encode_predictions(_one_hot(labels, self.num_classes),
                                                                    np.ones_like(labels, dtype=np.float16))
        return out

    def perfect_server(self, r, state, server=None):
        out = server_step(self, r, state, server)
        labels = self.bank[public_patches.LABELS]
        self.server_knowledge = knowledge.encode_predictions(_one_hot(labels, self.num_classes),
                                                             np.ones_like(labels, dtype=np.float16))
        return out

    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        mp.setattr(KnowledgeExchange, 'aggregate', perfect_site_a)
        mp.setattr(KnowledgeExchange, 'server_step', perfect_server)
        train_entry(TRAIN + ['--method', 'hssf', '--hp', 'image_threshold=0'])
    base = _results()
    configurations = {}
    for party in ('A', 'B', SERVER_DATA):
        ck = torch.load(os.path.join(base, 'sites', party, 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                        weights_only=True)
        configurations[party] = ck['init_args']['configuration']
    assert configurations == {'A': '3d_fullres', 'B': '3d_fullres_resenc', SERVER_DATA: '3d_fullres_resenc_wide'}
    assert not os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth'))  # no global model
    assert [d for d in os.listdir(os.path.dirname(base)) if d.startswith('HSSFTrainer')] == [os.path.basename(base)]
    bank = [public_patches.IMAGES, public_patches.LABELS]
    preds = [knowledge.CONFIDENCE, knowledge.PROBABILITIES]
    for site in ('A', 'B'):
        rounds = spy.of(site)
        assert [r for r, *_ in rounds] == [0, 1, 2]
        assert rounds[0][1] == bank and rounds[1][1] == preds and rounds[2][1] == preds  # the bank once
        assert rounds[0][3] == [] and rounds[1][3] == preds == rounds[2][3]  # nothing back in the warm-up
        warm = rounds[0][2]
        assert 'rf_kl' not in warm and 'pseudo_label_loss' not in warm and 'fp_loss' not in warm
        for r, received, metrics, sent in rounds[1:]:
            assert metrics['rf_gate'] == 1.0 and metrics['rf_kl'] > 0, (site, r, metrics)
    assert 'labelled_loss' in spy.of('A')[1][2] and 'labelled_loss' not in spy.of('B')[1][2]
    for r, received, metrics, sent in spy.of('B')[1:]:
        assert metrics['image_gate'] == 1.0 and metrics['pseudo_label_loss'] > 0 and metrics['fp_loss'] > 0
    server = spy.of(SERVER_DATA)
    assert server[0][1] == bank and 'rc_kl' not in server[0][2]
    for r, received, metrics, sent in server[1:]:
        assert received == sorted(['knowledge/site/0/confidence', 'knowledge/site/0/probabilities',
                                   'knowledge/site/1/confidence', 'knowledge/site/1/probabilities'])
        assert metrics['rc_gate'] > 0 and metrics['rc_kl'] > 0, metrics
    log = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
    for site in ('A', 'B'):  # round 0 carries the bank; rounds 1 and 2 the server's predictions, the same size
        sent = [r['bytes_to_sites'][site] for r in log]
        assert sent[1] == sent[2] and sent[0] != sent[1] and min(sent) > 0
    assert log[2]['server']['num_training_cases'] > 0


def test_hssf_in_2d_trains_the_2d_networks_and_exchanges_2d_predictions(hssf_federation):
    """The 2d configuration: each party's 2d network as planned, a bank of 2d patches, predictions both ways after
    the warm-up and every term computed."""
    from fednnunet.cli import train_entry
    from fednnunet.site_training import results_folder
    from fednnunet.trainers.hssf import HSSFTrainer
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        captured = {}
        set_bank = HSSFTrainer.set_bank

        def keep(self, images, labels):
            captured[self.site_name] = np.asarray(images).shape
            return set_bank(self, images, labels)
        mp.setattr(HSSFTrainer, 'set_bank', keep)
        train_entry(['501', '2d', '0', '--rounds', '2', '--local-iterations', '2', '--val-iterations', '1', '-p', PLANS,
                     '-device', 'cpu', '--method', 'hssf', '--hp', 'warmup_rounds=1', 'public_patches=4'])
    base = results_folder(DATASET_NAME, HSSFTrainer, PLANS, '2d')
    configurations = {p: torch.load(os.path.join(base, 'sites', p, 'fold_0', 'checkpoint_final.pth'),
                                    map_location='cpu', weights_only=True)['init_args']['configuration']
                      for p in ('A', 'B', SERVER_DATA)}
    assert configurations == {'A': '2d', 'B': '2d_resenc', SERVER_DATA: '2d_resenc_wide'}
    assert {len(shape) for shape in captured.values()} == {4} and set(captured) == {'A', 'B', SERVER_DATA}
    for site in ('A', 'B'):
        r, received, metrics, sent = spy.of(site)[1]
        assert received == [knowledge.CONFIDENCE, knowledge.PROBABILITIES] == sent and 'rf_kl' in metrics
    assert 'pseudo_label_loss' in spy.of('B')[1][2] or spy.of('B')[1][2]['image_gate'] == 0
    assert spy.of('B')[1][2]['fp_loss'] > 0
    assert 'rc_kl' in spy.of(SERVER_DATA)[1][2]


def _final_weights(party):
    ck = torch.load(os.path.join(_results(), 'sites', party, 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                    weights_only=True)
    return ck['network_weights']


def test_a_site_with_bad_predictions_is_left_out_and_a_resumed_run_equals_the_uninterrupted_one(
        hssf_federation, tmp_path, monkeypatch, capsys):
    """A site whose predictions are not probabilities (here B's, scaled by 3) is named in the log, its predictions
    never reach the server, and the run goes on with A's; and --continue after a crash in round 2 (with the same
    bad site) gives the same networks as the run without it (the bank redrawn the same, the server's predictions
    and every party's head and optimizer restored, the unlabelled site's loader drawing the same batches)."""
    from fednnunet.cli import train_entry
    from fednnunet.strategies import KnowledgeExchange
    from fednnunet.trainers.hssf import HSSFTrainer
    from conftest import point_nnunet_folder
    predict_bank = HSSFTrainer.predict_bank

    def scaled(self):
        out = predict_bank(self)
        if self.site_name == 'B':
            out[knowledge.PROBABILITIES] = (out[knowledge.PROBABILITIES].astype(np.float32) * 3).astype(np.float16)
        return out
    monkeypatch.setattr(HSSFTrainer, 'predict_bank', scaled)
    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'straight')
    capsys.readouterr()
    train_entry(TRAIN + ['--method', 'hssf'])  # no spy here: the resumed run below must run the same code
    out = capsys.readouterr().out
    for r in (1, 2):
        assert f"round {r}: predictions of B left out: site 'B', field 'knowledge/probabilities'" in out, out[-3000:]
    server_log = open(os.path.join(_results(), 'sites', SERVER_DATA, 'fold_0', 'training_log.txt')).read()
    assert re.search(r'round 1: .*rc_kl \d', server_log) and re.search(r'round 2: .*rc_kl \d', server_log)  # A's
    log = json.load(open(os.path.join(_results(), 'fold_0', 'federation_log.json')))
    assert [sorted(r['sites']) for r in log] == [['A', 'B']] * 3  # B still trains; only its knowledge is refused
    straight = {p: _final_weights(p) for p in ('A', 'B', SERVER_DATA)}

    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'resumed')
    configure_fit = KnowledgeExchange.configure_fit

    def crash(self, r, site, state):
        if r == 2:
            raise KeyboardInterrupt('simulated crash')
        return configure_fit(self, r, site, state)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KnowledgeExchange, 'configure_fit', crash)
        with pytest.raises(KeyboardInterrupt):
            train_entry(TRAIN + ['--method', 'hssf'])
    assert not os.path.isfile(os.path.join(_results(), 'sites', 'A', 'fold_0', 'checkpoint_final.pth'))
    train_entry(TRAIN + ['--method', 'hssf', '--continue'])
    for party, weights in straight.items():
        resumed = _final_weights(party)
        assert set(resumed) == set(weights)
        for k in weights:  # exactly: a loader built mid-round after the resume once changed site B's weights
            torch.testing.assert_close(resumed[k], weights[k], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=k, p=party: f'{p} {k}: {m}')
