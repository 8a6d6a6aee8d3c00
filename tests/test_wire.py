"""Messages are plain JSON + numeric arrays; decoding never unpickles."""
import json
import struct

import numpy as np
import pytest

from fednnunet.wire import MAGIC, Message, WireError, decode, encode, encoded_size


def test_roundtrip_keeps_config_and_arrays_exactly():
    arrays = {'w': np.random.RandomState(0).randn(3, 4).astype(np.float32), 'n': np.arange(5, dtype=np.int64),
              'flag': np.array([True, False]), 'empty': np.zeros((0, 3), dtype=np.float16),
              'scalar': np.array(7, dtype=np.int64),  # a 0-d array (e.g. BatchNorm's num_batches_tracked) stays 0-d
              'transposed': np.arange(6, dtype=np.float32).reshape(2, 3).T}
    m = Message('fit', {'round': 3, 'keys': ['a', 'b'], 'nested': {'x': 1.5, 'y': None}}, arrays)
    back = decode(encode(m))
    assert back.kind == 'fit' and back.config == m.config
    assert set(back.arrays) == set(arrays)
    for k, a in arrays.items():
        assert back.arrays[k].dtype == a.dtype and back.arrays[k].shape == a.shape
        np.testing.assert_array_equal(back.arrays[k], a)
    assert encoded_size(m) == len(encode(m))


def test_refuses_objects_in_config_and_arrays():
    with pytest.raises(WireError, match='not plain JSON'):
        encode(Message('x', {'obj': object()}))
    with pytest.raises(WireError, match='only numeric arrays'):
        encode(Message('x', arrays={'o': np.array([object()], dtype=object)}))


def test_refuses_corrupt_bytes():
    data = encode(Message('x', arrays={'a': np.arange(10, dtype=np.float32)}))
    with pytest.raises(WireError, match='magic'):
        decode(b'garbage' + data)
    with pytest.raises(WireError):
        decode(data[:-4])  # truncated body

def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack('<Q', len(raw)) + raw + body


def test_a_tampered_header_is_refused_by_the_dtype_guard_not_by_accident():
    """A well-formed header that names an object dtype (what would unpickle) reaches the dtype check and is refused
    there; malformed headers are WireErrors too, never a TypeError from deep inside numpy."""
    body = np.arange(2, dtype=np.int64).tobytes()
    entry = {'name': 'a', 'dtype': '|O', 'shape': [2], 'offset': 0, 'nbytes': 16}
    assert np.dtype(entry['dtype']).hasobject  # the header is valid JSON and the dtype exists: only the guard stops it
    with pytest.raises(WireError, match="array 'a' has dtype object; refused"):
        decode(_with_header({'kind': 'x', 'config': {}, 'arrays': [entry]}, body))
    structured = dict(entry, dtype=[['f', '|O']])
    with pytest.raises(WireError):
        decode(_with_header({'kind': 'x', 'config': {}, 'arrays': [structured]}, body))
    for bad in ({'kind': 'x', 'config': {}}, {'kind': 'x', 'config': [], 'arrays': []},
                {'kind': 'x', 'config': {}, 'arrays': [dict(entry, dtype='not-a-dtype')]},
                {'kind': 'x', 'config': {}, 'arrays': [dict(entry, dtype='<i8', shape=[-2])]},
                {'kind': 'x', 'config': {}, 'arrays': [dict(entry, dtype='<i8', nbytes=8)]}):
        with pytest.raises(WireError):
            decode(_with_header(bad, body))
    assert decode(_with_header({'kind': 'x', 'config': {}, 'arrays': [dict(entry, dtype='<i8')]}, body)).arrays[
        'a'].tolist() == [0, 1]


def test_predictions_travel_as_checked_float16_and_bad_ones_are_named():
    from fednnunet.errors import FederationError
    from fednnunet.knowledge import CONFIDENCE, PROBABILITIES, check_predictions, encode_predictions, \
        prediction_bytes
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5, 6, 7))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    confidence = rng.uniform(size=(3, 1, 5, 6, 7))
    arrays = encode_predictions(probabilities, confidence)
    message = decode(encode(Message('predictions', arrays=arrays)))
    p, c = check_predictions(message.arrays, 3, 4, (5, 6, 7), 'A')
    np.testing.assert_allclose(p, probabilities, atol=1e-3)
    np.testing.assert_allclose(c, confidence, atol=1e-3)
    assert sum(a.nbytes for a in arrays.values()) == prediction_bytes(3, 4, (5, 6, 7))
    nan = dict(arrays, **{CONFIDENCE: arrays[CONFIDENCE].copy()})
    nan[CONFIDENCE][0, 0, 0, 0, 0] = np.nan
    above = dict(arrays, **{PROBABILITIES: arrays[PROBABILITIES] * np.float16(1.5)})
    half = dict(arrays, **{PROBABILITIES: arrays[PROBABILITIES] * np.float16(0.5)})  # in [0, 1], sums to 0.5
    bad = {'dtype': (dict(arrays, **{PROBABILITIES: arrays[PROBABILITIES].astype(np.float32)}), PROBABILITIES, 'float16'),
           'shape': (dict(arrays, **{CONFIDENCE: arrays[CONFIDENCE][:2]}), CONFIDENCE, 'shape'),
           'nan': (nan, CONFIDENCE, 'outside'), 'range': (above, PROBABILITIES, 'outside'),
           'sum': (half, PROBABILITIES, 'sum to 1'), 'keys': (dict(arrays, extra=arrays[CONFIDENCE]), 'predictions', ''),
           'not an array': (dict(arrays, **{CONFIDENCE: [0.5]}), CONFIDENCE, 'not an array')}
    for why, (a, field, text) in bad.items():
        with pytest.raises(FederationError) as e:
            check_predictions(a, 3, 4, (5, 6, 7), 'B')
        assert (e.value.site, e.value.field) == ('B', field) and text in str(e.value), why
    empty = encode_predictions(np.zeros((0, 4, 5, 6, 7)), np.zeros((0, 1, 5, 6, 7)))
    with pytest.raises(FederationError, match='empty'):
        check_predictions(empty, 0, 4, (5, 6, 7), 'B')
