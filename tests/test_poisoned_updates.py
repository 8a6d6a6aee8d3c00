"""One bad or malicious site cannot poison or stop the federation (issue 10): its update is checked (keys, shapes,
dtypes, finiteness, training cases, metrics) and, if bad, dropped; the site is missing from that round, named with
the reason, and the run goes on while --min-sites holds."""
import json
import os

import numpy as np
import pytest
import torch

from fednnunet.federation import Federation
from fednnunet.inference import load_checkpoint
from fednnunet.training_server import FederatedTraining
from fednnunet.wire import Message

from conftest import DATASET_ID
from test_training import _config, _engine, _results


class TamperingEngine:
    """Simulation, except that site B's update of round r is replaced by ``tampers[r](reply)`` (if given)."""

    def __new__(cls, federation, tampers):
        from fednnunet.engines.simulation import SimulationEngine

        class Engine(SimulationEngine):
            def ask(self, requests):
                replies = super().ask(requests)
                first = next(iter(requests.values()))
                if first.kind == 'fit' and first.config['round'] < len(tampers) and 'B' in replies:
                    replies['B'] = tampers[first.config['round']](replies['B'])
                return replies
        return _engine(federation, Engine)


def _with_arrays(reply, change):
    arrays = dict(reply.arrays)
    change(arrays)
    return Message(reply.kind, reply.config, arrays)


def _nan(arrays):
    k = sorted(arrays)[0]
    arrays[k] = np.full_like(arrays[k], np.nan)


def _extra_key(arrays):
    arrays['attacker.weight'] = np.zeros(3, np.float32)


def _wrong_shape(arrays):
    k = sorted(arrays)[0]
    arrays[k] = np.zeros(tuple(s + 1 for s in arrays[k].shape), arrays[k].dtype)


def _wrong_dtype(arrays):
    k = sorted(arrays)[0]
    arrays[k] = arrays[k].astype(np.float64)


def _missing_key(arrays):
    del arrays[sorted(arrays)[0]]


POISONS = {
    'nan': (lambda r: _with_arrays(r, _nan), 'NaN or infinite'),
    'extra key': (lambda r: _with_arrays(r, _extra_key), "unexpected ['attacker.weight']"),
    'wrong shape': (lambda r: _with_arrays(r, _wrong_shape), 'has shape'),
    'wrong dtype': (lambda r: _with_arrays(r, _wrong_dtype), 'float64'),
    'missing key': (lambda r: _with_arrays(r, _missing_key), 'missing ['),
    'inflated cases': (lambda r: Message(r.kind, {**r.config, 'num_examples': 10 ** 6}, r.arrays), 'num_examples'),
    'bad metrics': (lambda r: Message(r.kind, {**r.config, 'metrics': {**r.config['metrics'], 'tp': [-1, 5]}},
                                      r.arrays), 'metric tp'),
}


def test_poisoned_updates_are_dropped_and_the_run_completes(planned, fresh_results):
    """Site B sends a different poisoned update in each of the first rounds (--min-sites 2), then an honest one."""
    names = sorted(POISONS)
    fed = Federation.from_raw(DATASET_ID)
    FederatedTraining(TamperingEngine(fed, [POISONS[n][0] for n in names]),
                      _config(rounds=len(names) + 1, local_iterations=1, val_iterations=1, validate=False,
                              min_sites=2)).run()
    log = json.load(open(os.path.join(_results('fedavg'), 'fold_0', 'federation_log.json')))
    for r, name in enumerate(names):
        assert set(log[r]['sites']) == {'A', 'C'}, name
        assert log[r]['missing_sites']['B'].startswith('update refused: ') and POISONS[name][1] in \
            log[r]['missing_sites']['B'], (name, log[r]['missing_sites'])
    assert set(log[-1]['sites']) == {'A', 'B', 'C'}  # B's honest update is merged again
    weights = load_checkpoint(os.path.join(_results('fedavg'), 'fold_0', 'checkpoint_final.pth'))['network_weights']
    assert 'attacker.weight' not in weights and all(torch.isfinite(v).all() for v in weights.values()
                                                    if v.is_floating_point())


def test_without_a_quorum_a_poisoned_update_stops_the_run_by_name(planned, fresh_results):
    fed = Federation.from_raw(DATASET_ID)
    with pytest.raises(RuntimeError, match=r"round 0: only 2 site\(s\) answered \(\['A', 'C'\]\), 3 needed"):
        FederatedTraining(TamperingEngine(fed, [POISONS['nan'][0]]), _config(rounds=2, local_iterations=1,
                                                                              validate=False)).run()
    training_log = open(os.path.join(_results('fedavg'), 'fold_0', 'training_log.txt')).read()
    assert "no update from site 'B' (update refused:" in training_log
