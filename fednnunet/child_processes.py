"""Ending child processes the same way everywhere: SIGTERM (a site process writes its last round state on it),
then wait up to a shared deadline, then SIGKILL whatever is still running."""
import subprocess
import time
from typing import Iterable


def end_processes(processes: Iterable[subprocess.Popen], timeout: float):
    """SIGTERM to every running process, a wait of at most ``timeout`` s for all together, SIGKILL for the rest."""
    processes = [p for p in processes if p is not None]
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + timeout
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
