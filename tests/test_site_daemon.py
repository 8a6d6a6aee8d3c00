"""The site daemon (fednnunet.site_daemon): Flower's per-message ClientApps hand their messages to one long-lived
site process, which keeps one worker (and so its trainer) for all of them."""
import os
import stat
import threading

import numpy as np
import pytest

from fednnunet.errors import FederationError
from fednnunet.site_daemon import DaemonUnavailable, SiteDaemon, ask_daemon, daemon_folder
from fednnunet.wire import Message


class CountingWorker:
    instances = 0

    def __init__(self):
        CountingWorker.instances += 1
        self.handled = []

    def handle(self, message):
        self.handled.append(message.kind)
        if message.kind == 'fail':
            raise FederationError('label file holds values [3.0] that dataset.json does not declare', site='A',
                                  case='A_000', field='labels')
        return Message('echo', {'n': len(self.handled), 'kind': message.kind}, arrays=dict(message.arrays))

    def close(self):
        pass


@pytest.fixture
def daemon():
    CountingWorker.instances = 0
    with daemon_folder() as folder:
        d = SiteDaemon(os.path.join(folder, 'site.sock'), CountingWorker)
        d.listen()
        thread = threading.Thread(target=d.serve_forever, daemon=True)
        thread.start()
        yield d, folder
        d.stop()


def test_every_message_reaches_the_same_worker_with_its_arrays_exact(daemon):
    d, folder = daemon
    weights = {'w': np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)}
    for i in range(3):
        reply = ask_daemon(d.socket_path, Message('fit', {'round': i}, arrays=weights))
        assert reply.kind == 'echo' and reply.config == {'n': i + 1, 'kind': 'fit'}
        np.testing.assert_array_equal(reply.arrays['w'], weights['w'])
    assert CountingWorker.instances == 1 and d.worker.handled == ['fit'] * 3
    # only this user reaches it
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) & 0o077 == 0


def test_the_sites_error_comes_back_with_its_type_and_text(daemon):
    d, _ = daemon
    with pytest.raises(Exception) as e:
        ask_daemon(d.socket_path, Message('fail'))
    assert type(e.value).__name__ == 'FederationError'
    assert "site 'A', case 'A_000', field 'labels': label file holds values [3.0]" in str(e.value)
    assert ask_daemon(d.socket_path, Message('fit')).config['n'] == 2  # the daemon goes on


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(DaemonUnavailable, match="the site's daemon is not running"):
        ask_daemon(str(tmp_path / 'nothing.sock'), Message('fit'))


def test_the_clientapp_refuses_a_daemon_of_another_site(daemon):
    pytest.importorskip('flwr')
    from fednnunet.engines.flower import error_text, handle_via_daemon, is_error, to_record_dict
    d, _ = daemon
    content = to_record_dict(Message('fit', {'round': 0}))
    reply = handle_via_daemon(d.socket_path, 'B', content, 'A')
    assert is_error(reply) and "this SuperNode is site 'A' but its site daemon serves 'B'" in error_text(reply)
    assert d.worker is None  # nothing reached the worker
    reply = handle_via_daemon(d.socket_path, 'A', content, 'A')
    assert not is_error(reply)
