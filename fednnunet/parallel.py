"""Running one function over a site's cases, in nnU-Net's style: a spawn pool and a progress bar."""
import multiprocessing
from typing import Callable, List

from tqdm import tqdm


def run_per_case(fn: Callable, arg_tuples: List[tuple], num_processes: int, desc: str) -> list:
    """fn(*args) for every tuple, in order. A spawn pool when num_processes > 1 (as nnU-Net's
    preprocessing does), in-process otherwise (tests, ``-np 1``). Errors propagate unchanged."""
    if num_processes <= 1 or len(arg_tuples) <= 1:
        return [fn(*a) for a in tqdm(arg_tuples, desc=desc)]
    with multiprocessing.get_context('spawn').Pool(min(num_processes, len(arg_tuples))) as pool:
        pending = [pool.apply_async(fn, a) for a in arg_tuples]
        return [p.get() for p in tqdm(pending, desc=desc)]
