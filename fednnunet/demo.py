"""A deterministic multi-site demo federation built from real anatomy.

Anatomy: the MNI ICBM152 2009a (nonlinear, symmetric: files ``*_nlin_sym_09a_*``) T1 template and its grey- and white-matter
probability maps, which nilearn ships inside its wheel (``nilearn/datasets/data/``); loading them
needs no network. The T1 template is skull-stripped: zero outside the brain.

Subjects: every case is the template pulled through its own random smooth transform (a small
affine: rotation, scale, translation; plus a smooth displacement field of a few mm), the same
transform for T1, grey matter, white matter and the brain mask, so image and label always agree.
Label per voxel: 0 outside the brain, else the argmax over (CSF/other = 1-gm-wm, gm, wm).

With a lesion (``lesion=True``, the second demo dataset ``Dataset503_FedBrainLesionDemo``): every subject also
has one small T1-hypointense white-matter lesion, a sphere of 6-9 mm radius somewhere in the deep white matter
of either hemisphere (label 3, about 0.03-0.25 % of the brain voxels at size 64): the small class that a
federated method can fail to learn while the large tissue classes look fine. It is drawn from its own random
stream, so the tissue, the transform and the scanner of every case are the same as without it.

Semi-supervised (``labelled_per_site=N``, ``Dataset504_FedBrainSemiDemo``): the same cases, but at every site only
the first N keep their labels; the others are listed as the site's ``unlabelled`` cases, with their images in
``imagesTrUnlabelled/`` and no label anywhere in the dataset.

With a public set at the server (``public_set=PUBLIC_SCANNER``, ``Dataset505_FedBrainPublicSetDemo``): every site
keeps its last ``validation_per_site`` cases as labelled cases held out for validation only (sites.json
``validation``: they measure, nothing trains on them); only the first site keeps ``few_labels`` labelled training
cases; every other case is unlabelled, so the other sites have no training label at all. The server holds a
labelled public set from a scanner of its own (sites.json ``server``), and every participant declares the network it
trains in model-heterogeneous methods (``network``: the small sites nnU-Net's plain U-Net, the larger ones a
residual-encoder U-Net, the server the wide one).

Sites: each site samples its subjects on its own voxel grid (spacing, slice thickness: the image is
the partial-volume average over the voxel) and adds its scanner's signature: gamma, a smooth
multiplicative bias field, Rician noise and an intensity scale. Outside the brain the image is
exactly 0, as for any skull-stripped scan, so nnU-Net's crop-to-nonzero has something to crop.

Determinism: case ``i`` of site ``s`` draws its randomness from ``(seed, s, i)`` only (anatomy and
scanner from separate streams), so the same seed gives byte-identical arrays, and adding, removing
or reconfiguring one site leaves every other site's cases unchanged.

See documentation/demo_federation.md.
"""
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

DEMO_DATASET_ID = 501
DEMO_DATASET_NAME = 'FedBrainDemo'
LABELS = {'background': 0, 'grey_matter': 1, 'white_matter': 2}
CHANNEL_NAMES = {'0': 'T1'}
LESION_DATASET_ID = 503  # 502 is the annotation-shift benchmark's copy of 501
LESION_DATASET_NAME = 'FedBrainLesionDemo'
LESION_LABEL = 3
SEMI_SUPERVISED_DATASET_ID = 504
SEMI_SUPERVISED_DATASET_NAME = 'FedBrainSemiDemo'
PUBLIC_SET_DATASET_ID = 505
PUBLIC_SET_DATASET_NAME = 'FedBrainPublicSetDemo'
FILE_ENDING = '.nii.gz'
TEMPLATE_REFERENCE = ('Fonov et al., NeuroImage 54(1) 2011; Fonov et al., NeuroImage 47 S102 2009 (MNI ICBM152 '
                      '2009a, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal '
                      'Neurological Institute, McGill University)')

# Field of view shared by all sites, in MNI (RAS) mm: the template brain's bounding box
# (x -72..72, y -107..73, z -72..82) with a margin for the deformations. The template itself ends at
# z = -72 (its brain stem is cut there), so the demo brains have a flat inferior cut too.
FOV_LO = np.array([-84.0, -121.0, -92.0])
FOV_HI = np.array([84.0, 87.0, 96.0])
FOV_CENTER = (FOV_LO + FOV_HI) / 2

# Anatomical variability between subjects.
ROTATION_DEG = 5.0          # uniform in +-this, about each axis
SCALE_RANGE = 0.05          # global scale uniform in 1 +- this
AXIS_SCALE_RANGE = 0.02     # and per axis another 1 +- this
TRANSLATION_MM = 3.0        # uniform in +-this, per axis
WARP_CONTROL_MM = 32.0      # control point spacing of the displacement field
WARP_STD_MM = 3.0           # std of the control point displacements (per component)
TISSUE_CONTRAST_STD = 0.02  # per-subject jitter of grey/white matter T1 intensity (template units 0..1)
BIAS_CONTROL_POINTS = 4     # bias field: cubic spline through 4x4x4 random values over the FOV
# The lesion: a sphere in template (MNI) space, so it follows the subject's deformation with the anatomy.
LESION_RADIUS_MM = (6.0, 9.0)                # uniform
LESION_BOX_LO = np.array([18.0, -35.0, 12.0])  # deep white matter (centrum semiovale), |x| in the box, either side
LESION_BOX_HI = np.array([32.0, 15.0, 32.0])
LESION_MIN_WM = 0.8         # the centre lies where the template's white-matter probability is at least this
LESION_CONTRAST = 0.5       # T1 inside the lesion is (1 - this) x the tissue's
LESION_STREAM = 3           # its random stream: (seed, site, case, this)


@dataclass(frozen=True)
class SiteScanner:
    """How one site's scanner differs from the others.

    ``spacing`` is the voxel spacing in x, y, z (world order) *relative to the base grid*: the base
    grid spans the field of view with ``size`` voxels along its longest axis (y), so its spacing is
    ``base_spacing_mm(size)`` (3.25 mm for size 64). ``(1, 1, 3)`` is a site with 3x thicker slices
    along z. See :func:`site_spacing_mm` / :func:`site_shape` for the actual grid of a site.

    Intensity model, inside the brain (outside it the image is 0): ``intensity_scale * Rician(
    bias * t1 ** gamma, noise_std * mean)`` where t1 is the subject's template intensity (0..1),
    bias is ``exp(bias_strength * f)`` for a smooth random field f with max |f| = 1 (so
    bias_strength is the largest log gain), and the Rician noise has std ``noise_std`` times the
    mean brain signal.
    """
    name: str
    n_cases: int
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity_scale: float = 1000.0
    gamma: float = 1.0
    bias_strength: float = 0.0
    noise_std: float = 0.02
    description: str = ''

    def __post_init__(self):
        if not re.match(r'^[A-Za-z0-9][A-Za-z0-9.-]*$', self.name):
            raise ValueError(f'site name {self.name!r}: use letters, digits, . or - (no underscore: case ids '
                             f'are <site>_<index>)')
        if int(self.n_cases) < 1:
            raise ValueError(f'site {self.name!r}: n_cases must be >= 1')
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f'site {self.name!r}: spacing must be 3 positive factors (x, y, z)')
        if self.intensity_scale <= 0 or self.gamma <= 0 or self.bias_strength < 0 or self.noise_std < 0:
            raise ValueError(f'site {self.name!r}: need intensity_scale > 0, gamma > 0, bias_strength >= 0, '
                             f'noise_std >= 0')

    def case_ids(self) -> Tuple[str, ...]:
        return tuple(f'{self.name}_{i:03d}' for i in range(self.n_cases))


DEFAULT_SITES: Tuple[SiteScanner, ...] = (
    SiteScanner('A', 10, (1.0, 1.0, 1.0), intensity_scale=1000.0, gamma=1.0, bias_strength=0.05, noise_std=0.02,
                description='large reference site: isotropic, clean'),
    SiteScanner('B', 8, (1.0, 1.0, 3.0), intensity_scale=800.0, gamma=0.9, bias_strength=0.1, noise_std=0.03,
                description='thick axial slices (3x along z)'),
    SiteScanner('C', 4, (1.2, 1.2, 1.2), intensity_scale=1500.0, gamma=1.6, bias_strength=0.4, noise_std=0.03,
                description='small, strong bias field and gamma'),
    SiteScanner('D', 3, (1.0, 1.0, 1.5), intensity_scale=250.0, gamma=0.75, bias_strength=0.15, noise_std=0.08,
                description='small, other intensity scale, noisy'),
)

#: the server's public set in the public-set demo: another scanner than any site's
PUBLIC_SCANNER = SiteScanner('P', 8, (1.0, 1.0, 1.2), intensity_scale=600.0, gamma=1.25, bias_strength=0.2,
                             noise_std=0.04, description="the server's public set: a scanner of its own")
TEST_PUBLIC_SCANNER = dataclasses.replace(PUBLIC_SCANNER, n_cases=3)
#: the networks the public-set demo's participants declare: (first site, sites with more cases, small sites, server)
PUBLIC_SET_NETWORKS = {'few_labels': 'plain', 'large': 'resenc', 'small': 'plain', 'server': 'resenc_wide'}
PUBLIC_SET_LARGE_SITE = 6  # cases from which a site counts as large (a residual-encoder U-Net)


TEST_SITES: Tuple[SiteScanner, ...] = (
    SiteScanner('A', 3, (1.0, 1.0, 1.0), intensity_scale=1000.0, gamma=1.0, bias_strength=0.05, noise_std=0.02,
                description='isotropic, clean'),
    SiteScanner('B', 2, (1.0, 1.0, 2.0), intensity_scale=800.0, gamma=0.9, bias_strength=0.1, noise_std=0.03,
                description='thick slices (2x along z)'),
    SiteScanner('C', 2, (1.2, 1.2, 1.2), intensity_scale=300.0, gamma=1.5, bias_strength=0.35, noise_std=0.06,
                description='strong bias, gamma, noise'),
)


# ----------------------------------------------------------------------------------------- grids

def base_spacing_mm(size: int) -> float:
    """Isotropic spacing of the base grid: ``size`` voxels along the field of view's longest axis."""
    if int(size) < 8:
        raise ValueError(f'size must be >= 8 (got {size})')
    return float((FOV_HI - FOV_LO).max() / int(size))


def site_spacing_mm(site: SiteScanner, size: int) -> Tuple[float, float, float]:
    """The site's voxel spacing in mm, x, y, z (what the NIfTI header says)."""
    base = base_spacing_mm(size)
    return tuple(float(base * f) for f in site.spacing)


def site_shape(site: SiteScanner, size: int) -> Tuple[int, int, int]:
    """The site's image shape in x, y, z voxel order (SimpleITK / nnU-Net arrays are z, y, x).

    Enough voxels to cover the field of view, centred on it."""
    spacing = site_spacing_mm(site, size)
    return tuple(max(1, int(np.ceil(float(e) / s - 1e-6))) for e, s in zip(FOV_HI - FOV_LO, spacing))


def _grid_origin(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """World (RAS mm) position of voxel (0, 0, 0): the grid is centred in the field of view."""
    return FOV_CENTER - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)


def _fwhm_sigma(target_mm: float, have_mm: float) -> float:
    """Gaussian sigma (mm) taking a resolution of ``have_mm`` to a voxel of ``target_mm`` (FWHM = voxel)."""
    return float(np.sqrt(max(target_mm ** 2 - have_mm ** 2, 0.0)) / 2.3548)


# ------------------------------------------------------------------------------------- template

@functools.lru_cache(maxsize=4)
def _template(work_spacing: float):
    """T1, GM, WM and brain mask (float32, 0..1) over the field of view on an isotropic working grid.

    Loaded from the files inside nilearn's wheel at their native 1 mm (``resolution=None``: no
    resampling by nilearn, no download), then smoothed and resampled to ``work_spacing``."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template
    imgs = [load_mni152_template(), load_mni152_gm_template(), load_mni152_wm_template()]
    affine = imgs[0].affine
    for img in imgs[1:]:
        if img.shape != imgs[0].shape or not np.allclose(img.affine, affine):
            raise RuntimeError('nilearn MNI152 T1 / GM / WM templates do not share one grid')
    maps = [np.asarray(img.dataobj, dtype=np.float32) for img in imgs]
    maps.append((maps[0] > 0).astype(np.float32))  # the T1 template is skull-stripped: brain = nonzero
    native = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = tuple(int(np.ceil(e / work_spacing)) + 1 for e in FOV_HI - FOV_LO)
    origin = FOV_CENTER - (np.asarray(shape) - 1) / 2 * work_spacing
    axes = [origin[a] + work_spacing * np.arange(shape[a]) for a in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing='ij')).reshape(3, -1)
    inv = np.linalg.inv(affine)
    vox = (inv[:3, :3] @ world + inv[:3, 3:4]).reshape((3,) + shape)
    out = []
    for m in maps:
        sigma = [_fwhm_sigma(work_spacing, n) / n for n in native]
        if max(sigma) > 0.1:
            m = ndimage.gaussian_filter(m, sigma, mode='constant', truncate=3.0)
        out.append(ndimage.map_coordinates(m, vox, order=1, mode='constant', cval=0.0).astype(np.float32))
    return tuple(out), origin


def _work_spacing(size: int) -> float:
    """Working resolution: half the base spacing (enough to anti-alias), never finer than the 1 mm template."""
    return round(max(1.0, base_spacing_mm(size) / 2), 4)


def _site_maps(size: int, spacing_mm: Sequence[float]):
    """Template maps pre-blurred to the site's voxel size (slice profile / partial volume)."""
    w = _work_spacing(size)
    maps, origin = _template(w)
    sigma = [_fwhm_sigma(s, w) / w for s in spacing_mm]
    if max(sigma) > 0.1:
        maps = tuple(ndimage.gaussian_filter(m, sigma, mode='constant', truncate=3.0) for m in maps)
    return maps, origin, w


# ---------------------------------------------------------------------------------- randomness

def _case_entropy(seed: int, site_name: str, index: int) -> list:
    """What all of a case's randomness derives from: (seed, site, case index) only."""
    return [int(seed), zlib.crc32(site_name.encode('utf-8')), int(index)]


def _case_rngs(seed: int, site_name: str, index: int):
    """Independent generators for (anatomy, scanner) from (seed, site, case index) only."""
    children = np.random.SeedSequence(_case_entropy(seed, site_name, index)).spawn(2)
    return np.random.default_rng(children[0]), np.random.default_rng(children[1])


def _lesion_rng(seed: int, site_name: str, index: int) -> np.random.Generator:
    """The lesion's own generator: drawing it leaves the anatomy and scanner streams untouched."""
    return np.random.default_rng(np.random.SeedSequence(_case_entropy(seed, site_name, index) + [LESION_STREAM]))


def _draw_lesion(rng: np.random.Generator, maps, work_origin: np.ndarray, w: float,
                 radius_mm: Tuple[float, float] = LESION_RADIUS_MM):
    """(centre in template mm, radius mm): a centre in the deep white-matter box (left or right hemisphere) where
    the (site-blurred) template is white matter; rejection sampling, at most 1000 tries."""
    wm = maps[2]
    for _ in range(1000):
        centre = rng.uniform(LESION_BOX_LO, LESION_BOX_HI)
        if rng.random() < 0.5:
            centre[0] = -centre[0]
        vox = (centre - work_origin) / w
        if ndimage.map_coordinates(wm, vox[:, None], order=1)[0] >= LESION_MIN_WM:
            return centre, float(rng.uniform(*radius_mm))
    raise RuntimeError('no white-matter point found in the lesion box')  # the template has plenty: never here


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _control_grid_field(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Cubic spline through ``values`` (a regular control grid spanning the FOV) at world ``points`` (3, N)."""
    n = np.asarray(values.shape[-3:])
    idx = (points - FOV_LO[:, None]) / (FOV_HI - FOV_LO)[:, None] * (n - 1)[:, None]
    if values.ndim == 3:
        return ndimage.map_coordinates(values, idx, order=3, mode='nearest')
    return np.stack([ndimage.map_coordinates(v, idx, order=3, mode='nearest') for v in values])


def _subject_transform(rng: np.random.Generator):
    """The subject's anatomy: a map from subject world mm to template world mm, plus tissue contrast.

    Drawn in a fixed order from the anatomy generator and independent of the site's grid, so a
    subject is the same anatomy at any size or spacing."""
    angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
    scale = rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE) * rng.uniform(1 - AXIS_SCALE_RANGE, 1 + AXIS_SCALE_RANGE, 3)
    shift = rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3)
    n_ctrl = tuple(int(np.ceil(e / WARP_CONTROL_MM)) + 1 for e in FOV_HI - FOV_LO)
    warp = rng.normal(0.0, WARP_STD_MM, (3,) + n_ctrl)
    contrast = rng.normal(0.0, TISSUE_CONTRAST_STD, 2)
    # subject -> template: inverse of "scale, then rotate" about the FOV centre
    matrix = np.diag(1.0 / scale) @ _rotation(angles).T

    def to_template(points: np.ndarray) -> np.ndarray:
        centred = points - FOV_CENTER[:, None]
        return matrix @ centred + FOV_CENTER[:, None] - shift[:, None] + _control_grid_field(warp, points)

    return to_template, contrast


# ----------------------------------------------------------------------------------------- cases

@dataclass
class _Subject:
    """A case's anatomy on its site's grid, before any scanner: the template maps pulled through the subject's
    transform, and the generators of the rest of its randomness."""
    spacing: Tuple[float, float, float]
    shape: Tuple[int, int, int]
    points: np.ndarray           # the grid's world positions (3, N)
    template_points: np.ndarray  # where they come from in the template (3, N)
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray             # inside the brain
    contrast: np.ndarray         # the subject's grey/white matter jitter
    rng_scanner: np.random.Generator
    maps: tuple                  # (template maps, their origin, working spacing), for the lesion's draw


def _subject(site: SiteScanner, index: int, size: int, seed: int, _maps=None) -> _Subject:
    spacing = site_spacing_mm(site, size)
    shape = site_shape(site, size)
    maps = _maps if _maps is not None else _site_maps(size, spacing)
    template_maps, work_origin, w = maps
    rng_anatomy, rng_scanner = _case_rngs(seed, site.name, index)
    to_template, contrast = _subject_transform(rng_anatomy)

    origin = _grid_origin(spacing, shape)
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing='ij')).reshape(3, -1)
    template_points = to_template(points)
    vox = (template_points - work_origin[:, None]) / w
    t1, gm, wm, brain = (ndimage.map_coordinates(m, vox, order=1, mode='constant', cval=0.0).reshape(shape)
                         for m in template_maps)
    return _Subject(spacing, shape, points, template_points, t1, gm, wm, brain > 0.5, contrast, rng_scanner, maps)


def _tissue_label(subject: _Subject) -> np.ndarray:
    """0 outside the brain, else the argmax over (CSF/other, grey matter, white matter)."""
    tissue = np.stack([1.0 - subject.gm - subject.wm, subject.gm, subject.wm])
    return np.where(subject.mask, np.argmax(tissue, axis=0), 0).astype(np.uint8)


def _lesion_share(subject: _Subject, rng: np.random.Generator, radius_mm: Tuple[float, float] = LESION_RADIUS_MM
                  ) -> np.ndarray:
    """The share of each voxel inside a lesion drawn from ``rng`` (partial volume: linear over one voxel's mean
    extent), 0 outside the brain."""
    maps, work_origin, w = subject.maps
    centre, radius = _draw_lesion(rng, maps, work_origin, w, radius_mm)
    distance = np.linalg.norm(subject.template_points - centre[:, None], axis=0).reshape(subject.shape)
    return np.clip((radius - distance) / float(np.mean(subject.spacing)) + 0.5, 0.0, 1.0) * subject.mask


def _check_labels(label: np.ndarray, needed: set, case: str, size: int):
    present = set(np.unique(label).tolist())
    if not needed <= present:
        raise RuntimeError(f'case {case} at size {size} has labels {sorted(present)}; '
                           f'{sorted(needed)} must all be present: use a larger size')


def _scan(signal: np.ndarray, subject: _Subject, gamma: float, bias_strength: float, noise_std: float,
          intensity_scale: float) -> np.ndarray:
    """A scanner's image of ``signal`` (template units): gamma, a smooth bias field, Rician noise and an intensity
    scale, drawn from the subject's scanner stream; exactly 0 outside the brain."""
    signal = np.clip(signal, 0.0, None) ** gamma
    bias_values = subject.rng_scanner.normal(0.0, 1.0, (BIAS_CONTROL_POINTS,) * 3)
    field = _control_grid_field(bias_values, subject.points).reshape(subject.shape)
    field /= max(float(np.abs(field).max()), 1e-6)
    signal = signal * np.exp(bias_strength * field)
    sigma = noise_std * float(signal[subject.mask].mean())
    noise = subject.rng_scanner.normal(0.0, sigma, (2,) + subject.shape)
    signal = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
    return np.where(subject.mask, signal * intensity_scale, 0.0).astype(np.float32)


def generate_case(site: SiteScanner, index: int, size: int = 64, seed: int = 0, _maps=None, lesion: bool = False):
    """One case of one site, in memory.

    Returns ``(image, label, spacing_mm)``: image float32 and label uint8, both indexed x, y, z
    (world axes, RAS), spacing in mm x, y, z. ``lesion``: with the white-matter lesion (label 3, see the module's
    text); everything else of the case is unchanged."""
    subject = _subject(site, index, size, seed, _maps)
    label = _tissue_label(subject)
    t1 = subject.t1
    needed = {1, 2}
    if lesion:
        inside = _lesion_share(subject, _lesion_rng(seed, site.name, index))
        t1 = t1 * (1.0 - LESION_CONTRAST * inside)
        label[inside >= 0.5] = LESION_LABEL
        needed.add(LESION_LABEL)
    _check_labels(label, needed, f'{site.name}_{index:03d}', size)
    signal = t1 + subject.contrast[0] * subject.gm + subject.contrast[1] * subject.wm
    image = _scan(signal, subject, site.gamma, site.bias_strength, site.noise_std, site.intensity_scale)
    return image, label, subject.spacing


def _write_nifti(array_xyz: np.ndarray, spacing: Sequence[float], origin_ras: np.ndarray, path: str):
    """Writes an x, y, z (RAS) array with SimpleITK (LPS world: x and y flip sign)."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin((-float(origin_ras[0]), -float(origin_ras[1]), float(origin_ras[2])))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, path, useCompression=True)


# ----------------------------------------------------------------------------------------- build

def dataset_folder_name(dataset_id: int = DEMO_DATASET_ID, name: str = DEMO_DATASET_NAME) -> str:
    return f'Dataset{int(dataset_id):03d}_{name}'


def _check_sites(sites: Iterable[SiteScanner]) -> Tuple[SiteScanner, ...]:
    sites = tuple(sites)
    if not sites:
        raise ValueError('need at least one site')
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f'site names must be unique, got {names}')
    return sites


def build_demo_federation(dataset_id: int = DEMO_DATASET_ID, name: str = DEMO_DATASET_NAME,
                          raw_root: Optional[str] = None, size: int = 64, seed: int = 0,
                          sites: Sequence[SiteScanner] = DEFAULT_SITES, overwrite: bool = False,
                          verbose: bool = True, only_site: Optional[str] = None, lesion: bool = False,
                          labelled_per_site: Optional[int] = None, public_set: Optional[SiteScanner] = None,
                          few_labels: int = 2, validation_per_site: int = 2) -> str:
    """Writes ``<raw_root or $nnUNet_raw>/Dataset{id:03d}_{name}/`` with dataset.json, imagesTr/,
    labelsTr/ and sites.json. Returns the folder.

    ``only_site``: one hospital's own raw folder, as on its own machine in a real federation (its cases and a
    sites.json that lists only itself; the federation's dataset.json): the same cases as in the whole demo.
    ``lesion``: every case also has a small white-matter lesion (label 3; see the module's text).
    ``labelled_per_site``: at every site only the first this many cases keep their labels; the others become the
    site's unlabelled cases (images in imagesTrUnlabelled/, no label written).
    ``public_set``: the public-set demo (see the module's text): the server holds this scanner's cases, labelled;
    every site's last ``validation_per_site`` cases are labelled validation-only cases, the first site keeps
    ``few_labels`` labelled training cases, every other case is unlabelled.

    The folder is built under a hidden temporary sibling and renamed into place at the end, so an
    interrupted build never leaves a folder that looks complete. An existing folder raises
    FileExistsError unless ``overwrite=True``, which replaces it."""
    from fednnunet.federation import UNLABELLED_IMAGES_FOLDER, write_sites_json

    sites = _check_sites(sites)
    if labelled_per_site is not None and labelled_per_site < 1:
        raise ValueError(f'labelled_per_site must be at least 1 (every site needs a labelled case), not '
                         f'{labelled_per_site}')
    if public_set is not None:
        _check_public_set_layout(sites, public_set, labelled_per_site, few_labels, validation_per_site)
    if only_site is not None and only_site not in [s.name for s in sites]:
        raise ValueError(f"site {only_site!r} is not one of the demo's sites {[s.name for s in sites]}")
    target = prepare_target(dataset_id, name, raw_root, overwrite)
    t_start = time.perf_counter()
    with building(target, overwrite) as tmp:
        images_dir = os.path.join(tmp, 'imagesTr')
        labels_dir = os.path.join(tmp, 'labelsTr')
        unlabelled_dir = os.path.join(tmp, UNLABELLED_IMAGES_FOLDER)
        os.makedirs(images_dir)
        os.makedirs(labels_dir)
        if labelled_per_site is not None or public_set is not None:
            os.makedirs(unlabelled_dir)
        entries = {site.name: _site_entry(site, site is sites[0], labelled_per_site, public_set, few_labels,
                                          validation_per_site) for site in sites}  # every site's, for dataset.json
        assignment = {n: e for n, e in entries.items() if only_site in (None, n)}  # this folder's sites.json
        t0 = time.perf_counter()
        _template(_work_spacing(size))
        if verbose:
            print(f'[demo] MNI152 template at {_work_spacing(size)} mm working resolution, '
                  f'{time.perf_counter() - t0:.1f} s', flush=True)
        for site in sites:
            if only_site is not None and site.name != only_site:
                continue
            t0 = time.perf_counter()
            spacing = site_spacing_mm(site, size)
            shape = site_shape(site, size)
            maps = _site_maps(size, spacing)
            origin = _grid_origin(spacing, shape)
            cases = list(site.case_ids())
            entry = entries[site.name]
            labelled = set(entry['cases']) | set(entry.get('validation', ()))
            for i, case in enumerate(cases):
                image, label, _ = generate_case(site, i, size, seed, _maps=maps, lesion=lesion)
                if case in labelled:
                    _write_nifti(image, spacing, origin, os.path.join(images_dir, f'{case}_0000{FILE_ENDING}'))
                    _write_nifti(label, spacing, origin, os.path.join(labels_dir, f'{case}{FILE_ENDING}'))
                else:
                    _write_nifti(image, spacing, origin, os.path.join(unlabelled_dir, f'{case}_0000{FILE_ENDING}'))
            if verbose:
                print(f'[demo] site {site.name}: {site.n_cases} cases, shape {shape} (x,y,z), spacing '
                      f'{tuple(round(s, 3) for s in spacing)} mm, {time.perf_counter() - t0:.1f} s', flush=True)
        server = None
        if public_set is not None and only_site is None:
            t0 = time.perf_counter()
            spacing = site_spacing_mm(public_set, size)
            maps = _site_maps(size, spacing)
            origin = _grid_origin(spacing, site_shape(public_set, size))
            for i, case in enumerate(public_set.case_ids()):
                image, label, _ = generate_case(public_set, i, size, seed, _maps=maps, lesion=lesion)
                _write_nifti(image, spacing, origin, os.path.join(images_dir, f'{case}_0000{FILE_ENDING}'))
                _write_nifti(label, spacing, origin, os.path.join(labels_dir, f'{case}{FILE_ENDING}'))
            server = {'cases': list(public_set.case_ids()), 'network': PUBLIC_SET_NETWORKS['server']}
            if verbose:
                print(f"[demo] the server's public set (scanner {public_set.name}): {public_set.n_cases} labelled "
                      f"cases, {time.perf_counter() - t0:.1f} s", flush=True)
        n_cases = sum(s.n_cases for s in sites if only_site in (None, s.name)) + (
            public_set.n_cases if server else 0)
        semi = f', {labelled_per_site} labelled cases per site, the rest unlabelled' if labelled_per_site else ''
        if public_set is not None:
            semi = (f', only site {sites[0].name} with {few_labels} labelled training cases, {validation_per_site} '
                    f'labelled validation-only cases per site, the rest unlabelled, a labelled public set of '
                    f'{public_set.n_cases} cases at the server')
        dataset_json = {
            'channel_names': dict(CHANNEL_NAMES),
            'labels': dict(LABELS, lesion=LESION_LABEL) if lesion else dict(LABELS),
            # the federation's labelled cases, the same at every site
            'numTraining': sum(len(e['cases']) + len(e.get('validation', ())) for e in entries.values()) + (
                public_set.n_cases if public_set is not None else 0),
            'file_ending': FILE_ENDING,
            'name': name,
            'description': (f'fednnunet demo federation: brain tissue segmentation'
                            f'{" with one small white-matter lesion per subject" if lesion else ""}'
                            f'{semi}, '
                            f'{len(sites)} sites '
                            f'({", ".join(f"{s.name}: {s.n_cases}" for s in sites)} cases), synthetic subjects '
                            f'from random deformations of the MNI ICBM152 2009a T1 template and its GM/WM '
                            f'probability maps (as shipped with nilearn), size={size}, seed={seed}.'),
            'reference': TEMPLATE_REFERENCE,
        }
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(dataset_json, f, indent=2)
        write_sites_json(tmp, assignment, server)
    if verbose:
        print(f'[demo] wrote {target} ({n_cases} cases, {time.perf_counter() - t_start:.1f} s)', flush=True)
    return target


def _check_public_set_layout(sites: Tuple[SiteScanner, ...], public_set: SiteScanner, labelled_per_site,
                             few_labels: int, validation_per_site: int):
    if labelled_per_site is not None:
        raise ValueError('labelled_per_site and public_set are two different demos; choose one')
    if public_set.name in [s.name for s in sites]:
        raise ValueError(f"the public set's scanner {public_set.name!r} is also a site's name")
    if few_labels < 1 or validation_per_site < 1:
        raise ValueError(f'few_labels and validation_per_site must be at least 1 (got {few_labels}, '
                         f'{validation_per_site})')
    for i, site in enumerate(sites):
        need = validation_per_site + 1 + (few_labels if i == 0 else 0)
        if site.n_cases < need:
            raise ValueError(f'site {site.name!r}: {site.n_cases} cases, the public-set demo needs {need} '
                             f'({validation_per_site} for validation, {few_labels if i == 0 else 0} labelled, '
                             f'at least one unlabelled)')


def _site_entry(site: SiteScanner, first: bool, labelled_per_site: Optional[int], public_set: Optional[SiteScanner],
                few_labels: int, validation_per_site: int) -> dict:
    """The site's sites.json entry."""
    if public_set is not None:
        return _public_set_entry(site, first, few_labels, validation_per_site)
    cases = list(site.case_ids())
    keep = len(cases) if labelled_per_site is None else labelled_per_site
    entry = {'cases': cases[:keep]}
    if cases[keep:]:
        entry['unlabelled'] = cases[keep:]
    return entry


def _public_set_entry(site: SiteScanner, first: bool, few_labels: int, validation_per_site: int) -> dict:
    """The site's sites.json entry in the public-set demo."""
    cases = list(site.case_ids())
    labelled = few_labels if first else 0
    split = len(cases) - validation_per_site
    network = PUBLIC_SET_NETWORKS['few_labels'] if first else PUBLIC_SET_NETWORKS[
        'large' if site.n_cases >= PUBLIC_SET_LARGE_SITE else 'small']
    return {'cases': cases[:labelled], 'unlabelled': cases[labelled:split], 'validation': cases[split:],
            'network': network}


def prepare_target(dataset_id: int, name: str, raw_root: Optional[str], overwrite: bool) -> str:
    """The dataset's folder under ``raw_root`` (default ``$nnUNet_raw``), after checking that it may be written."""
    if raw_root is None:
        raw_root = os.environ.get('nnUNet_raw')
        if not raw_root:
            raise ValueError('no raw_root given and $nnUNet_raw is not set')
    raw_root = os.path.abspath(raw_root)
    target = os.path.join(raw_root, dataset_folder_name(dataset_id, name))
    _check_target(raw_root, target, int(dataset_id), overwrite)
    os.makedirs(raw_root, exist_ok=True)
    return target


@contextlib.contextmanager
def building(target: str, overwrite: bool):
    """A hidden temporary sibling of ``target`` to write the dataset into; when the block ends, the folder is checked
    against the data contract (``Federation.from_folder``) and renamed into place. On any error it is removed, so an
    interrupted build never leaves a folder that looks complete."""
    from fednnunet.federation import Federation
    raw_root = os.path.dirname(target)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.building-', dir=raw_root)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the dataset should look like any other folder
        yield tmp
        Federation.from_folder(tmp)  # the contract holds before the folder becomes visible
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(raw_root: str, target: str, dataset_id: int, overwrite: bool):
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f'{target} already exists; pass overwrite=True to replace it '
                              f'(or choose another dataset id / name)')
    prefix = f'Dataset{dataset_id:03d}_'
    if os.path.isdir(raw_root):
        clash = [d for d in os.listdir(raw_root) if d.startswith(prefix) and
                 os.path.join(raw_root, d) != target]
        if clash:
            raise FileExistsError(f'{raw_root} already holds {clash} with dataset id {dataset_id}; nnU-Net needs '
                                  f'dataset ids to be unique: choose another id or remove it')


def _move_into_place(tmp: str, target: str, overwrite: bool):
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f'{target} appeared while building; pass overwrite=True to replace it')
    old = tmp + '-old'
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
