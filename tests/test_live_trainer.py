"""A site keeps its trainer alive across the rounds of a run (site_training.LiveTrainer), as nnU-Net keeps one
trainer for all epochs: built once per run and site, the same weights as rebuilding it every round from the saved
state, a round state on disk after every round, and a site whose process is replaced mid-run resumes from it."""
import os
import time

import pytest
import torch

from fednnunet import augmentation_workers, site_training
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import Federation
from fednnunet.site_worker import SiteWorker
from fednnunet.trainers.base import FederatedTrainer
from fednnunet.training_server import FederatedTraining

from conftest import DATASET_ID, point_nnunet_folder
from test_training import _assert_same, _config, _engine, _final_weights, _results


REAL_BUILD = site_training.build_site_trainer


class CountingBuilds:
    """Counts the trainers built per site (site_training.build_site_trainer) and remembers them."""

    def __init__(self, monkeypatch):
        self.built = {}
        real = REAL_BUILD  # (not whatever an earlier CountingBuilds put there)

        def build(worker, config):
            trainer = real(worker, config)
            self.built.setdefault(worker.site.name, []).append(trainer)
            return trainer
        monkeypatch.setattr(site_training, 'build_site_trainer', build)


@pytest.mark.parametrize('method', ['fedavg', 'feddp'])
def test_a_kept_trainer_gives_the_rebuilt_trainers_weights_and_is_built_once(planned, tmp_path, monkeypatch,
                                                                             method):
    """3 rounds (FedDP: its second stage, the calibration against the other sites' queries, in the last): kept
    trainers are built once per site (the rebuild path: once per round and once for the final model) and give
    the same final weights."""
    fed = Federation.from_raw(DATASET_ID)
    hyper = {'stage2_rounds': 1} if method == 'feddp' else {}
    weights, builds = {}, {}
    for keep in (False, True):
        point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / f'keep_{keep}')
        counting = CountingBuilds(monkeypatch)
        FederatedTraining(_engine(fed, keep_trainers=keep), _config(method, rounds=3, validate=False,
                                                      hyperparameters=hyper)).run()
        weights[keep], builds[keep] = _final_weights(method), counting.built
    assert {s: len(t) for s, t in builds[False].items()} == {s: 4 for s in 'ABC'}
    assert {s: len(t) for s, t in builds[True].items()} == {s: 1 for s in 'ABC'}
    _assert_same(weights[False], weights[True])
    # every round's state went to the site's disk (the last two are kept), and the kept trainer ended with the run
    for site, (trainer,) in builds[True].items():
        run_folder = os.path.join(_results(method), 'sites', site, 'fold_0', 'site_state', trainer.run_id)
        assert sorted(os.listdir(run_folder)) == ['round_0002.pth', 'round_0003.pth']
        assert trainer.dataloader_train is None


class ReplacingSiteA(SimulationEngine):
    """Site A's process ends after round ``at`` (its kept trainer is gone); a new SiteWorker takes over."""

    def __init__(self, workers, at):
        super().__init__(workers)
        self.at = at

    def ask(self, requests):
        first = next(iter(requests.values()))
        if first.kind == 'fit' and first.config['round'] == self.at + 1:
            old = self.workers['A']
            assert old.live_trainer is not None and old.live_trainer.trainer.current_epoch == self.at + 1
            old.close()
            self.workers['A'] = SiteWorker(old.site, old.dataset_name, 1, device='cpu')
        return super().ask(requests)


def test_a_site_whose_process_is_replaced_mid_run_resumes_from_its_state_on_disk(planned, tmp_path, monkeypatch):
    """fedper (the heads stay at the sites, so a lost local state would show): site A loses its kept trainer after
    round 0; its new worker rebuilds from the state on disk; the final models equal an uninterrupted run's."""
    fed = Federation.from_raw(DATASET_ID)
    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'straight')
    FederatedTraining(_engine(fed), _config('fedper', rounds=3, validate=False)).run()
    straight = _final_weights('fedper')
    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'replaced')
    counting = CountingBuilds(monkeypatch)
    engine = _engine(fed, cls=lambda workers: ReplacingSiteA(workers, at=0))
    ft = FederatedTraining(engine, _config('fedper', rounds=3, validate=False))
    ft.run()
    assert len(counting.built['A']) == 2 and len(counting.built['B']) == 1
    assert [r['sites']['A']['state_from_round'] for r in ft.rounds_log] == [None, 1, 2]
    _assert_same(straight, _final_weights('fedper'))


def test_a_failed_round_keeps_no_trainer_alive(planned, fresh_results, monkeypatch):
    fed = Federation.from_raw(DATASET_ID)
    engine = _engine(fed)
    ft = FederatedTraining(engine, _config('fedavg', rounds=2, validate=False))
    real = site_training.FederatedTrainer.train_round

    def failing(self, round_index, shared):
        if round_index == 1 and self.site_name == 'B':
            raise RuntimeError('out of memory (simulated)')
        return real(self, round_index, shared)
    monkeypatch.setattr(site_training.FederatedTrainer, 'train_round', failing)
    with pytest.raises(RuntimeError, match='out of memory'):
        ft.run()
    assert all(w.live_trainer is None for w in engine.workers.values())


def test_a_kept_trainer_is_not_reused_for_another_run_or_an_earlier_round(planned):
    live = site_training.LiveTrainer(site_training.LiveTrainer.run_key({'method': 'fedavg', 'run_id': 'a' * 32,
                                                                        'round': 3}),
                                     type('T', (), {'current_epoch': 3})())
    assert live.serves({'method': 'fedavg', 'run_id': 'a' * 32, 'round': 3, 'overwrite': True}, 3)
    assert live.serves({'method': 'fedavg', 'run_id': 'a' * 32}, 5)  # the site missed rounds 3 and 4
    assert not live.serves({'method': 'fedavg', 'run_id': 'b' * 32}, 3)
    assert not live.serves({'method': 'fedprox', 'run_id': 'a' * 32}, 3)
    assert not live.serves({'method': 'fedavg', 'run_id': 'a' * 32}, 2)  # a server resuming from round 2


def test_torch_compile_follows_nnunets_rules_only_for_kept_trainers(monkeypatch):
    """nnU-Net compiles by default on CUDA; a kept trainer does too (nnUNet_compile=0 turns it off), a trainer
    rebuilt every round only with nnUNet_compile=1; hook-based networks never."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from fednnunet.trainers.base import FederatedTrainer
    monkeypatch.setattr(nnUNetTrainer, '_do_i_compile', lambda self: os.environ.get('nnUNet_compile', '1') != '0')
    trainer = object.__new__(FederatedTrainer)
    for env, kept, hooks, expected in ((None, True, False, True), ('0', True, False, False),
                                       (None, False, False, False), ('1', False, False, True),
                                       (None, True, True, False)):
        if env is None:
            monkeypatch.delenv('nnUNet_compile', raising=False)
        else:
            monkeypatch.setenv('nnUNet_compile', env)
        trainer.kept_across_rounds, trainer.uses_hooks = kept, hooks
        assert FederatedTrainer._do_i_compile(trainer) is expected, (env, kept, hooks)


def test_round_states_are_written_in_the_background_and_flushed_before_they_are_read(tmp_path, monkeypatch):
    store = site_training.SiteStateStore()
    writer = site_training.StateWriter(store)
    trainer = type('T', (), {'run_id': 'c' * 32, 'site_name': 'A', 'output_folder': str(tmp_path)})()
    import threading
    release = threading.Event()
    real_write = store.write

    def slow_write(folder, rounds_done, state):
        release.wait(10)
        real_write(folder, rounds_done, state)
    monkeypatch.setattr(store, 'write', slow_write)
    writer.save(trainer, 1, {'run_id': 'c' * 32, 'x': torch.ones(2)})
    folder = tmp_path / 'site_state' / ('c' * 32)
    assert not (folder / 'round_0001.pth').exists()  # save() returned before the disk write
    release.set()
    writer.flush()
    assert sorted(os.listdir(folder)) == ['round_0001.pth']
    assert store.latest(trainer, 1)[0] == 1

    def failing_write(folder, rounds_done, state):
        raise OSError('disk full')
    monkeypatch.setattr(store, 'write', failing_write)
    writer.save(trainer, 2, {'run_id': 'c' * 32})
    with pytest.raises(RuntimeError, match='disk full'):
        writer.flush()


def _process_state(pid: int) -> str:
    """R (running), S (sleeping), T (stopped), ... from /proc; '' once the process is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
        return ''


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads process states from /proc')
def test_sites_taking_turns_pause_their_augmentation_workers_between_turns(planned, fresh_results, monkeypatch):
    """In simulation the sites take turns on one machine: a site's augmentation workers (nnUNet_n_proc_DA=1 here)
    are stopped (SIGSTOP: no CPU while the others train) at the end of its turn and continued at its next one, the
    same worker processes with their queued batches; network, optimizer and logs stay built. At the end of the run
    every worker has ended, none is left stopped."""
    monkeypatch.setenv('nnUNet_n_proc_DA', '1')
    fed = Federation.from_raw(DATASET_ID)
    engine = SimulationEngine.for_federation(fed, device='cpu')
    assert not any(w.keep_augmentation_workers for w in engine.workers.values())
    counting = CountingBuilds(monkeypatch)
    after_turn, at_turn_start, pids = [], [], {}
    real_fit, real_train_round = site_training.fit, FederatedTrainer.train_round

    def train_round(self, round_index, arrays):
        at_turn_start.append({_process_state(p) for p in augmentation_workers.worker_pids(self.dataloader_train)})
        return real_train_round(self, round_index, arrays)

    def fit(worker, message):
        reply = real_fit(worker, message)
        trainer = worker.live_trainer.trainer
        loader_pids = augmentation_workers.worker_pids(trainer.dataloader_train)
        pids.setdefault(worker.site.name, set()).update(loader_pids)
        deadline = time.time() + 5.0  # SIGSTOP is delivered asynchronously: /proc may say R for a moment
        while {_process_state(p) for p in loader_pids} != {'T'} and time.time() < deadline:
            time.sleep(0.01)
        after_turn.append((worker.site.name, id(trainer), id(trainer.dataloader_train),
                           {_process_state(p) for p in loader_pids}))
        return reply
    monkeypatch.setattr(site_training, 'fit', fit)
    monkeypatch.setattr(FederatedTrainer, 'train_round', train_round)
    FederatedTraining(engine, _config('fedavg', rounds=2, validate=False)).run()
    assert {s: len(t) for s, t in counting.built.items()} == {s: 1 for s in 'ABC'}
    assert all(states == {'T'} for *_, states in after_turn), after_turn  # every worker stopped after each turn
    assert all(states and 'T' not in states for states in at_turn_start[3:]), at_turn_start  # continued
    assert len({(s, t, loader) for s, t, loader, _ in after_turn}) == 3  # one trainer and data loader per site
    assert all(len(p) == 1 for p in pids.values())  # the same worker process in both rounds
    time.sleep(0.5)
    assert not {_process_state(p) for ps in pids.values() for p in ps} - {'', 'Z'}  # all ended, none stopped
    assert not augmentation_workers._paused
    one_site = SimulationEngine.for_federation(Federation.from_raw(DATASET_ID, only_sites=['A']), device='cpu')
    assert one_site.workers['A'].keep_augmentation_workers
