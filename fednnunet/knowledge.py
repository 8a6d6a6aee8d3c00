"""Knowledge in place of weights: predictions on the server's public set as message arrays (issue 13).

Model-heterogeneous methods cannot average weights; what travels instead is, per public patch, the model's class
probabilities and its self-assessed confidence. They go as float16 arrays (half the bytes of float32; probabilities
need no more precision), under two fixed keys, never pickled (:mod:`fednnunet.wire`), and every receiver checks them
before use: the keys, the dtype, the shape it expects (the public patches it knows, the classes of the dataset), finite
values in [0, 1], and class probabilities that sum to 1 per voxel (within float16's rounding). A party whose
predictions fail a check is named and left out; it cannot poison the others with NaN, out-of-range or mis-shaped
values.
"""
from typing import Dict, Sequence, Tuple

import numpy as np

from fednnunet.errors import FederationError

PROBABILITIES = 'knowledge/probabilities'
CONFIDENCE = 'knowledge/confidence'
#: how far a float16 voxel's class probabilities may sum from 1 (rounding of C values of ~1e-3 each, with margin)
SUM_TOLERANCE = 2e-2


def encode_predictions(probabilities: np.ndarray, confidence: np.ndarray) -> Dict[str, np.ndarray]:
    """(N, C, *patch) class probabilities and (N, 1, *patch) confidences -> the message's arrays (float16)."""
    return {PROBABILITIES: np.asarray(probabilities, dtype=np.float16),
            CONFIDENCE: np.asarray(confidence, dtype=np.float16)}


def check_predictions(arrays: Dict[str, np.ndarray], num_patches: int, num_classes: int, patch_size: Sequence[int],
                      sender: str) -> Tuple[np.ndarray, np.ndarray]:
    """The sender's (probabilities, confidence) as float32, after every check; a FederationError naming the sender
    and the field otherwise."""
    if set(arrays) != {PROBABILITIES, CONFIDENCE}:
        raise FederationError(f'predictions must be exactly {sorted([PROBABILITIES, CONFIDENCE])}, not '
                              f'{sorted(arrays)[:5]}', site=sender, field='predictions')
    expected = {PROBABILITIES: (num_patches, num_classes, *patch_size), CONFIDENCE: (num_patches, 1, *patch_size)}
    out = {}
    for key, shape in expected.items():
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise FederationError(f'{key} is not an array', site=sender, field=key)
        if a.dtype != np.float16:
            raise FederationError(f'{key} is {a.dtype}, predictions travel as float16', site=sender, field=key)
        if tuple(a.shape) != tuple(int(s) for s in shape):
            raise FederationError(f'{key} has shape {tuple(a.shape)}, expected {tuple(shape)}', site=sender,
                                  field=key)
        if a.size == 0:
            raise FederationError(f'{key} is empty', site=sender, field=key)
        values = a.astype(np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise FederationError(f'{key} holds values outside [0, 1] (or NaN)', site=sender, field=key)
        out[key] = values
    sums = out[PROBABILITIES].sum(1)
    if np.abs(sums - 1).max() > SUM_TOLERANCE:
        raise FederationError(f'class probabilities do not sum to 1 per voxel (off by up to '
                              f'{float(np.abs(sums - 1).max()):.3g})', site=sender, field=PROBABILITIES)
    return out[PROBABILITIES], out[CONFIDENCE]


def prediction_bytes(num_patches: int, num_classes: int, patch_size: Sequence[int]) -> int:
    """Bytes of one party's predictions on ``num_patches`` public patches (probabilities + confidence, float16)."""
    return 2 * num_patches * (num_classes + 1) * int(np.prod(patch_size))
