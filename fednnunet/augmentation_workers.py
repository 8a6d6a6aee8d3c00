"""Pausing nnU-Net's background augmentation workers while their site waits for its next turn.

Sites that take turns on one machine (the simulation) keep their trainers, and with them nnU-Net's data loaders
(batchgenerators' ``NonDetMultiThreadedAugmenter``). An idle worker whose queue is full is not idle: it retries
``queue.put`` every ``wait_time`` (2 ms in nnU-Net), and three waiting sites' workers took the CPU from the site
whose turn it was. Stopping them and starting them again next turn costs set-up and an empty queue every turn.

Here the worker processes are stopped instead (SIGSTOP) and continued (SIGCONT) at the site's next turn: they use
no CPU meanwhile, and their queues, already filled with augmented batches, are ready when the site trains again.
A process stopped while writing to its queue finishes the write when continued; the data loader's own results
thread (in this process) simply waits meanwhile. Where signals cannot stop a process (Windows) nothing is paused
and the caller stops the workers instead. Every paused worker is continued before this process exits, so that
multiprocessing's exit handler, which terminates and joins daemonic workers, never waits on a stopped one.
"""
import atexit
import os
import signal
from typing import Iterable, List, Set

_paused: Set[int] = set()


def can_pause() -> bool:
    return hasattr(signal, 'SIGSTOP') and hasattr(signal, 'SIGCONT')


def worker_pids(loader) -> List[int]:
    """The live worker processes of one of nnU-Net's data loaders (none for a single-threaded one)."""
    processes = getattr(loader, '_processes', None) or []
    return [p.pid for p in processes if p.pid is not None and p.is_alive()]


def pause(loaders: Iterable) -> bool:
    """Stops the worker processes of ``loaders``. False if this platform cannot (nothing was stopped)."""
    if not can_pause():
        return False
    for loader in loaders:
        for pid in worker_pids(loader):
            _signal(pid, signal.SIGSTOP)
            _paused.add(pid)
    return True


def resume(loaders: Iterable):
    """Continues the worker processes of ``loaders`` that :func:`pause` stopped."""
    for loader in loaders:
        for pid in worker_pids(loader):
            if pid in _paused:
                _signal(pid, signal.SIGCONT)
                _paused.discard(pid)


def is_paused(loader) -> bool:
    return any(pid in _paused for pid in worker_pids(loader))


def _signal(pid: int, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # the worker ended on its own; the data loader reports that when next used
        _paused.discard(pid)


@atexit.register
def _resume_all():
    for pid in list(_paused):
        _signal(pid, signal.SIGCONT)
    _paused.clear()
