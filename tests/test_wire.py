"""Messages are plain JSON + numeric arrays; decoding never unpickles."""
import numpy as np
import pytest

from fednnunet.wire import Message, WireError, decode, encode, encoded_size


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
    tampered = data.replace(b'"<f4"', b'"|O1"') if b'"<f4"' in data else data.replace(b'<f4', b'|O')
    with pytest.raises((WireError, TypeError)):
        decode(tampered)
