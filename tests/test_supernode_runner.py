"""fednnunet_site runs Flower's own SuperNode with shorter waits (fednnunet.supernode_runner): the 3 s wait after
an empty pull becomes at most --pull-interval (shorter right after a reply), the 0.5 s looks for the ClientApp's
reply LOCAL_WAIT."""
import time

import pytest

pytest.importorskip('flwr', reason="Flower is not installed (pip install -e '.[flower]' or '.[test]')")

from flwr.supernode import start_client_internal  # noqa: E402

from fednnunet import supernode_runner  # noqa: E402
from fednnunet.cli_args import pull_interval  # noqa: E402


def _slept(seconds: float) -> float:
    t = time.perf_counter()
    start_client_internal.time.sleep(seconds)
    return time.perf_counter() - t


def test_the_supernodes_waits_become_at_most_the_pull_interval(monkeypatch):
    monkeypatch.setattr(start_client_internal, 'time', time)  # restored after the test
    assert _slept(supernode_runner.FLOWER_IDLE_WAIT) >= 2.9  # Flower's own, as the runner finds it
    monkeypatch.setattr(supernode_runner, 'FAST_WINDOW', 0.5)
    assert supernode_runner.shorten_waits(0.3)
    assert 0.29 <= _slept(supernode_runner.FLOWER_IDLE_WAIT) < 0.6  # idle: at most the pull interval
    # the looks for the ClientApp's reply (local): LOCAL_WAIT; right after them (the reply went out, the server's
    # next message is due) the idle wait is FAST_PULL_INTERVAL, then the pull interval again
    assert max(_slept(0.5) for _ in range(5)) < 0.1
    assert max(_slept(supernode_runner.FLOWER_IDLE_WAIT) for _ in range(3)) < 0.15
    time.sleep(0.5)
    assert _slept(supernode_runner.FLOWER_IDLE_WAIT) >= 0.29
    assert _slept(0.01) >= 0.009  # a shorter wait stays as it is
    assert start_client_internal.time.time() == pytest.approx(time.time(), abs=1.0)
    assert not supernode_runner.shorten_waits(0.1)  # not the module it was written for (any more): unchanged


def test_the_pull_interval_is_bounded():
    assert pull_interval('0.5') == 0.5
    for bad in ('0', '0.01', '5', 'nan', 'x'):
        with pytest.raises(Exception):
            pull_interval(bad)


def test_the_site_runs_flowers_supernode_through_the_runner(demo_raw):
    from fednnunet.flower_cli import site_parser, site_setup
    from conftest import DATASET_ID
    cmd, _ = site_setup(site_parser().parse_args(['--site', 'A', '-d', str(DATASET_ID), '--server', '127.0.0.1:9092',
                                                  '--insecure', '-np', '1', '--pull-interval', '0.25',
                                                  '--heartbeat-interval', '10']), 'secret')
    assert cmd[1:8] == ['-m', 'fednnunet.supernode_runner', '--pull-interval', '0.25', '--heartbeat-interval',
                        '10.0', '--']
    assert '--isolation' in cmd and cmd[cmd.index('--isolation') + 1] == 'process'


def test_the_heartbeat_interval_reaches_flowers_supernode(monkeypatch):
    """--heartbeat-interval: what the SuperNode announces to the SuperLink (which declares it gone after two
    intervals without a heartbeat) and how often its heartbeat thread sends."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from fednnunet.cli_args import heartbeat_interval
    for m in (heartbeat, fleet_http_connection):
        monkeypatch.setattr(m, 'HEARTBEAT_DEFAULT_INTERVAL', supernode_runner.FLOWER_HEARTBEAT)
    assert supernode_runner.set_heartbeat_interval(10.0)
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    assert not supernode_runner.set_heartbeat_interval(12.0)  # not Flower's own any more: left as it is
    assert heartbeat_interval('10') == 10.0
    for bad in ('9', '1801', 'nan', 'x'):
        with pytest.raises(Exception):
            heartbeat_interval(bad)


def test_a_site_tries_an_unreachable_server_again_within_seconds(monkeypatch):
    """Flower's SuperNode waits up to 20 s (doubling, full jitter) before it tries an unreachable server again;
    fednnunet's at most RECONNECT_WAIT."""
    from flwr.supercore.retry import http_retry
    monkeypatch.setattr(http_retry, 'MAX_RETRY_DELAY', http_retry.MAX_RETRY_DELAY)  # restored after the test
    assert http_retry.MAX_RETRY_DELAY == 20
    assert supernode_runner.cap_reconnect_wait()
    invoker = http_retry.make_simple_http_retry_invoker()
    waits = invoker.wait_gen_factory()
    assert max(next(waits) for _ in range(20)) == supernode_runner.RECONNECT_WAIT
