"""The public patch bank: fixed crops of the server's labelled public set (sites.json ``server``) that every party of
a knowledge-exchanging method (HSSF) trains on and predicts on, so that predictions align patch for patch and voxel
for voxel whatever network each party runs.

The server draws the bank once per run from its public set's training split with nnU-Net's own data loader and its
validation transforms (no augmentation; nnU-Net's foreground oversampling), seeded by the run's seed, so the same run
draws the same bank after a resume. It travels to each site once, as two arrays: ``public/images`` (float32, the
preprocessed intensities) and ``public/labels`` (int16, nnU-Net's label values). A site checks both before use:
the keys, shapes (its patch size, its number of input channels), dtypes, finite intensities and labels the dataset
has.
"""
from typing import Dict, Sequence, Tuple

import numpy as np

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from fednnunet.errors import FederationError

IMAGES = 'public/images'
LABELS = 'public/labels'
KEYS = (IMAGES, LABELS)
#: the most patches a bank may hold (a bound on what a site accepts from the server)
MAX_PATCHES = 4096


def draw_public_patches(trainer, num_patches: int, seed: int) -> Dict[str, np.ndarray]:
    """``num_patches`` crops of the public set's training split. ``trainer``: the method's trainer at the public set
    (configured by the site worker; its data need not be loaded). The global numpy random state is restored."""
    if not 1 <= int(num_patches) <= MAX_PATCHES:
        raise FederationError(f'public_patches must be between 1 and {MAX_PATCHES}, not {num_patches}',
                              field='public_patches')
    training_cases, _ = trainer.do_split()
    if not training_cases:
        raise FederationError(f'the public set has no training case in fold {trainer.fold}: no patch to draw',
                              site=trainer.site_name, field='cases')
    lm = trainer.label_manager
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, training_cases)
    transforms = trainer.get_validation_transforms(None, False, lm.foreground_labels, None, lm.ignore_label)
    patch_size = trainer.configuration_manager.patch_size
    loader = nnUNetDataLoader(dataset, int(num_patches), patch_size, patch_size, lm,
                              oversample_foreground_percent=trainer.oversample_foreground_percent,
                              transforms=transforms)
    state = np.random.get_state()
    try:
        np.random.seed(int(seed) % 2 ** 32)
        batch = loader.generate_train_batch()
    finally:
        np.random.set_state(state)
    return {IMAGES: batch['data'].numpy().astype(np.float32),
            LABELS: batch['target'].numpy().astype(np.int16)}


def check_public_patches(arrays: Dict[str, np.ndarray], num_channels: int, patch_size: Sequence[int],
                         labels: Sequence[int], receiver: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a received bank, after every check; a FederationError naming the receiver and the field
    otherwise (the bank comes from the server, which a site does not trust blindly)."""
    images, seg = arrays.get(IMAGES), arrays.get(LABELS)
    if not isinstance(images, np.ndarray) or not isinstance(seg, np.ndarray):
        raise FederationError(f'a public patch bank needs both {IMAGES} and {LABELS}', site=receiver,
                              field='public patches')
    n = images.shape[0] if images.ndim else 0
    expected_images = (n, int(num_channels), *[int(s) for s in patch_size])
    if images.dtype != np.float32 or tuple(images.shape) != expected_images or not 1 <= n <= MAX_PATCHES:
        raise FederationError(f'{IMAGES} is {images.dtype} {tuple(images.shape)}; expected float32 of shape (N, '
                              f'{num_channels}, {", ".join(str(int(s)) for s in patch_size)}) with 1 <= N <= '
                              f'{MAX_PATCHES}', site=receiver, field=IMAGES)
    if seg.dtype != np.int16 or tuple(seg.shape) != (n, 1, *expected_images[2:]):
        raise FederationError(f'{LABELS} is {seg.dtype} {tuple(seg.shape)}; expected int16 of shape '
                              f'{(n, 1, *expected_images[2:])}', site=receiver, field=LABELS)
    if not np.isfinite(images).all():
        raise FederationError(f'{IMAGES} holds NaN or infinite values', site=receiver, field=IMAGES)
    unknown = sorted(set(np.unique(seg).tolist()) - set(int(x) for x in labels))
    if unknown:
        raise FederationError(f'{LABELS} holds labels {unknown[:5]} the dataset does not have', site=receiver,
                              field=LABELS)
    return images, seg


def bank_bytes(num_patches: int, num_channels: int, patch_size: Sequence[int]) -> int:
    """Bytes of a bank on the wire (float32 images, int16 labels)."""
    return int(num_patches) * int(np.prod(patch_size)) * (4 * int(num_channels) + 2)
