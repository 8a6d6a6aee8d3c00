"""The simulation with one process per site (fednnunet.engines.site_processes): sites on different devices train at
the same time, sites sharing a device take turns, and the result is the in-process simulation's."""
import pytest

from fednnunet.engines.simulation import SimulationEngine
from fednnunet.engines.site_processes import SiteProcessEngine, gpu_site_devices, parse_site_devices
from fednnunet.errors import FederationError
from fednnunet.federation import Federation
from fednnunet.training_server import FederatedTraining
from fednnunet.wire import Message

from conftest import DATASET_ID
from test_training import _assert_same, _config, _final_weights


def test_site_devices_are_checked_by_name():
    sites = ['A', 'B']
    assert parse_site_devices(['A=cuda:0', 'B=cpu:1'], sites) == {'A': 'cuda:0', 'B': 'cpu:1'}
    for specs, says in ((['A=cuda:0'], "no device for site(s) ['B']"), (['A=gpu', 'B=cpu'], 'the device must be'),
                        (['A=cpu', 'A=cpu', 'B=cpu'], 'twice'), (['C=cpu', 'A=cpu', 'B=cpu'], 'SITE=DEVICE'),
                        (['A=cuda:0/../x', 'B=cpu'], 'the device must be'), (['A', 'B=cpu'], 'SITE=DEVICE')):
        with pytest.raises(FederationError, match=says.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
            parse_site_devices(specs, sites)
    assert gpu_site_devices(['A', 'B', 'C'], 2) == {'A': 'cuda:0', 'B': 'cuda:1', 'C': 'cuda:0'}


def _overlap(a, b) -> float:
    return min(a[3], b[3]) - max(a[2], b[2])


def test_sites_on_their_own_devices_train_at_the_same_time_with_the_in_process_result(planned, fresh_results):
    """A and C share cpu:0 (they take turns), B has cpu:1 to itself: B's rounds overlap A's and C's, A's never
    C's; the final global model equals the in-process simulation's (same seeds, same merge order); a site's error
    comes back with its type and the site's name."""
    fed = Federation.from_raw(DATASET_ID)
    FederatedTraining(SimulationEngine.for_federation(fed, device='cpu'), _config('fedavg', validate=False)).run()
    expected = _final_weights()
    engine = SiteProcessEngine(fed, {'A': 'cpu:0', 'B': 'cpu:1', 'C': 'cpu:0'})
    try:
        with pytest.raises(FederationError, match="site 'A'"):
            engine.ask({'A': Message('fit', {'round': 0})})
        engine.timeline.clear()
        FederatedTraining(engine, _config('fedavg', validate=False)).run(overwrite=True)
        fits = sorted((e for e in engine.timeline if e[1] == 'fit'), key=lambda e: e[2])
    finally:
        engine.close()
    assert all(p.poll() is not None for p in engine.processes.values())  # every site process ended
    _assert_same(_final_weights(), expected)
    by_round = {}
    for entry in fits:
        by_round.setdefault(entry[0], []).append(entry)
    for r in range(2):
        a, b, c = by_round['A'][r], by_round['B'][r], by_round['C'][r]
        assert _overlap(a, b) > 0 or _overlap(c, b) > 0, (a, b, c)  # B trains while A or C does
        assert _overlap(a, c) <= 0, (a, c)  # A and C take turns on their device
