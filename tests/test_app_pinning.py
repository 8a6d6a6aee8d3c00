"""A site runs only the app bundle (FAB) of its own fednnunet (fednnunet.app_pinning).

Fast: the hash a site expects is the one ``flwr run`` computes for fednnunet's app folder; another bundle, or a
bundle that claims the right hash with other bytes, or the right bytes under another app id, is refused by name.
Slow (real processes): a compromised server runs its own app bundle (a ClientApp that writes a file when
imported) on a SuperLink a fednnunet site is connected to: the site refuses it before unpacking it, the server
gets the refusal with both hashes as the error reply, and nothing of the bundle ran or was installed at the site.
"""
import hashlib
import os
import pathlib
import subprocess
import sys
import time

import pytest

pytest.importorskip('flwr', reason="Flower is not installed (pip install -e '.[flower]' or '.[test]')")

from flwr.cli.build import build_fab_from_disk, build_fab_from_files  # noqa: E402

import fednnunet  # noqa: E402
from fednnunet.app_pinning import (bundle_problem, own_app_bundle, own_app_bundle_hash, own_app_id,  # noqa: E402
                                   run_pinned_clientapp, UntrustedAppBundle)
from fednnunet.flower_app import app_pyproject, write_app  # noqa: E402

from conftest import DATASET_ID  # noqa: E402

EVIL_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil-app"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"
"""

EVIL_CLIENT = """import pathlib
pathlib.Path({marker!r}).write_text('a site imported a foreign app bundle')  # runs the moment it is imported
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
app = ClientApp()


@app.query()
def query(msg, context):
    return Message(RecordDict(), reply_to=msg)
"""

EVIL_SERVER = """import time
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()


@app.main()
def main(grid, context):
    deadline, nodes = time.time() + 180, []
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    print('EVIL-NODES', len(nodes), flush=True)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type='query') for n in nodes],
                                    timeout=180)
    for reply in replies:
        print('EVIL-REPLY', reply.error.reason if reply.has_error() else 'content', flush=True)
"""


def _evil_app(folder: pathlib.Path, marker: str) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / 'pyproject.toml').write_text(EVIL_PYPROJECT)
    (folder / 'evil_client.py').write_text(EVIL_CLIENT.format(marker=marker))
    (folder / 'evil_server.py').write_text(EVIL_SERVER)
    return folder


def test_the_expected_hash_is_the_one_flwr_run_computes_for_fednnunets_app(tmp_path):
    app = write_app(str(tmp_path / 'app'))
    assert hashlib.sha256(build_fab_from_disk(pathlib.Path(app))).hexdigest() == own_app_bundle_hash()
    assert own_app_id() == ('fednnunet/fednnunet-flower', fednnunet.__version__)
    # the hash follows what the bundle holds: another run-config default is another bundle
    other, _ = build_fab_from_files({'pyproject.toml': app_pyproject().replace('rounds = 1000', 'rounds = 1')
                                     .encode()})
    assert hashlib.sha256(other).hexdigest() != own_app_bundle_hash()


def test_another_bundle_a_false_hash_or_another_app_id_is_refused_by_name(tmp_path):
    own, expected = own_app_bundle(), own_app_bundle_hash()
    fab_id, version = own_app_id()
    assert bundle_problem(own, expected, fab_id, version, expected) is None
    evil = build_fab_from_disk(_evil_app(tmp_path / 'evil', str(tmp_path / 'marker')))
    evil_hash = hashlib.sha256(evil).hexdigest()
    problem = bundle_problem(evil, evil_hash, 'attacker/evil-app', '1.0.0', expected)
    assert problem.startswith(f'refused app bundle {evil_hash}: this site runs only the fednnunet '
                              f'{fednnunet.__version__} app bundle {expected}')
    # a server that declares the site's hash for other bytes
    problem = bundle_problem(evil, expected, fab_id, version, expected)
    assert f'refused app bundle {evil_hash} (declared {expected})' in problem
    # the right bytes under another app id/version (Flower would load the app from another folder)
    assert 'refused app attacker/evil-app 1.0.0' in bundle_problem(own, expected, 'attacker/evil-app', '1.0.0',
                                                                   expected)


def test_the_clientapp_gate_refuses_before_anything_is_installed(tmp_path, monkeypatch):
    """run_pinned_clientapp drives Flower's own run_clientapp; here Flower's functions are stand-ins that record
    what the gate lets through (the real processes are the slow test below)."""
    from flwr.supernode.runtime import run_clientapp as flower_clientapp
    from flwr.supercore.fab import Fab
    evil = build_fab_from_disk(_evil_app(tmp_path / 'evil', str(tmp_path / 'marker')))
    installed, outcome = [], {}

    def fake_run_clientapp(**kwargs):  # what Flower's run_clientapp does: pull the task input, install the FAB
        message, context, run, fab = flower_clientapp.pull_task_input(None)
        try:
            flower_clientapp.install_from_fab(fab.content, skip_prompt=True)
            outcome['ok'] = True
        except UntrustedAppBundle as e:  # Flower turns it into the error reply
            outcome['error'] = str(e)

    for content, fab_id, expected_ok in ((evil, 'attacker/evil-app', False), (own_app_bundle(), own_app_id()[0],
                                                                              True)):
        outcome.clear()
        run = type('Run', (), {'fab_id': fab_id, 'fab_version': '1.0.0' if not expected_ok else fednnunet.__version__})
        fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
        monkeypatch.setattr(flower_clientapp, 'pull_task_input', lambda client: ('msg', 'ctx', run, fab))
        monkeypatch.setattr(flower_clientapp, 'install_from_fab', lambda c, **kw: installed.append(c))
        monkeypatch.setattr(flower_clientapp, 'run_clientapp', fake_run_clientapp)
        run_pinned_clientapp('127.0.0.1:1', 'token', own_app_bundle_hash())
        assert outcome.get('ok', False) == expected_ok, outcome
    assert installed == [own_app_bundle()]  # the evil bundle never reached Flower's installer
    assert not (tmp_path / 'marker').exists()


@pytest.mark.slow
def test_a_site_refuses_a_servers_own_app_bundle_and_runs_none_of_it(demo_raw, tmp_path):
    from fednnunet.flower_cli import flower_env, free_port, wait_for_port, write_flower_config
    marker = tmp_path / 'the_site_ran_it'
    evil_app = _evil_app(tmp_path / 'evil_app', str(marker))
    evil_hash = hashlib.sha256(build_fab_from_disk(evil_app)).hexdigest()
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    server_env = flower_env(str(tmp_path / 'server_home'))
    site_home = tmp_path / 'site_home'
    site_env = dict(flower_env(str(site_home)), nnUNet_n_proc_DA='0', nnUNet_def_n_proc='1')
    logs = {name: open(tmp_path / f'{name}.log', 'wb') for name in ('superlink', 'site')}
    procs = []
    try:
        # the compromised server: a plain SuperLink whose Control API it uses itself
        procs.append(subprocess.Popen([os.path.join(bindir, 'flower-superlink'), '--insecure', '--host', '127.0.0.1',
                                       '--port', str(port), '--disable-runtime-dependency-installation'],
                                      env=server_env, stdout=logs['superlink'], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        wait_for_port('127.0.0.1', port, 60.0, procs[0])
        procs.append(subprocess.Popen([sys.executable, '-m', 'fednnunet.flower_cli', 'site', '--site', 'A', '-d',
                                       str(DATASET_ID), '--server', f'127.0.0.1:{port}', '--insecure', '-device',
                                       'cpu', '-np', '1'], env=site_env, stdout=logs['site'],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        write_flower_config(server_env['FLWR_HOME'], f'127.0.0.1:{port}', None)
        done = subprocess.run([os.path.join(bindir, 'flwr'), 'run', str(evil_app), 'fednnunet', '--stream'],
                              env=server_env, capture_output=True, text=True, timeout=420)
        streamed = done.stdout + done.stderr
        site_log = (tmp_path / 'site.log').read_text(errors='replace')
        assert 'EVIL-NODES 1' in streamed, streamed[-3000:] + site_log[-3000:]
        assert f'refused app bundle {evil_hash}: this site runs only the fednnunet' in streamed, streamed[-3000:]
        assert own_app_bundle_hash() in streamed
        assert f'refused app bundle {evil_hash}' in site_log, site_log[-3000:]
        assert not marker.exists(), 'the site imported the foreign bundle'
        installed = list((site_home / 'apps').glob('*')) if (site_home / 'apps').exists() else []
        assert not [p for p in installed if 'attacker' in p.name or evil_hash[:8] in p.name], installed
    finally:
        for p in procs[::-1]:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        for f in logs.values():
            f.close()


class _RecordedProcess:
    """Stands in for a ClientApp process the launcher starts: records when it started and what it was given."""
    started = []

    def __init__(self):
        self.token, self.closed = b'', False
        self.stdin = self
        _RecordedProcess.started.append(self)

    def write(self, data):
        self.token += data

    def close(self):
        self.closed = True

    def poll(self):
        return 0 if self.closed else None

    def wait(self, timeout=None):
        return 0


def test_the_launcher_hands_each_task_to_a_clientapp_process_started_before_it(tmp_path, monkeypatch):
    """The ClientApp process that runs a message has done its imports before the message arrives: the launcher
    keeps one ready, hands the task's token to it, and readies the next; stopping ends the unused one (its stdin
    closes without a token)."""
    from fednnunet.app_pinning import PinnedClientAppLauncher
    secret = tmp_path / 'secret'
    secret.write_bytes(b'x' * 32)
    launcher = PinnedClientAppLauncher('127.0.0.1:1', str(secret), expected_hash='0' * 64)
    _RecordedProcess.started = []
    monkeypatch.setattr(launcher, '_clientapp_process', _RecordedProcess)
    launcher.ready_next()  # what run() does before its first AcquireTask
    first = _RecordedProcess.started[0]
    launcher.launch('token-1')
    assert first.token == b'token-1\n' and first.closed
    assert len(_RecordedProcess.started) == 2  # the next one, ready before the next task
    launcher.launch('token-2')
    assert _RecordedProcess.started[1].token == b'token-2\n' and len(_RecordedProcess.started) == 3
    launcher.stop(timeout=1)
    assert _RecordedProcess.started[2].token == b'' and _RecordedProcess.started[2].closed


def test_an_unneeded_clientapp_process_ends_quietly_without_a_token():
    p = subprocess.run([sys.executable, '-m', 'fednnunet.app_pinning', '--runtime-api-address', '127.0.0.1:1',
                        '--expected-hash', '0' * 64], input=b'', capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr.decode().strip() == ''


def test_the_sites_launcher_looks_for_tasks_at_fednnunets_interval_not_flowers(tmp_path, monkeypatch):
    """Flower's SuperExec looks for a task every second; fednnunet_site's launcher takes the interval of the
    environment it gives Flower's processes (flower_env: 0.1 s), not Flower's default (a second of every round was
    waiting for it)."""
    from fednnunet.flower_cli import flower_env, site_launcher
    monkeypatch.delenv('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', raising=False)
    secret = tmp_path / 'secret'
    secret.write_bytes(b'x' * 32)
    launcher = site_launcher(['flower-supernode', '--port', '9999'], str(secret), flower_env(), 'site.sock', 'A')
    assert launcher.poll_seconds == 0.1
    assert launcher.runtime_api_address == '127.0.0.1:9999'
    # the environment given to Flower's processes, not this process's own
    monkeypatch.setenv('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '1')
    env = dict(flower_env(), FLWR_SUPEREXEC_TASK_POLL_INTERVAL='0.3')
    assert site_launcher(['flower-supernode', '--port', '9999'], str(secret), env, 'sock', 'A').poll_seconds == 0.3


def test_the_launcher_waits_for_its_clientapp_then_looks_fast_for_the_next_message(tmp_path, monkeypatch):
    """While a ClientApp runs there is no task (Flower's SuperNode hands out one message at a time): the launcher
    waits for the process to end; the next message is due right after, so for a few seconds it looks every
    fast_poll_seconds, then every poll_seconds."""
    from fednnunet import app_pinning
    secret = tmp_path / 'secret'
    secret.write_bytes(b'x' * 32)
    launcher = app_pinning.PinnedClientAppLauncher('127.0.0.1:1', str(secret), expected_hash='0' * 64,
                                                   poll_seconds=0.3, fast_poll_seconds=0.02, fast_window_seconds=1.0)

    def timed():
        t = time.monotonic()
        launcher.wait_before_next_look()
        return time.monotonic() - t

    assert timed() >= 0.29  # idle: the slow interval
    monkeypatch.setattr(app_pinning, 'BUSY_LOOK_SECONDS', 10.0)
    launcher.processes = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.6)'])]
    assert 0.5 <= timed() < 5.0  # back when the ClientApp ended, not after BUSY_LOOK_SECONDS
    assert time.monotonic() - launcher._last_ended < 0.1  # (the launcher saw it end)
    assert launcher.processes == [] or launcher.processes[0].poll() is not None
    assert max(timed() for _ in range(5)) < 0.1  # the next message is due: fast looks
    time.sleep(1.0)
    assert timed() >= 0.29  # the window is over
    monkeypatch.setattr(app_pinning, 'BUSY_LOOK_SECONDS', 0.3)
    hanging = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    try:
        launcher.processes = [hanging]
        assert 0.25 <= timed() < 0.6  # a ClientApp that hangs after its reply: looked for tasks anyway
        assert timed() >= 0.25 and launcher._last_ended < time.monotonic() - 1.0  # (no fast window from it)
    finally:
        hanging.kill()
        hanging.wait()

