"""The exact federated order statistic and numpy-identical percentiles."""
import numpy as np
import pytest

from fednnunet.federated_quantiles import (exact_order_statistics, float_to_key, key_to_float, linear_percentiles,
                                           percentile_ranks)


def _federated_percentiles(parts, percentiles, dtype):
    pooled_n = sum(len(p) for p in parts)
    prev, nxt, gamma = percentile_ranks(pooled_n, percentiles)
    sorted_parts = [np.sort(p) for p in parts]
    asked = []

    def count_leq(query):
        asked.append(query)
        return {g: sum(np.searchsorted(s, t, side='right') for s in sorted_parts) for g, t in query.items()}

    ranks = sorted(set(prev.tolist()) | set(nxt.tolist()))
    vmin = min(p.min() for p in parts)
    vmax = max(p.max() for p in parts)
    values, rounds = exact_order_statistics({'0': (ranks, vmin, vmax)}, dtype, count_leq)
    at = dict(zip(ranks, values['0']))
    result = linear_percentiles(np.array([at[i] for i in prev], dtype=dtype),
                                np.array([at[i] for i in nxt], dtype=dtype), gamma)
    return result, ranks, values['0'], rounds, asked


@pytest.mark.parametrize('seed', range(12))
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_matches_numpy_bit_for_bit(seed, dtype):
    rs = np.random.RandomState(seed)
    parts = [(rs.randn(rs.randint(1, 3000)) * rs.choice([1, 100, 1e4]) + rs.randn() * 50).astype(dtype)
             for _ in range(rs.randint(1, 5))]
    if seed % 3 == 0:
        parts = [np.round(p) for p in parts]  # many ties
    pooled = np.concatenate(parts)
    percentiles = np.array((0.5, 50.0, 99.5))
    result, ranks, values, rounds, _ = _federated_percentiles(parts, percentiles, dtype)
    np.testing.assert_array_equal(values, np.sort(pooled)[ranks])
    reference = np.percentile(pooled, percentiles)
    assert result.dtype == reference.dtype
    np.testing.assert_array_equal(result, reference)
    assert rounds <= (6 if dtype == np.float32 else 11)


def test_single_value_and_constant_sample():
    parts = [np.array([3.5], dtype=np.float32), np.array([3.5, 3.5], dtype=np.float32)]
    result, *_ = _federated_percentiles(parts, (0.5, 50.0, 99.5), np.float32)
    np.testing.assert_array_equal(result, np.percentile(np.concatenate(parts), (0.5, 50.0, 99.5)))


def test_sites_only_ever_receive_thresholds():
    parts = [np.arange(100, dtype=np.float32), np.arange(50, dtype=np.float32) * 2]
    *_, asked = _federated_percentiles(parts, (50.0,), np.float32)
    for query in asked:
        assert set(query) == {'0'} and query['0'].dtype == np.float32


def test_key_map_is_monotone_and_invertible():
    values = np.array([-np.inf, -1e30, -1.5, -0.0, 0.0, 1e-40, 2.0, 3e38, np.inf], dtype=np.float32)
    keys = float_to_key(values)
    assert np.all(np.diff(keys.astype(np.float64)) > 0)
    np.testing.assert_array_equal(key_to_float(keys, np.float32).view(np.uint32), values.view(np.uint32))
