"""Running one function over a site's cases, in nnU-Net's style: a spawn pool and a progress bar.

The pool is started once per process and reused by every call with the same number of processes: the simulation
runs all sites' fingerprints and preprocessing in one process, and each spawn pool costs its workers' start and
imports (about 1 s per site here, where nnU-Net starts one pool for the pooled dataset). :func:`close_pool` ends
it when the work that needs it is done (the end of a planning; a site worker's close), and at exit."""
import atexit
import multiprocessing
import threading
from typing import Callable, List, Optional

from tqdm import tqdm

_pool: Optional['multiprocessing.pool.Pool'] = None
_pool_size = 0
_pool_lock = threading.Lock()  # simulated sites may fingerprint/preprocess in threads of one process


def shared_pool(num_processes: int) -> 'multiprocessing.pool.Pool':
    """This process's spawn pool of ``num_processes`` workers (started on first use; a pool of another size is
    replaced)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != num_processes:
            _close(_pool)
            _pool, _pool_size = multiprocessing.get_context('spawn').Pool(num_processes), num_processes
        return _pool


@atexit.register
def close_pool():
    """Ends this process's pool (its workers exit after their current case)."""
    global _pool, _pool_size
    with _pool_lock:
        pool, _pool, _pool_size = _pool, None, 0
    _close(pool)


def _close(pool):
    if pool is not None:
        pool.close()
        pool.join()


def run_per_case(fn: Callable, arg_tuples: List[tuple], num_processes: int, desc: str) -> list:
    """fn(*args) for every tuple, in order. The process's shared spawn pool when num_processes > 1 (as nnU-Net's
    preprocessing does), in-process otherwise (tests, ``-np 1``). Errors propagate unchanged."""
    if num_processes <= 1 or len(arg_tuples) <= 1:
        return [fn(*a) for a in tqdm(arg_tuples, desc=desc)]
    pool = shared_pool(num_processes)
    pending = [pool.apply_async(fn, a) for a in arg_tuples]
    try:
        return [p.get() for p in tqdm(pending, desc=desc)]
    except Exception:
        for p in pending:  # a failed case: this call's other cases finish first (other sites may share the pool)
            p.wait()
        raise
    except BaseException:  # Ctrl-C: stop every case now
        _terminate_pool()
        raise


def _terminate_pool():
    global _pool, _pool_size
    with _pool_lock:
        pool, _pool, _pool_size = _pool, None, 0
    if pool is not None:
        pool.terminate()
        pool.join()
