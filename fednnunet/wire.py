"""Messages between a site and the server: plain JSON + numpy arrays, never pickle.

A :class:`Message` is a kind (what is asked or answered), a JSON-able ``config`` and a flat dict of
numeric numpy ``arrays``. This maps one to one onto Flower's ConfigRecord and ArrayRecord, so the
Flower engine carries the same messages unchanged.

``encode``/``decode`` give a self-describing byte format::

    b'FEDNNUNET-WIRE1\\n' | uint64 little-endian header length | JSON header | array bytes

The header lists every array's name, dtype, shape, offset and length; ``decode`` checks all of them
and refuses object dtypes, so nothing is ever unpickled.
"""
import json
import struct
from dataclasses import dataclass, field
from typing import Dict

import numpy as np

MAGIC = b'FEDNNUNET-WIRE1\n'
_ALLOWED_KINDS = set('biuf')  # bool, signed/unsigned int, float


class WireError(ValueError):
    pass


@dataclass
class Message:
    kind: str
    config: dict = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def _check_config(obj, path='config'):
    """The config must survive JSON unchanged: str keys, no NaN-free guarantees needed, no objects."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WireError(f'{path}: key {k!r} is not a string')
            _check_config(v, f'{path}.{k}')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_config(v, f'{path}[{i}]')
    elif obj is None or isinstance(obj, (str, bool, int, float)):
        return
    else:
        raise WireError(f'{path}: {type(obj).__name__} is not plain JSON data (use arrays for numbers in bulk)')


def checked_arrays(message: Message) -> Dict[str, np.ndarray]:
    """The message's arrays, C-ordered, after checking names and dtypes; raises WireError. The config is checked
    too. Every carrier (this byte format, Flower's records) sends what this returns."""
    _check_config(message.config)
    arrays = {}
    for name, array in message.arrays.items():
        if not isinstance(name, str):
            raise WireError(f'array name {name!r} is not a string')
        a = np.asarray(array, order='C')  # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        if a.dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f'array {name!r} has dtype {a.dtype}; only numeric arrays travel')
        arrays[name] = a
    return arrays


def _header(message: Message, arrays: Dict[str, np.ndarray]) -> bytes:
    entries, offset = [], 0
    for name, a in arrays.items():
        entries.append({'name': name, 'dtype': a.dtype.str, 'shape': list(a.shape), 'offset': offset,
                        'nbytes': int(a.nbytes)})
        offset += int(a.nbytes)
    return json.dumps({'kind': message.kind, 'config': message.config, 'arrays': entries}, allow_nan=True).encode()


def encode(message: Message) -> bytes:
    arrays = checked_arrays(message)
    header = _header(message, arrays)
    return b''.join([MAGIC, struct.pack('<Q', len(header)), header] + [a.tobytes() for a in arrays.values()])


def encoded_size(message: Message) -> int:
    """``len(encode(message))``, without building it."""
    arrays = checked_arrays(message)
    return len(MAGIC) + 8 + len(_header(message, arrays)) + sum(int(a.nbytes) for a in arrays.values())


def decode(data: bytes) -> Message:
    if not data.startswith(MAGIC):
        raise WireError('not a fednnunet message (bad magic)')
    start = len(MAGIC)
    if len(data) < start + 8:
        raise WireError('truncated message header')
    (hlen,) = struct.unpack('<Q', data[start:start + 8])
    body_start = start + 8 + hlen
    if len(data) < body_start:
        raise WireError('truncated message header')
    try:
        header = json.loads(data[start + 8:body_start])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError(f'corrupt message header: {e}') from None
    body = memoryview(data)[body_start:]
    try:
        kind, config, entries = header['kind'], header['config'], list(header['arrays'])
        if not isinstance(kind, str) or not isinstance(config, dict):
            raise TypeError('kind must be a string and config an object')
        _check_config(config)
        arrays = {}
        for e in entries:
            name = e['name']
            if not isinstance(name, str):
                raise TypeError(f'array name {name!r} is not a string')
            dtype = np.dtype(str(e['dtype']))
            if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
                raise WireError(f'array {name!r} has dtype {dtype}; refused')
            shape = tuple(int(s) for s in e['shape'])
            offset, nbytes = int(e['offset']), int(e['nbytes'])
            if any(s < 0 for s in shape):
                raise WireError(f'array {name!r}: negative shape {shape}')
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes != expected or offset < 0 or offset + nbytes > len(body):
                raise WireError(f'array {name!r}: size or offset does not match its shape')
            arrays[name] = np.frombuffer(body[offset:offset + nbytes], dtype=dtype).reshape(shape)
    except WireError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a header that is not what encode() writes
        raise WireError(f'malformed message header ({type(e).__name__}: {e})') from None
    return Message(kind=kind, config=config, arrays=arrays)


def roundtrip(message: Message) -> Message:
    """What the receiving side sees: used by the simulation engine so that in-process runs carry exactly
    what a network would."""
    return decode(encode(message))
