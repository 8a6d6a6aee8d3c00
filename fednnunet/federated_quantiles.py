"""Exact order statistics and percentiles of a sample split across sites.

No site reveals its values. The server asks "how many of your values are <= t?" for a batch of
thresholds t and narrows, per wanted rank, an interval of candidate values until a single
representable float remains. Searching over the integer keys of the float bit patterns makes the
answer exact (it is a value of the pooled sample) in at most ~32/log2(B+1) rounds for float32 with B
thresholds per rank and round.

``linear_percentiles`` then reproduces ``np.percentile(pooled, q)`` (method 'linear') bit for bit from
the two order statistics around each virtual index; tests compare it with numpy itself.
"""
from typing import Callable, Dict, Iterable, Sequence, Tuple

import numpy as np

_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
_SIGN = {np.dtype(np.float32): np.uint32(1 << 31), np.dtype(np.float64): np.uint64(1 << 63)}


def float_to_key(values: np.ndarray) -> np.ndarray:
    """Monotone map from floats (no NaN) to unsigned integers: a < b  <=>  key(a) < key(b).

    -0.0 and +0.0 get different keys (-0.0 first); both compare equal as floats, which only matters for
    counting, where ``searchsorted`` treats them as equal. ``key_to_float`` inverts this map."""
    values = np.asarray(values)
    dt = values.dtype
    bits = values.view(_UINT[dt])
    sign = _SIGN[dt]
    return np.where(bits & sign, ~bits, bits | sign).astype(_UINT[dt])


def key_to_float(keys: np.ndarray, dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    keys = np.asarray(keys, dtype=_UINT[dt])
    sign = _SIGN[dt]
    bits = np.where(keys & sign, keys & ~sign, ~keys).astype(_UINT[dt])
    return bits.view(dt)


CountFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


def exact_order_statistics(wanted: Dict[str, Tuple[Sequence[int], float, float]], dtype, count_leq: CountFn,
                           thresholds_per_rank: int = 63, max_rounds: int = 200) -> Tuple[Dict[str, np.ndarray], int]:
    """Finds the values at 0-based ranks of a pooled sample that only the sites hold.

    wanted: {group: (ranks, min_value, max_value)}; a group is one channel. min/max are the pooled
        minimum and maximum (known exactly from the sites' moments).
    count_leq: asks every site and sums: {group: thresholds} -> {group: counts of values <= threshold}.
    Returns ({group: values at those ranks, in the given order}, rounds used).

    The k-th value (0-based) is the smallest representable float v with count(<= v) >= k + 1.
    """
    dt = np.dtype(dtype)
    state = {}
    for group, (ranks, vmin, vmax) in wanted.items():
        ranks = np.asarray(list(ranks), dtype=np.int64)
        lo = np.full(len(ranks), int(float_to_key(np.array([vmin], dtype=dt))[0]), dtype=object)
        hi = np.full(len(ranks), int(float_to_key(np.array([vmax], dtype=dt))[0]), dtype=object)
        state[group] = (ranks, lo, hi)  # invariant: answer key in [lo, hi]
    rounds = 0
    while any((lo < hi).any() for _, lo, hi in state.values()):
        if rounds >= max_rounds:
            raise RuntimeError('federated order statistic search did not converge')
        rounds += 1
        asked = {}
        plan = {}
        for group, (ranks, lo, hi) in state.items():
            keys, owners = [], []
            for i in range(len(ranks)):
                if lo[i] >= hi[i]:
                    continue
                width = hi[i] - lo[i]
                n = min(thresholds_per_rank, width)
                # candidate thresholds strictly inside [lo, hi): lo + ceil(j * width / (n + 1)) - 1 ... keep distinct
                cand = sorted({lo[i] + (j * width) // (n + 1) for j in range(1, n + 1)} | {lo[i] + width // 2})
                cand = [c for c in cand if lo[i] <= c < hi[i]]
                keys.extend(cand)
                owners.extend([i] * len(cand))
            if keys:
                thresholds = key_to_float(np.array(keys, dtype=_UINT[dt]), dt)
                asked[group] = thresholds
                plan[group] = (np.array(keys, dtype=object), np.array(owners))
        counts = count_leq(asked)
        for group, (keys, owners) in plan.items():
            ranks, lo, hi = state[group]
            c = np.asarray(counts[group], dtype=np.int64)
            if c.shape != (len(keys),):
                raise RuntimeError(f'count reply for {group!r} has shape {c.shape}, expected {(len(keys),)}')
            for key, owner, cnt in zip(keys, owners, c):
                if cnt >= ranks[owner] + 1:
                    if key < hi[owner]:
                        hi[owner] = key
                elif key + 1 > lo[owner]:
                    lo[owner] = key + 1
    values = {g: key_to_float(np.array(list(lo), dtype=_UINT[dt]), dt) for g, (_, lo, _) in state.items()}
    return values, rounds


def percentile_ranks(n: int, percentiles: Iterable[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 0-based order statistics numpy's 'linear' percentile reads, and its interpolation weights.

    Returns (previous_indexes, next_indexes, gamma) exactly as np.percentile computes them."""
    q = np.true_divide(np.asarray(list(percentiles), dtype=np.float64), 100)
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    nxt = previous + 1
    above = virtual >= n - 1
    previous[above] = -1
    nxt[above] = -1
    below = virtual < 0
    previous[below] = 0
    nxt[below] = 0
    previous = previous.astype(np.intp)
    nxt = nxt.astype(np.intp)
    gamma = np.asarray(virtual - previous, dtype=virtual.dtype)
    # numpy indexes -1 = the last element
    previous = np.where(previous < 0, n + previous, previous)
    nxt = np.where(nxt < 0, n + nxt, nxt)
    return previous, nxt, gamma


def linear_percentiles(previous_values: np.ndarray, next_values: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's linear interpolation between neighbouring order statistics, operation for operation."""
    a = np.asarray(previous_values)
    b = np.asarray(next_values)
    diff_b_a = b - a
    result = np.add(a, diff_b_a * gamma)
    np.subtract(b, diff_b_a * (1 - gamma), out=result, where=gamma >= 0.5, casting='unsafe',
                dtype=type(result.dtype))
    return result
