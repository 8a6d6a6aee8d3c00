"""Flower's SuperNode (``flower-supernode``), with a configurable wait between its pulls for messages.

A SuperNode that pulls the SuperLink and finds no message sleeps a fixed 3 s before it asks again, and it looks
for the ClientApp's reply every 0.5 s (flwr 1.42, ``flwr.supernode.start_client_internal``). Flower's own rounds
are long and few messages apart; fednnunet sends a site one message per round, the next only after every site has
answered, so the site nearly always finds nothing right after its reply and then waits up to 3 s (measured: the
larger part of Flower's share of a round). Here the wait between pulls is at most ``--pull-interval`` seconds
(fednnunet_site's default 0.2 s: five small requests a second to the SuperLink while the site waits), and at most
FAST_PULL_INTERVAL during the FAST_WINDOW seconds after the site's reply, when the server's next message is due;
the looks for the reply, local look-ups in the SuperNode's own state, come every LOCAL_WAIT seconds while the site
trains. Nothing else of the SuperNode changes: this module runs Flower's
own ``flower-supernode`` entry point with the same arguments. On a Flower whose SuperNode loop is not the one this
was written for, the SuperNode runs unchanged, with a one-line notice.

After a failed request (the server not up yet, or restarting) the SuperNode tries again within RECONNECT_WAIT
seconds, not after Flower's doubling wait of up to 20 s (a test's site waited 15 s for a server that had been up
for 10). Its looks for a message object still on its way: :mod:`fednnunet.object_pulls`.

``--heartbeat-interval S`` (Flower's 30 s by default; its SuperLink accepts 10-1800): how often the SuperNode tells
the SuperLink it is alive. The SuperLink declares a node gone after two intervals without one, so a site that
dies (power loss, kill -9) misses the current round after 2 S instead of about 60 s.

    python -m fednnunet.supernode_runner --pull-interval 0.2 [--heartbeat-interval 30] -- <flower-supernode args>
"""
import sys
import time as _time
from typing import List, Optional

#: the idle wait of flwr's SuperNode loop between its pulls: at most the pull interval instead
FLOWER_IDLE_WAIT = 3
MIN_PULL_INTERVAL = 0.05
#: for FAST_WINDOW seconds after a reply the idle wait is at most FAST_PULL_INTERVAL: the server sends the next message
#: as soon as every site has answered
FAST_PULL_INTERVAL, FAST_WINDOW = 0.05, 3.0
#: Flower's other waits in that loop (0.5 s) are local look-ups (the ClientApp's reply in the SuperNode's own state):
#: LOCAL_WAIT instead
FLOWER_LOCAL_WAIT, LOCAL_WAIT = 0.5, 0.02
#: the longest wait before the SuperNode tries an unreachable server again (Flower: doubling up to 20 s)
RECONNECT_WAIT = 2.0
#: the heartbeat intervals Flower's SuperLink accepts (flwr.common.constant HEARTBEAT_MIN/MAX_INTERVAL) and its own
MIN_HEARTBEAT, MAX_HEARTBEAT, FLOWER_HEARTBEAT = 10, 1800, 30


class _IdleWait:
    """``time`` for Flower's SuperNode loop: everything as the time module, but its waits shorter. The idle wait
    between pulls (Flower's 3 s) is at most the pull interval, and at most FAST_PULL_INTERVAL during the first
    FAST_WINDOW seconds after the site's last reply (its look-ups for the reply, Flower's local 0.5 s waits, end
    when the reply has been sent); the local waits are LOCAL_WAIT."""

    def __init__(self, pull_interval: float):
        self.pull_interval = pull_interval
        self.fast_pull_interval = min(FAST_PULL_INTERVAL, pull_interval)
        self._last_local_wait = float('-inf')

    def sleep(self, seconds: float):
        if seconds == FLOWER_LOCAL_WAIT:  # waiting for a reply of this site's ClientApp (local)
            self._last_local_wait = _time.monotonic()
            _time.sleep(LOCAL_WAIT)
        elif seconds >= FLOWER_IDLE_WAIT and _time.monotonic() - self._last_local_wait < FAST_WINDOW:
            _time.sleep(self.fast_pull_interval)
        else:  # Flower's idle wait, or a wait this was not written for: at most the pull interval
            _time.sleep(min(seconds, self.pull_interval))

    def __getattr__(self, name):
        return getattr(_time, name)


def shorten_waits(pull_interval: float) -> bool:
    """Makes Flower's SuperNode loop (in this process) wait at most ``pull_interval`` s between its pulls
    (FAST_PULL_INTERVAL right after a reply) and LOCAL_WAIT between its looks for the ClientApp's reply (see
    :class:`_IdleWait`). False (and nothing changed) if this Flower's SuperNode loop is not the one this was written
    for."""
    from flwr.supernode import start_client_internal
    if getattr(start_client_internal, 'time', None) is not _time:
        return False
    start_client_internal.time = _IdleWait(pull_interval)
    return True


def cap_reconnect_wait(seconds: float = RECONNECT_WAIT) -> bool:
    """The SuperNode in this process waits at most ``seconds`` (with Flower's full jitter: a random share of it)
    before it tries the server again after a failed request, instead of Flower's doubling up to 20 s: a site that
    starts before the server, or whose server restarts, is back within about a second of the server, not after up
    to 20 s. False (nothing changed) if this Flower keeps that wait elsewhere."""
    try:
        from flwr.supercore.retry import http_retry
    except ImportError:
        return False
    if not isinstance(getattr(http_retry, 'MAX_RETRY_DELAY', None), (int, float)):
        return False
    http_retry.MAX_RETRY_DELAY = min(http_retry.MAX_RETRY_DELAY, seconds)
    return True


def set_heartbeat_interval(seconds: float) -> bool:
    """The SuperNode in this process announces and sends its heartbeat every ``seconds`` (Flower's own 30); False
    (nothing changed) if this Flower keeps the interval elsewhere."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    modules = (heartbeat, fleet_http_connection)
    if not all(getattr(m, 'HEARTBEAT_DEFAULT_INTERVAL', None) == FLOWER_HEARTBEAT for m in modules):
        return False
    for m in modules:
        m.HEARTBEAT_DEFAULT_INTERVAL = seconds
    return True


USAGE = ('usage: python -m fednnunet.supernode_runner --pull-interval SECONDS [--heartbeat-interval SECONDS] -- '
         '<flower-supernode args>')


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    heartbeat = None
    if len(argv) >= 3 and argv[2] == '--heartbeat-interval':
        if len(argv) < 5:
            sys.exit(USAGE)
        heartbeat = float(argv[3])
        del argv[2:4]
        if not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
            sys.exit(f'--heartbeat-interval must be between {MIN_HEARTBEAT} and {MAX_HEARTBEAT} s, not {heartbeat}')
    if len(argv) < 3 or argv[0] != '--pull-interval' or argv[2] != '--':
        sys.exit(USAGE)
    pull_interval = float(argv[1])
    if not MIN_PULL_INTERVAL <= pull_interval <= FLOWER_IDLE_WAIT:
        sys.exit(f'--pull-interval must be between {MIN_PULL_INTERVAL} and {FLOWER_IDLE_WAIT} s, not {pull_interval}')
    from flwr.supernode import start_client_internal
    from fednnunet.object_pulls import REMOTE_BACKOFF, shorten_object_pull_waits
    for done, what in ((shorten_waits(pull_interval), 'waits between its pulls and for the reply'),
                       (shorten_object_pull_waits(start_client_internal, REMOTE_BACKOFF),
                        'waits for a message object still on its way'),
                       (cap_reconnect_wait(), 'waits before it tries an unreachable server again')):
        if not done:
            print(f"fednnunet_site: this Flower's SuperNode is not the one fednnunet shortens the {what} of; "
                  f"they stay Flower's own", flush=True)
    if heartbeat is not None and heartbeat != FLOWER_HEARTBEAT and not set_heartbeat_interval(heartbeat):
        print("fednnunet_site: this Flower keeps its heartbeat interval elsewhere; the SuperNode uses Flower's own",
              flush=True)
    try:  # the SuperNode's log lines with their time (a site's log is a file more often than a terminal)
        from flwr.supercore.logger import update_console_handler
        update_console_handler(timestamps=True, colored=sys.stdout.isatty())
    except ImportError:
        pass
    from flwr.supernode.cli import flower_supernode
    sys.argv = ['flower-supernode'] + argv[3:]
    sys.exit(flower_supernode())


if __name__ == '__main__':
    main()
