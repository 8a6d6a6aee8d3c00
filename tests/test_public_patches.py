"""The public patch bank a site receives from the server (fednnunet/public_patches.py): every malformed bank is refused
by name before any of it is used."""
import numpy as np
import pytest

from fednnunet.errors import FederationError
from fednnunet.public_patches import IMAGES, LABELS, MAX_PATCHES, bank_bytes, check_public_patches

PATCH = (4, 6, 5)


def _bank(n=3, channels=1):
    rng = np.random.default_rng(0)
    return {IMAGES: rng.normal(size=(n, channels, *PATCH)).astype(np.float32),
            LABELS: rng.integers(0, 3, size=(n, 1, *PATCH)).astype(np.int16)}


def _check(bank, channels=1):
    return check_public_patches(bank, channels, PATCH, [0, 1, 2], 'B')


def test_a_well_formed_bank_is_returned_as_sent():
    bank = _bank(channels=2)
    images, labels = _check(bank, channels=2)
    assert images is bank[IMAGES] and labels is bank[LABELS]
    assert bank_bytes(3, 2, PATCH) == images.nbytes + labels.nbytes


@pytest.mark.parametrize('change, field, says', [
    (lambda b: b.pop(LABELS), 'public patches', 'needs both'),
    (lambda b: b.update({IMAGES: b[IMAGES].astype(np.float64)}), IMAGES, 'float64'),
    (lambda b: b.update({IMAGES: b[IMAGES][:, :, :3]}), IMAGES, 'expected float32 of shape'),
    (lambda b: b.update({IMAGES: np.concatenate([b[IMAGES]] * 2, 1)}), IMAGES, 'expected float32 of shape'),
    (lambda b: b.update({LABELS: b[LABELS].astype(np.int64)}), LABELS, 'int64'),
    (lambda b: b.update({LABELS: b[LABELS][:2]}), LABELS, 'expected int16 of shape'),
    (lambda b: b[IMAGES].__setitem__((0, 0, 0, 0, 0), np.nan), IMAGES, 'NaN or infinite'),
    (lambda b: b[IMAGES].__setitem__((1, 0, 2, 2, 2), np.inf), IMAGES, 'NaN or infinite'),
    (lambda b: b[LABELS].__setitem__((2, 0, 1, 1, 1), 7), LABELS, 'labels [7]'),
    (lambda b: b[LABELS].__setitem__((2, 0, 1, 1, 1), -1), LABELS, 'labels [-1]'),
    (lambda b: b.update({IMAGES: np.float32(1.0)}), 'public patches', 'needs both'),
])
def test_a_malformed_bank_is_refused_naming_the_receiver_and_field(change, field, says):
    bank = _bank()
    change(bank)
    with pytest.raises(FederationError) as e:
        _check(bank)
    assert f"site 'B', field '{field}'" in str(e.value) and says in str(e.value), str(e.value)


def test_an_empty_or_oversized_bank_is_refused():
    with pytest.raises(FederationError, match='1 <= N'):
        _check(_bank(n=0))
    big = {IMAGES: np.zeros((MAX_PATCHES + 1, 1, 1, 1, 1), np.float32),
           LABELS: np.zeros((MAX_PATCHES + 1, 1, 1, 1, 1), np.int16)}
    with pytest.raises(FederationError, match='1 <= N'):
        check_public_patches(big, 1, (1, 1, 1), [0, 1], 'B')
