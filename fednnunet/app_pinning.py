"""A site runs only the fednnunet app bundle that its own fednnunet install builds.

Flower's SuperNode installs and executes whatever app bundle (FAB) a run names, and its only restriction
(``--trusted-entities``) accepts Flower-Hub-signed bundles alone: a compromised server (or anyone who can submit a
run) would get code execution at every hospital. ``fednnunet_site`` therefore runs its SuperNode in Flower's
``process`` isolation, where the SuperNode starts no ClientApp itself, and takes the SuperExec's place with
:class:`PinnedClientAppLauncher`: it acquires the SuperNode's ClientApp tasks (signed with a secret only this
process holds) and starts each in :func:`run_pinned_clientapp`, which is Flower's own ``flwr-clientapp`` with one
gate in front of the bundle's installation: the bundle must be byte for byte the one this site builds from its
installed fednnunet (:func:`own_app_bundle_hash`), under fednnunet's app id and version. Any other bundle is
refused before a file of it is unpacked; the server gets an error reply naming both hashes, the site's log says
the same.

Flower's bundles are deterministic (sorted files, fixed timestamps), and fednnunet's holds only its pyproject.toml
(components from the installed package, no code), so the server's ``flwr run`` of the same fednnunet version
yields the same sha256 that ``fednnunet_site --print-app-hash`` prints.
"""
import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import List, Optional

#: the Runtime API method Flower signs with the SuperExec secret (flwr.supercore.superexec.run_superexec)
_ACQUIRE_TASK = '/flwr.proto.Runtime/AcquireTask'


class UntrustedAppBundle(RuntimeError):
    """A run's app bundle is not the one this site's fednnunet builds."""


def own_app_bundle() -> bytes:
    """The app bundle (FAB) that ``flwr run`` builds from fednnunet's app folder (flower_app.write_app)."""
    from flwr.cli.build import build_fab_from_files
    from fednnunet.flower_app import app_pyproject
    return build_fab_from_files({'pyproject.toml': app_pyproject().encode('utf-8')})[0]


def own_app_bundle_hash() -> str:
    return hashlib.sha256(own_app_bundle()).hexdigest()


def own_app_id() -> tuple:
    """(fab id, fab version) of fednnunet's app, as Flower names a run's app."""
    import fednnunet
    from fednnunet.flower_app import APP_NAME, APP_PUBLISHER
    return f'{APP_PUBLISHER}/{APP_NAME}', fednnunet.__version__


def bundle_problem(content: bytes, declared_hash: str, fab_id: str, fab_version: str, expected_hash: str) -> \
        Optional[str]:
    """Why a run's bundle is not this site's own (None: it is)."""
    import fednnunet
    actual = hashlib.sha256(content).hexdigest()
    own_id, own_version = own_app_id()
    if actual != expected_hash or declared_hash != expected_hash:
        named = actual if declared_hash == actual else f'{actual} (declared {declared_hash})'
        return (f'refused app bundle {named}: this site runs only the fednnunet {fednnunet.__version__} app '
                f'bundle {expected_hash} (the server runs another fednnunet, or something else)')
    if (fab_id, fab_version) != (own_id, own_version):
        return f'refused app {fab_id} {fab_version}: this site runs only {own_id} {own_version}'
    return None


# ------------------------------------------------------------------------------------------ the ClientApp side

def run_pinned_clientapp(runtime_api_address: str, token: str, expected_hash: str,
                         parent_pid: Optional[int] = None):
    """Flower's ClientApp process (flwr-clientapp), whose bundle installation first checks the bundle. A refused
    bundle raises inside Flower's task handling, so Flower sends the server an error reply with the reason."""
    from flwr.supernode.runtime import run_clientapp as flower_clientapp
    for name in ('install_from_fab', 'pull_task_input', 'run_clientapp'):
        if not callable(getattr(flower_clientapp, name, None)):  # fail closed on a Flower that changed
            raise UntrustedAppBundle(f'flwr {_flwr_version()} has no flwr.supernode.runtime.run_clientapp.{name}; '
                                     f'this fednnunet cannot check app bundles with it')
    pulled = {}
    pull_task_input, install_from_fab = flower_clientapp.pull_task_input, flower_clientapp.install_from_fab

    def pull_and_remember(client):
        message, context, run, fab = pull_task_input(client)
        pulled.update(hash=fab.hash_str, fab_id=run.fab_id, fab_version=run.fab_version)
        return message, context, run, fab

    def install_only_own(content, *args, **kwargs):
        if not isinstance(content, bytes) or 'hash' not in pulled:
            raise UntrustedAppBundle('the app bundle did not come from the task input; refused')
        problem = bundle_problem(content, pulled['hash'], pulled['fab_id'], pulled['fab_version'], expected_hash)
        if problem:
            print(f'fednnunet_site: {problem}', file=sys.stderr, flush=True)
            raise UntrustedAppBundle(problem)
        return install_from_fab(content, *args, **kwargs)

    flower_clientapp.pull_task_input = pull_and_remember
    flower_clientapp.install_from_fab = install_only_own
    from fednnunet.object_pulls import shorten_object_pull_waits
    shorten_object_pull_waits(flower_clientapp)  # its SuperNode, on this machine, may still be receiving the message
    flower_clientapp.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                                   certificates=None, parent_pid=parent_pid, runtime_dependency_install=False)


def _flwr_version() -> str:
    try:
        import flwr
        return flwr.__version__
    except Exception:  # pragma: no cover - flwr is there when this runs
        return '?'


def prepare_clientapp():
    """What a ClientApp process imports before its task arrives: Flower's ClientApp runtime and fednnunet's app
    (engines.flower, the site daemon's client). Flower then finds the app's module already imported."""
    import fednnunet.flower_app  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401


def clientapp_main(argv=None):
    """``python -m fednnunet.app_pinning``: one ClientApp task; the token comes on stdin (not the command line,
    where every local user could read it). The process imports first and then waits for its token, so the
    launcher keeps one ready for the next message (:class:`PinnedClientAppLauncher`); one whose stdin closes
    without a token was not needed and ends quietly."""
    p = argparse.ArgumentParser(prog='python -m fednnunet.app_pinning')
    p.add_argument('--runtime-api-address', required=True)
    p.add_argument('--expected-hash', required=True)
    p.add_argument('--parent-pid', type=int, default=None)
    args = p.parse_args(argv)
    prepare_clientapp()
    token = sys.stdin.readline().strip()
    if not token:
        return
    from fednnunet.flower_app import mark_task_received
    mark_task_received()
    run_pinned_clientapp(args.runtime_api_address, token, args.expected_hash, args.parent_pid)


# ------------------------------------------------------------------------------------------ the launcher side

@contextmanager
def superexec_secret():
    """A fresh random SuperExec secret in a file only this user can read (removed afterwards): the SuperNode
    hands ClientApp tasks only to requests signed with it, i.e. to this site's launcher."""
    fd, path = tempfile.mkstemp(prefix='fednnunet_superexec_', suffix='.secret')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(secrets.token_bytes(32))
        os.chmod(path, 0o600)
        yield path
    finally:
        try:
            os.remove(path)
        except OSError:
            pass


#: the launcher's wait between looks for a ClientApp task while the site is idle (Flower's SuperExec: 1 s)
POLL_SECONDS = 0.1
#: ... and during the first FAST_WINDOW_SECONDS after a ClientApp ended, when the next message is due
FAST_POLL_SECONDS, FAST_WINDOW_SECONDS = 0.02, 5.0
#: while a ClientApp runs the launcher waits for its end, and looks for a task at least this often anyway
BUSY_LOOK_SECONDS = 1.0


def _bounded(seconds: float) -> float:
    return min(max(float(seconds), 0.01), 60.0)


class PinnedClientAppLauncher(threading.Thread):
    """The SuperExec of a site's SuperNode (process isolation): acquires ClientApp tasks and starts each in
    fednnunet's checked ClientApp process. A task whose run names another bundle is still handed to that process,
    which refuses it before installing anything and so answers the server with the reason."""

    def __init__(self, runtime_api_address: str, secret_file: str, expected_hash: Optional[str] = None,
                 poll_seconds: Optional[float] = None, env: Optional[dict] = None,
                 fast_poll_seconds: float = FAST_POLL_SECONDS, fast_window_seconds: float = FAST_WINDOW_SECONDS):
        """env: set for every ClientApp (where the site's daemon listens: fednnunet.site_daemon).
        poll_seconds: the wait between looks for a task while the site is idle (default: Flower's SuperExec setting
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL of this process's environment, else :data:`POLL_SECONDS`).
        fast_poll_seconds, fast_window_seconds: the wait during the first seconds after a ClientApp ended, when
        fednnunet's next message is due (the server sends it as soon as every site has answered)."""
        super().__init__(daemon=True, name='fednnunet-clientapp-launcher')
        self.runtime_api_address = runtime_api_address
        with open(secret_file, 'rb') as f:
            self._secret = f.read()
        self.expected_hash = expected_hash or own_app_bundle_hash()
        self.poll_seconds = _bounded(poll_seconds or float(os.environ.get('FLWR_SUPEREXEC_TASK_POLL_INTERVAL',
                                                                           POLL_SECONDS)))
        self.fast_poll_seconds = _bounded(min(fast_poll_seconds, self.poll_seconds))
        self.fast_window_seconds = float(fast_window_seconds)
        self._last_ended = float('-inf')  # time.monotonic() when the last ClientApp of this launcher ended
        self._stopping = threading.Event()
        self.env = dict(env or {})
        self.processes: List[subprocess.Popen] = []
        self._ready: Optional[subprocess.Popen] = None  # the next message's ClientApp process, imports done

    def _client(self):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name='SuperExec'),
                          SuperExecAuthHttpInterceptor(master_secret=self._secret, protected_methods={_ACQUIRE_TASK})])

    def run(self):
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType
        client = None
        self.ready_next()
        while not self._stopping.is_set():
            try:
                client = client or self._client()
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                            agentapp_fab_hashes=[]))
                if res.HasField('task') and res.token:
                    if res.task.fab_hash != self.expected_hash:
                        print(f'fednnunet_site: run {res.task.run_id} names app bundle {res.task.fab_hash}, not '
                              f'this site\'s {self.expected_hash}: it will be refused', file=sys.stderr, flush=True)
                    self.launch(res.token)
            except Exception:  # the SuperNode is (re)starting: its Runtime API is not there yet
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
                client = None
                self._stopping.wait(2.0)
                continue
            self.wait_before_next_look()

    def wait_before_next_look(self):
        """Flower's SuperNode hands out one message at a time and pulls the next only after the ClientApp's reply,
        so while a ClientApp runs there is no task to look for: the launcher waits for it to end (looking again
        at least every ``BUSY_LOOK_SECONDS``, in case one hangs after its reply). The next message is due right
        after (the server sends it once every site has answered): for ``fast_window_seconds`` the launcher looks
        every ``fast_poll_seconds``, then every ``poll_seconds``."""
        running = [p for p in self.processes if p.poll() is None]
        if len(running) < len(self.processes):  # a ClientApp ended since the last look
            self._last_ended = time.monotonic()
        self.processes = running
        if running:
            deadline = time.monotonic() + BUSY_LOOK_SECONDS
            while not self._stopping.is_set() and time.monotonic() < deadline and \
                    any(p.poll() is None for p in running):
                self._stopping.wait(self.fast_poll_seconds)
            if all(p.poll() is not None for p in running):
                self._last_ended = time.monotonic()
            return
        fast = time.monotonic() - self._last_ended < self.fast_window_seconds
        self._stopping.wait(self.fast_poll_seconds if fast else self.poll_seconds)

    def _clientapp_process(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, '-m', 'fednnunet.app_pinning', '--runtime-api-address',
                                 self.runtime_api_address, '--expected-hash', self.expected_hash,
                                 '--parent-pid', str(os.getpid())], stdin=subprocess.PIPE,
                                env=dict(os.environ, **self.env))

    def launch(self, token: str):
        """Hands the task to the ClientApp process kept ready (it has done its imports), then readies the next:
        Flower's one process per message, without the process start and imports on the message's path."""
        print(f'fednnunet_site: {time.strftime("%Y-%m-%d %H:%M:%S")} starting a checked ClientApp', flush=True)
        p, self._ready = self._ready, None
        if p is None or p.poll() is not None:
            p = self._clientapp_process()
        p.stdin.write(token.encode() + b'\n')
        p.stdin.close()
        self.processes.append(p)
        self.ready_next()

    def ready_next(self):
        if self._ready is None and not self._stopping.is_set():
            self._ready = self._clientapp_process()

    def stop(self, timeout: float = 30.0):
        """Stops acquiring tasks and ends the ClientApps still running (and the one kept ready)."""
        self._stopping.set()
        if self.is_alive():
            self.join(5.0)
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.stdin.close()  # no token: it ends by itself
            self.processes.append(ready)
        for p in self.processes:
            if p.poll() is None and p is not ready:
                p.terminate()
        deadline = time.time() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == '__main__':
    clientapp_main()
