"""Flower's SuperNode (``flower-supernode``), with a configurable wait between its pulls for messages.

A SuperNode that pulls the SuperLink and finds no message sleeps a fixed 3 s before it asks again (flwr 1.42,
``flwr.supernode.start_client_internal``). Flower's own rounds are long and few messages apart; fednnunet sends a
site one message per round, the next only after every site has answered, so the site nearly always finds nothing
right after its reply and then waits up to 3 s (measured: the larger part of Flower's share of a round). Here the
idle wait is ``--pull-interval`` seconds instead (fednnunet_site's default 0.5 s: two small requests a second to
the SuperLink while the site waits). Nothing else of the SuperNode changes: this module runs Flower's own
``flower-supernode`` entry point with the same arguments. On a Flower whose SuperNode no longer has this wait the
SuperNode runs unchanged, with a one-line notice.

    python -m fednnunet.supernode_runner --pull-interval 0.5 -- <flower-supernode arguments>
"""
import sys
import time as _time
from typing import List, Optional

#: the idle wait of flwr's SuperNode loop that this replaces (its other waits are 0.5 s and stay)
FLOWER_IDLE_WAIT = 3
MIN_PULL_INTERVAL = 0.05


class _IdleWait:
    """``time`` for Flower's SuperNode loop: everything as the time module, but its idle wait shortened."""

    def __init__(self, pull_interval: float):
        self.pull_interval = pull_interval

    def sleep(self, seconds: float):
        _time.sleep(self.pull_interval if seconds == FLOWER_IDLE_WAIT else seconds)

    def __getattr__(self, name):
        return getattr(_time, name)


def shorten_idle_wait(pull_interval: float) -> bool:
    """Makes Flower's SuperNode loop (in this process) wait ``pull_interval`` s between empty pulls. False (and
    nothing changed) if this Flower's SuperNode loop is not the one this was written for."""
    from flwr.supernode import start_client_internal
    if getattr(start_client_internal, 'time', None) is not _time:
        return False
    start_client_internal.time = _IdleWait(pull_interval)
    return True


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != '--pull-interval' or argv[2] != '--':
        sys.exit('usage: python -m fednnunet.supernode_runner --pull-interval SECONDS -- <flower-supernode args>')
    pull_interval = float(argv[1])
    if not MIN_PULL_INTERVAL <= pull_interval <= FLOWER_IDLE_WAIT:
        sys.exit(f'--pull-interval must be between {MIN_PULL_INTERVAL} and {FLOWER_IDLE_WAIT} s, not {pull_interval}')
    if not shorten_idle_wait(pull_interval):
        print(f"fednnunet_site: this Flower's SuperNode has no {FLOWER_IDLE_WAIT} s idle wait to shorten; it "
              f"polls at Flower's own interval", flush=True)
    from flwr.supernode.cli import flower_supernode
    sys.argv = ['flower-supernode'] + argv[3:]
    sys.exit(flower_supernode())


if __name__ == '__main__':
    main()
