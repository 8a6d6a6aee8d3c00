"""A run's state: a new run never mixes with an earlier one, --continue resumes only the same run, a round is one
nnU-Net epoch through nnU-Net's own hooks, and the two-stage methods' defaults and hand-over."""
import json
import os

import numpy as np
import pytest
import torch

from fednnunet.errors import FederationError
from fednnunet.federation import Federation
from fednnunet.methods import METHODS, Method
from fednnunet.site_training import SiteStateStore
from fednnunet.strategies import SiteUpdate, TwoStageFedAvg
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.trainers.feddp import FedDPTrainer
from fednnunet.trainers.lcfed import LCFedTrainer
from fednnunet.training_server import FederatedTraining

from conftest import DATASET_ID
from test_training import RecordingEngine, _config, _engine, _results


def _listing(folder):
    """Every file under folder with its modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[path] = os.stat(path).st_mtime_ns
    return out


# ---------------------------------------------------------------- a new run never mixes with an old one
class _Trainer:
    """What SiteStateStore needs of a trainer."""

    def __init__(self, folder, run_id):
        self.output_folder, self.run_id, self.site_name = str(folder), run_id, 'A'


def test_state_files_belong_to_their_run(tmp_path):
    """The earlier bug: the store kept the two highest-named round_*.pth of the folder, so an earlier, longer run's
    files outranked the file just written, and latest() found nothing."""
    store = SiteStateStore()
    old, new = _Trainer(tmp_path, 'a' * 32), _Trainer(tmp_path, 'b' * 32)
    for r in (9, 10):
        store.save(old, r, {'run_id': old.run_id, 'round': r})
    store.save(new, 1, {'run_id': new.run_id, 'round': 1})
    rounds_done, state = store.latest(new, 1)
    assert rounds_done == 1 and state == {'run_id': new.run_id, 'round': 1}
    assert store.latest(new, 0) == (None, None)
    assert store.latest(old, 10)[0] == 10  # the other run's files are untouched
    store.save(new, 2, {'run_id': new.run_id, 'round': 2})
    store.save(new, 3, {'run_id': new.run_id, 'round': 3})
    assert sorted(os.listdir(tmp_path / 'site_state' / new.run_id)) == ['round_0002.pth', 'round_0003.pth']
    assert store.other_runs(new) == [old.run_id]
    with pytest.raises(ValueError, match='not a run id'):
        store.latest(_Trainer(tmp_path, '../../etc'), 1)


def test_a_new_run_refuses_an_earlier_run_and_overwrite_replaces_it(planned, fresh_results):
    fed = Federation.from_raw(DATASET_ID)
    first = FederatedTraining(_engine(fed), _config('fedbn', rounds=3, local_iterations=2, validate=False))
    first.run()
    base = _results('fedbn')
    before = _listing(base)
    for overwrite_check in range(2):  # the server refuses its folder; then (server folder cleared) each site refuses
        with pytest.raises(FederationError, match='holds an earlier training run') as e:
            FederatedTraining(_engine(fed), _config('fedbn', rounds=1, local_iterations=2, validate=False)).run()
        assert '--continue' in str(e.value) and '--overwrite' in str(e.value)
        assert _listing(base) == before, 'a refused run wrote or deleted something'
        if overwrite_check == 0:
            for f in ('federated_round_latest.pth', 'federation_log.json', 'federated_summary.json'):
                os.remove(os.path.join(base, 'fold_0', f))
            before = _listing(base)
    assert "site 'A'" in str(e.value)

    second = FederatedTraining(_engine(fed), _config('fedbn', rounds=1, local_iterations=2, validate=False))
    second.run(overwrite=True)
    assert [r['round'] for r in json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))] == [0]
    for site in 'ABC':
        state_root = os.path.join(base, 'sites', site, 'fold_0', 'site_state')
        assert os.listdir(state_root) == [second.run_id]
        assert os.listdir(os.path.join(state_root, second.run_id)) == ['round_0001.pth']
        ckpt = torch.load(os.path.join(base, 'sites', site, 'fold_0', 'checkpoint_final.pth'), weights_only=True)
        assert ckpt['current_epoch'] == 1  # the new run's model, not the earlier run's 3 rounds
    with pytest.raises(FederationError, match='exclude each other'):
        FederatedTraining(_engine(fed), _config('fedbn', rounds=1)).run(continue_training=True, overwrite=True)


CHANGED_SETTINGS = [({'val_iterations': 1}, 'val_iterations'), ({'hyperparameters': {'mu': 0.5}}, 'hyperparameters'),
                    ({'strategy_options': {'weighting': 'uniform'}}, 'strategy_options'),
                    ({'validate': True}, 'validate')]


def test_continue_refuses_any_changed_setting_by_name(planned, fresh_results):
    """One interrupted run; resuming it with any changed setting is refused by name and writes nothing; min_sites
    is operational: a resume may ask for another quorum."""
    fed = Federation.from_raw(DATASET_ID)
    settings = dict(rounds=3, local_iterations=2, validate=False)
    with pytest.raises(KeyboardInterrupt):
        FederatedTraining(_engine(fed, RecordingEngine, stop_at_round=1), _config('fedprox', **settings)).run()
    base = _results('fedprox')
    before = _listing(base)
    for change, named in CHANGED_SETTINGS:
        with pytest.raises(FederationError, match=f'--continue: {named} was') as e:
            FederatedTraining(_engine(fed), _config('fedprox', **{**settings, **change})).run(continue_training=True)
        assert '--overwrite' in str(e.value)
        assert _listing(base) == before, named
    FederatedTraining(_engine(fed), _config('fedprox', min_sites=2, **settings)).run(continue_training=True)


def test_continue_refuses_changed_plans(planned, fresh_results, monkeypatch):
    fed = Federation.from_raw(DATASET_ID)
    with pytest.raises(KeyboardInterrupt):
        FederatedTraining(_engine(fed, RecordingEngine, stop_at_round=1), _config(rounds=2, validate=False)).run()
    import fednnunet.training_server as ts
    original = ts.load_plans

    def replanned(*args):
        plans = original(*args)
        plans['configurations']['3d_fullres']['batch_size'] += 1
        return plans
    monkeypatch.setattr(ts, 'load_plans', replanned)
    with pytest.raises(FederationError, match='the plans changed since the interrupted run'):
        FederatedTraining(_engine(fed), _config(rounds=2, validate=False)).run(continue_training=True)


# ---------------------------------------------------------------- a round is nnU-Net's epoch, through its hooks
class HookedFedAvgTrainer(FedAvgTrainer):
    """A trainer variant that overrides nnU-Net's epoch hooks, as nnU-Net's trainer variants do."""
    calls = []

    def on_epoch_end(self):
        HookedFedAvgTrainer.calls.append(('on_epoch_end', self.site_name, self.current_epoch))
        super().on_epoch_end()

    def on_train_epoch_start(self):
        HookedFedAvgTrainer.calls.append(('on_train_epoch_start', self.site_name, self.current_epoch))
        super().on_train_epoch_start()

    def on_validation_epoch_end(self, val_outputs):
        HookedFedAvgTrainer.calls.append(('on_validation_epoch_end', self.site_name, self.current_epoch))
        super().on_validation_epoch_end(val_outputs)


def test_a_trainer_variants_overridden_hooks_run_in_every_round(planned, fresh_results, monkeypatch):
    monkeypatch.setitem(METHODS, 'fedavg', Method('fedavg', HookedFedAvgTrainer, METHODS['fedavg'].strategy, ''))
    HookedFedAvgTrainer.calls = []
    fed = Federation.from_raw(DATASET_ID, only_sites=['A', 'B'])
    FederatedTraining(_engine(fed), _config(rounds=2, local_iterations=2, validate=False)).run()
    for site in 'AB':
        calls = [(hook, r) for hook, s, r in HookedFedAvgTrainer.calls if s == site]
        # validation of the received model first, then training, then nnU-Net's on_epoch_end, every round
        assert calls == [('on_validation_epoch_end', 0), ('on_train_epoch_start', 0), ('on_epoch_end', 0),
                         ('on_validation_epoch_end', 1), ('on_train_epoch_start', 1), ('on_epoch_end', 1)]
    log = open(os.path.join(_results('fedavg'), 'sites', 'A', 'fold_0', 'training_log.txt')).read()  # Hooked...
    assert log.count('Epoch time:') == 2  # nnU-Net's on_epoch_end wrote its lines
    assert log.count('This is the configuration used by this training') == 1  # the plans once, not every round


# ---------------------------------------------------------------- the two-stage methods' second stage
@pytest.mark.parametrize('trainer', [LCFedTrainer, FedDPTrainer])
def test_two_stage_methods_run_their_second_stage_by_default(trainer):
    values, notes = trainer.resolve_hyperparameters({}, 20)
    assert values['stage2_rounds'] == 4 and not notes  # a fifth of the rounds
    assert trainer.resolve_hyperparameters({}, 2)[0]['stage2_rounds'] == 1
    assert trainer.resolve_hyperparameters({'stage2_fraction': 0.5}, 10)[0]['stage2_rounds'] == 5
    values, notes = trainer.resolve_hyperparameters({'stage2_rounds': 0}, 20)
    assert values['stage2_rounds'] == 0 and len(notes) == 1
    assert {'lcfed': 'FedRep with personalized channel selection',
            'feddp': 'FedAvg with local attention queries'}[trainer.method_name] in notes[0]
    assert trainer.resolve_hyperparameters({}, 1)[0]['stage2_rounds'] == 0  # one round: no room for a second stage
    with pytest.raises(ValueError, match='stage2_rounds must be in'):
        trainer.resolve_hyperparameters({'stage2_rounds': 20}, 20)


def test_the_server_warns_when_a_two_stage_method_has_no_second_stage(planned, fresh_results, capsys):
    fed = Federation.from_raw(DATASET_ID)
    training = FederatedTraining(_engine(fed), _config('feddp', '2d', rounds=3, hyperparameters={}))
    assert training.config.hyperparameters['stage2_rounds'] == 1  # resolved once, sent to every site
    assert training.site_config('A', round=0)['hyperparameters']['stage2_rounds'] == 1
    explicit = FederatedTraining(_engine(fed), _config('feddp', '2d', rounds=1, local_iterations=1,
                                                       hyperparameters={'stage2_rounds': 0}, validate=False))
    explicit.run()
    captured = capsys.readouterr()
    assert 'feddp without its second stage' in captured.out + captured.err


def test_a_site_missing_at_the_hand_over_is_named_and_the_others_calibrate_without_it():
    """One behaviour for LC-Fed and FedDP: the second stage uses the parts that arrived; the server says whose did
    not, and a site that missed the hand-over round receives the parts in its first second-stage round."""
    strategy = TwoStageFedAvg()
    strategy.setup(4, {'A': 0, 'B': 1, 'C': 2}, {'stage2_rounds': 2})
    state = {'w': np.zeros(2, np.float32)}
    part = {'q': np.ones(1, np.float32)}
    # round 1 is the last of stage 1: C does not answer
    updates = [SiteUpdate(s, {'w': np.full(2, i, np.float32), 'readonly/q': part['q'] * i}, 1)
               for i, s in enumerate('AB')]
    state = strategy.aggregate(1, updates, state)
    assert any("site(s) ['C']" in n for n in strategy.take_notes())
    handed = strategy.configure_fit(2, 'A', state)
    assert set(handed) == {'w', 'readonly/0/q', 'readonly/1/q'}
    strategy.aggregate(2, [SiteUpdate('A', {}, 1), SiteUpdate('B', {}, 1)], state)  # C is still away in round 2
    assert strategy.configure_fit(3, 'A', state) == {}
    assert set(strategy.configure_fit(3, 'C', state)) == {'w', 'readonly/0/q', 'readonly/1/q'}
    assert strategy.configure_fit(4, 'C', state) == {}  # the finish message hands nothing over
    restored = TwoStageFedAvg()
    restored.setup(4, {'A': 0, 'B': 1, 'C': 2}, {'stage2_rounds': 2})
    restored.load_state(strategy.state())
    assert restored.configure_fit(3, 'A', state) == {} and set(restored.configure_fit(3, 'C', state)) == set(handed)


@pytest.mark.parametrize('method', ['lcfed', 'feddp'])
def test_a_sites_calibration_uses_the_parts_that_arrived(planned, fresh_results, method):
    from test_lcfed_feddp import _stage2_trainer
    trainer = _stage2_trainer(method, site='B')
    own = trainer.readonly_state()
    other = {k: np.asarray(v) + 0.5 for k, v in own.items()}
    with pytest.warns(UserWarning, match=r"site index\(es\) \[2\] handed over nothing"):
        parts = trainer.handed_over_parts({0: other})  # B's own parts were not sent back: it missed the hand-over
    assert sorted(parts) == [0, 1]
    for k in own:
        np.testing.assert_array_equal(parts[1][k], own[k])
    trainer.enter_stage2(parts)
    if method == 'lcfed':
        hc = trainer.unwrapped_network.hc
        assert hc.present.tolist() == [1.0, 1.0, 0.0] and hc.active.item() == 1
    else:
        assert sorted(trainer.query_sets) == [0, 1]
    with pytest.raises(ValueError, match="no other site's parts arrived"):
        trainer.handed_over_parts({})
    with pytest.raises(ValueError, match='site index'):
        trainer.handed_over_parts({7: other})
    trainer.close()


# ---------------------------------------------------------------- training before preprocessing
def test_training_before_planning_names_the_command_and_writes_nothing(raw_copy, capsys):
    from fednnunet.cli import train_entry
    results = os.environ['nnUNet_results']
    with pytest.raises(SystemExit) as e:
        train_entry(['501', '3d_fullres', '0', '--method', 'fedavg', '-p', 'nnUNetCPUPlans', '--rounds', '1',
                     '-device', 'cpu'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no plans 'nnUNetCPUPlans'" in err
    assert 'fednnunet_plan_and_preprocess -d Dataset501_FedBrainDemo -pl nnUNetPlannerCPU -c 3d_fullres' in err
    assert _listing(results) == {} and os.listdir(results) == []


def test_training_a_configuration_no_site_preprocessed_names_the_site_and_writes_nothing(raw_copy, capsys):
    from fednnunet.cli import train_entry
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    fed = Federation.from_folder(str(raw_copy), only_sites=['A', 'B'])
    plan_and_preprocess(SimulationEngine.for_federation(fed), fed.dataset_name, ['3d_fullres'], 'nnUNetPlannerCPU')
    results = os.environ['nnUNet_results']
    with pytest.raises(SystemExit):
        train_entry(['501', '2d', '0', '--method', 'fedavg', '-p', 'nnUNetCPUPlans', '--rounds', '1', '-device',
                     'cpu', '--sites', 'A', 'B'])
    err = capsys.readouterr().err
    assert "site 'A', field '-c': configuration '2d' is not preprocessed at this site" in err
    assert 'fednnunet_plan_and_preprocess -d Dataset501_FedBrainDemo -pl nnUNetPlannerCPU -c 2d' in err
    assert os.listdir(results) == []
