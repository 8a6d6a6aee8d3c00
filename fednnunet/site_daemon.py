"""A site's long-lived process over Flower: its SiteWorker, and so its training run's trainer, outlive Flower's
ClientApp processes.

Flower starts a new ClientApp process for every message. On its own, a site would therefore rebuild its nnU-Net
trainer (network, optimizer, data loaders and their augmentation workers, the compiled network) every round and
read and write its state from disk in between. ``fednnunet_site`` instead starts this daemon next to its
SuperNode; every ClientApp hands its message over a Unix socket in a folder only the site's user can enter and
sends the daemon's reply back (:func:`ask_daemon`). The daemon answers one message at a time (Flower runs one
ClientApp at a time per run on a node), with one SiteWorker that keeps its trainers across rounds
(site_training.LiveTrainer); its round states still go to the site's disk, so a restarted daemon resumes from
them. Messages cross the socket in fednnunet's wire format (plain JSON + arrays, never pickle).
"""
import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Optional

from fednnunet.log_lines import site_line, stamped
from fednnunet.wire import Message, WireError, decode, encode

#: the environment variable that tells a ClientApp where its site's daemon listens
SOCKET_VARIABLE = 'FEDNNUNET_SITE_DAEMON'
#: ... and which site that daemon serves
SITE_VARIABLE = 'FEDNNUNET_SITE_DAEMON_SITE'
_LENGTH = struct.Struct('<Q')
_OK, _ERROR = b'R', b'E'
MAX_FRAME = 16 * 2 ** 30  # a model of 16 GiB


class DaemonUnavailable(ConnectionError):
    """The site's daemon could not be reached or ended during the message."""


def _send(sock: socket.socket, payload: bytes):
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _receive(sock: socket.socket) -> bytes:
    head = _read_exactly(sock, _LENGTH.size)
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise WireError(f'a frame of {length} bytes; at most {MAX_FRAME}')
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 24))
        if not chunk:
            raise DaemonUnavailable('the connection closed in the middle of a message')
        chunks.append(chunk)
        left -= len(chunk)
    return b''.join(chunks)


def remote_error(error_type: str, text: str) -> Exception:
    """The site's error, as an exception of the same type name (what the server is told: type and text)."""
    name = error_type if error_type.isidentifier() else 'SiteError'
    return type(name, (RuntimeError,), {})(text)


def ask_daemon(socket_path: str, message: Message) -> Message:
    """Hands one message to the site's daemon and returns its reply; the site's error is raised with its type
    name; DaemonUnavailable if the daemon is not there or ended on the way."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except OSError as e:
            raise DaemonUnavailable(f"the site's daemon is not running ({e.strerror or e})") from None
        _send(sock, encode(message))
        try:
            answer = _receive(sock)
        except (OSError, DaemonUnavailable) as e:
            raise DaemonUnavailable(f"the site's daemon ended while it handled {message.kind!r} ({e})") from None
    if answer[:1] == _OK:
        return decode(answer[1:])
    error = json.loads(answer[1:].decode('utf-8'))
    raise remote_error(str(error.get('error_type', 'SiteError')), str(error.get('error', '')))


class SiteDaemon:
    """Serves one site's messages on a Unix socket, one at a time, with one SiteWorker."""

    def __init__(self, socket_path: str, worker_factory: Callable[[], object], site: str = ''):
        self.socket_path = socket_path
        self.site = site
        self.worker_factory = worker_factory
        self.worker = None
        self._server: Optional[socket.socket] = None
        self._stopping = threading.Event()

    def listen(self):
        if os.path.exists(self.socket_path):
            os.remove(self.socket_path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket itself: this user only (its folder is 0700 too)
        try:
            self._server.bind(self.socket_path)
        finally:
            os.umask(old)
        self._server.listen(16)

    def serve_forever(self):
        if self._server is None:
            self.listen()
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket):
        try:
            request = decode(_receive(conn))
        except (WireError, DaemonUnavailable, OSError) as e:
            print(f'fednnunet site daemon: unreadable request: {e}', file=sys.stderr, flush=True)
            return
        t0 = time.time()
        try:
            if self.worker is None:
                self.worker = self.worker_factory()
            reply = self.worker.handle(request)
            answer = _OK + encode(reply)
            line = site_line(self.site, request, reply, time.time() - t0)
        except Exception as e:  # noqa: BLE001 - the site's error goes back to the ClientApp, named
            traceback.print_exc()
            answer = _ERROR + json.dumps({'error_type': type(e).__name__, 'error': str(e)}).encode('utf-8')
            line = site_line(self.site, request, None, time.time() - t0, error=f'{type(e).__name__}: {e}')
        if line:  # one line per round (and per planning step) for whoever watches the site's log
            print(f'fednnunet_site: {stamped(line)}', flush=True)
        try:
            _send(conn, answer)
        except OSError as e:  # the ClientApp is gone (its SuperNode stopped it); the next message goes on
            print(f'fednnunet site daemon: the reply to {request.kind!r} could not be handed back: {e}',
                  file=sys.stderr, flush=True)

    def stop(self):
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        if self.worker is not None and hasattr(self.worker, 'close'):
            self.worker.close()
        if os.path.exists(self.socket_path):
            os.remove(self.socket_path)


@contextmanager
def daemon_folder():
    """A fresh folder only this user can enter, for the daemon's socket (removed afterwards)."""
    folder = tempfile.mkdtemp(prefix='fednnunet_site_')
    try:
        os.chmod(folder, 0o700)
        yield folder
    finally:
        for name in os.listdir(folder):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _watch_parent(parent_pid: int):
    """Ends this process when fednnunet_site (its parent) is gone."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(1.0)
    threading.Thread(target=watch, daemon=True).start()


def main(argv=None):
    """``python -m fednnunet.site_daemon``: started by fednnunet_site, with the SuperNode's node config."""
    p = argparse.ArgumentParser(prog='python -m fednnunet.site_daemon')
    p.add_argument('--socket', required=True)
    p.add_argument('--site', required=True)
    p.add_argument('-d', required=True)
    p.add_argument('--device', default='auto')
    p.add_argument('-np', type=int, default=1)
    p.add_argument('--verbose', action='store_true')
    p.add_argument('--parent-pid', type=int, default=None)
    args = p.parse_args(argv)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    import signal

    def stop_on_sigterm(signum, frame):  # fednnunet_site stops the daemon: the round states still get written
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop_on_sigterm)

    def worker():
        from fednnunet.federation import Federation
        from fednnunet.site_worker import SiteWorker
        federation = Federation.from_raw(args.d, only_sites=[args.site])
        return SiteWorker(federation.sites[args.site], federation.dataset_name, args.np, device=args.device,
                          state_in_memory=False, verbose=args.verbose, keep_trainers=True,
                          # paused between rounds: polling workers slowed Flower's transfers (and other sites)
                          keep_augmentation_workers=False)
    daemon = SiteDaemon(args.socket, worker, site=args.site)
    daemon.listen()
    print(f"fednnunet_site: site '{args.site}' daemon ready (keeps its trainer across rounds)", flush=True)
    try:
        daemon.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()


if __name__ == '__main__':
    main()
