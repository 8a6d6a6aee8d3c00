"""Checks that an image file is complete before nnU-Net's readers see it.

SimpleITK (nnU-Net's default reader) silently fills the missing part of a truncated ``.nii``/``.nii.gz`` with
zeros: a half-copied scan would then change the shared fingerprint and the plans without any error. A gzip
stream must decompress to its end-of-stream marker, and a NIfTI file must hold as many bytes as its header
declares. Other formats are left to their readers.
"""
import gzip
import os
import zlib

import numpy as np

_CHUNK = 1 << 22


def _decompressed_size(path: str) -> int:
    total = 0
    try:
        with gzip.open(path, 'rb') as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    return total
                total += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f'is truncated or corrupt (gzip: {e})') from None


def check_complete(path: str):
    """Raises ValueError (what is wrong, without the path) if ``path`` is visibly incomplete."""
    size = _decompressed_size(path) if path.endswith('.gz') else None
    if path.endswith(('.nii', '.nii.gz')):
        import nibabel
        try:
            header = nibabel.load(path).header  # reads the header only
        except Exception as e:  # noqa: BLE001 - any reason the header is unreadable
            raise ValueError(f'has no readable NIfTI header ({type(e).__name__}: {e})') from None
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * \
            header.get_data_dtype().itemsize
        actual = size if size is not None else os.path.getsize(path)
        if actual < expected:
            raise ValueError(f'is truncated: it holds {actual} bytes, its NIfTI header declares {expected}')


def scalar_components(path: str):
    """The number of components per voxel of a file SimpleITK can read (2 for a two-channel vector image), or None
    if SimpleITK cannot read its header."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetNumberOfComponents()
