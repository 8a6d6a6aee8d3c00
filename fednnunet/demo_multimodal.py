"""The multimodal demo federation, ``Dataset506_FedBrainMultimodalDemo`` (``fednnunet_demo_data --multimodal``).

The demo's subjects (fednnunet.demo: the MNI152 anatomy under random smooth transforms) scanned with three contrasts,
``T1``, ``T2`` and ``FLAIR``, by sites that each have some of them (sites.json ``channels``):

* T1 is the template's T1 (as in every demo); the T2-like and FLAIR-like contrasts are synthesised from the warped
  tissue maps: T2 with bright CSF and grey matter above white matter, FLAIR with suppressed (dark) CSF and grey
  matter above white matter.
* Every subject has ``LESIONS_PER_SUBJECT`` white-matter lesions (label 3, spheres in the deep white matter) that are
  **clearly visible in FLAIR only**: about twice the white matter's FLAIR signal, while in T1 and T2 they differ
  from the white matter by a few percent (below the noise at most sites). So a model that sees FLAIR can find them
  and one that does not can hardly: the modalities matter.
* Each site has its own scanner (voxel grid, bias field, noise, intensity scale and gamma: fednnunet.demo) and, on
  top of it, a per-modality drift: the intensity scale and the gamma of each contrast differ from site to site.
  nnU-Net's per-image z-score removes the scale, not the gamma's change of contrast.
* Besides its training cases (only its own channels, in ``imagesTr/``), every site has ``test_per_site`` held-out
  labelled cases scanned with **all three** contrasts (with its drift) in ``imagesTs/`` and ``labelsTs/``: nothing
  trains or plans on them; they let every model be measured with every subset of the modalities at every site
  (benchmarks/multimodal.py).

A case's randomness comes from ``(seed, site, index)`` only (anatomy, scanner and lesions from separate streams), so
the same seed gives the same arrays, and a site's cases do not depend on which channels it has or on the other
sites. See documentation/demo_federation.md.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fednnunet import demo
from fednnunet.demo import FILE_ENDING, LABELS, LESION_LABEL, SiteScanner

MULTIMODAL_DATASET_ID = 506
MULTIMODAL_DATASET_NAME = 'FedBrainMultimodalDemo'
MODALITIES: Tuple[str, ...] = ('T1', 'T2', 'FLAIR')
#: the T2-like and FLAIR-like signal of (CSF, grey matter, white matter), in the T1 template's units (0..1)
TISSUE_SIGNAL = {'T2': (1.0, 0.55, 0.40), 'FLAIR': (0.15, 0.62, 0.48)}
#: a lesion's FLAIR signal (white matter: 0.48); in T1 and T2 the lesion is the tissue's signal times (1 + gain)
FLAIR_LESION_SIGNAL = 1.0
FAINT_LESION_GAIN = {'T1': -0.05, 'T2': 0.05}
LESIONS_PER_SUBJECT = 2
LESION_RADIUS_MM = (8.0, 12.0)
SUBJECT_CONTRAST_STD = 0.02  # per-subject jitter of each synthetic contrast's grey/white matter signal
TEST_PER_SITE = 2


@dataclass(frozen=True)
class MultimodalSite:
    """A site of the multimodal demo: its scanner (fednnunet.demo.SiteScanner), the contrasts it has, and its drift:
    per modality of MODALITIES (in that order) a factor on the scanner's intensity scale and one on its gamma."""
    scanner: SiteScanner
    channels: Tuple[str, ...]
    drift: Tuple[Tuple[float, float], ...]

    def __post_init__(self):
        if not self.channels or len(set(self.channels)) != len(self.channels) or \
                not set(self.channels) <= set(MODALITIES):
            raise ValueError(f'site {self.name!r}: channels must be some of {MODALITIES}, each once')
        if len(self.drift) != len(MODALITIES) or not all(len(d) == 2 and d[0] > 0 and d[1] > 0 for d in self.drift):
            raise ValueError(f'site {self.name!r}: drift needs a positive (scale, gamma) factor per modality')

    @property
    def name(self) -> str:
        return self.scanner.name

    def case_ids(self) -> Tuple[str, ...]:
        return self.scanner.case_ids()

    def test_case_ids(self, n: int) -> Tuple[str, ...]:
        """The held-out cases' ids: the indices after the training cases'."""
        return tuple(f'{self.name}_{i:03d}' for i in range(self.scanner.n_cases, self.scanner.n_cases + n))


def _site(name, n_cases, spacing, scale, gamma, bias, noise, channels, drift, description):
    return MultimodalSite(SiteScanner(name, n_cases, spacing, scale, gamma, bias, noise, description), channels,
                          drift)


#: T1 is every site's common contrast, so that FedAvg on the channels every site has is a baseline
MULTIMODAL_SITES: Tuple[MultimodalSite, ...] = (
    _site('A', 10, (1.0, 1.0, 1.0), 1000.0, 1.0, 0.05, 0.02, MODALITIES, ((1.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
          'large reference site: every contrast, isotropic, clean'),
    _site('B', 8, (1.0, 1.0, 2.0), 800.0, 0.9, 0.10, 0.03, ('T1', 'T2'), ((1.0, 1.0), (1.6, 1.3), (0.7, 0.8)),
          'T1 + T2, thicker slices, its T2 with more contrast'),
    _site('C', 6, (1.2, 1.2, 1.2), 1500.0, 1.3, 0.30, 0.03, ('T1', 'FLAIR'), ((1.0, 1.0), (0.6, 0.8), (1.8, 1.4)),
          'T1 + FLAIR, strong bias, its FLAIR with more contrast'),
    _site('D', 5, (1.0, 1.0, 1.5), 250.0, 0.75, 0.15, 0.06, ('T1',), ((1.0, 1.0), (1.3, 1.2), (0.5, 0.7)),
          'T1 only, noisy'),
)

TEST_MULTIMODAL_SITES: Tuple[MultimodalSite, ...] = (
    _site('A', 3, (1.0, 1.0, 1.0), 1000.0, 1.0, 0.05, 0.02, MODALITIES, ((1.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
          'every contrast'),
    _site('B', 2, (1.0, 1.0, 2.0), 800.0, 0.9, 0.10, 0.03, ('T1', 'T2'), ((1.0, 1.0), (1.6, 1.3), (0.7, 0.8)),
          'T1 + T2'),
    _site('C', 2, (1.2, 1.2, 1.2), 1500.0, 1.3, 0.30, 0.03, ('T1', 'FLAIR'), ((1.0, 1.0), (0.6, 0.8), (1.8, 1.4)),
          'T1 + FLAIR'),
)

_SUBJECT_CONTRAST_STREAM = 4  # the synthetic contrasts' jitter: (seed, site, case, this)


def generate_multimodal_case(site: MultimodalSite, index: int, size: int = 64, seed: int = 0, _maps=None
                             ) -> Tuple[Dict[str, np.ndarray], np.ndarray, Tuple[float, float, float]]:
    """One subject scanned with every modality at ``site``: ``({modality: image}, label, spacing_mm)``, arrays
    indexed x, y, z (fednnunet.demo.generate_case's conventions); label 3 marks the lesions."""
    scanner = site.scanner
    subject = demo._subject(scanner, index, size, seed, _maps)
    label = demo._tissue_label(subject)
    lesion_rng = demo._lesion_rng(seed, scanner.name, index)
    inside = np.zeros(subject.shape)
    for _ in range(LESIONS_PER_SUBJECT):
        inside = np.maximum(inside, demo._lesion_share(subject, lesion_rng, LESION_RADIUS_MM))
    label[inside >= 0.5] = LESION_LABEL
    demo._check_labels(label, {1, 2, LESION_LABEL}, f'{scanner.name}_{index:03d}', size)

    jitter = np.random.default_rng(np.random.SeedSequence(
        demo._case_entropy(seed, scanner.name, index) + [_SUBJECT_CONTRAST_STREAM])).normal(
        0.0, SUBJECT_CONTRAST_STD, (len(TISSUE_SIGNAL), 2))
    csf = np.clip(1.0 - subject.gm - subject.wm, 0.0, 1.0)
    signals = {'T1': (subject.t1 + subject.contrast[0] * subject.gm + subject.contrast[1] * subject.wm) *
               (1.0 + FAINT_LESION_GAIN['T1'] * inside)}
    for (modality, (s_csf, s_gm, s_wm)), (j_gm, j_wm) in zip(TISSUE_SIGNAL.items(), jitter):
        tissue = s_csf * csf + (s_gm + j_gm) * subject.gm + (s_wm + j_wm) * subject.wm
        signals[modality] = (tissue * (1.0 - inside) + FLAIR_LESION_SIGNAL * inside if modality == 'FLAIR' else
                             tissue * (1.0 + FAINT_LESION_GAIN[modality] * inside))
    images = {}
    for modality, (scale, gamma) in zip(MODALITIES, site.drift):  # every modality, in order: the same streams
        images[modality] = demo._scan(signals[modality], subject, scanner.gamma * gamma, scanner.bias_strength,
                                      scanner.noise_std, scanner.intensity_scale * scale)
    return images, label, subject.spacing


def channel_names() -> Dict[str, str]:
    return {str(i): m for i, m in enumerate(MODALITIES)}


def build_multimodal_federation(dataset_id: int = MULTIMODAL_DATASET_ID, name: str = MULTIMODAL_DATASET_NAME,
                                raw_root: Optional[str] = None, size: int = 64, seed: int = 0,
                                sites: Sequence[MultimodalSite] = MULTIMODAL_SITES, overwrite: bool = False,
                                verbose: bool = True, only_site: Optional[str] = None,
                                test_per_site: int = TEST_PER_SITE) -> str:
    """Writes ``<raw_root or $nnUNet_raw>/Dataset{id:03d}_{name}/``: dataset.json (channels T1, T2, FLAIR; labels
    background, grey_matter, white_matter, lesion), each site's training cases with its own channels in imagesTr/
    and labelsTr/, each site's ``test_per_site`` held-out cases with every channel in imagesTs/ and labelsTs/, and
    sites.json (``cases`` and ``channels`` per site). ``only_site``: one hospital's own folder (its cases and test
    cases, a sites.json that lists only itself, the federation's dataset.json). Built as
    fednnunet.demo.build_demo_federation builds (a hidden folder renamed into place when complete). Returns the
    folder."""
    from fednnunet.federation import write_sites_json
    sites = tuple(sites)
    names = [s.name for s in sites]
    if not sites or len(set(names)) != len(names):
        raise ValueError(f'need at least one site, with unique names (got {names})')
    if only_site is not None and only_site not in names:
        raise ValueError(f"site {only_site!r} is not one of the demo's sites {names}")
    if int(test_per_site) < 0:
        raise ValueError(f'test_per_site must be >= 0, not {test_per_site}')
    target = demo.prepare_target(dataset_id, name, raw_root, overwrite)
    t_start = time.perf_counter()
    written = 0
    with demo.building(target, overwrite) as tmp:
        folders = {sub: os.path.join(tmp, sub) for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs')}
        for folder in folders.values():
            os.makedirs(folder)
        demo._template(demo._work_spacing(size))
        for site in sites:
            if only_site not in (None, site.name):
                continue
            t0 = time.perf_counter()
            spacing = demo.site_spacing_mm(site.scanner, size)
            shape = demo.site_shape(site.scanner, size)
            maps = demo._site_maps(size, spacing)
            origin = demo._grid_origin(spacing, shape)
            cases = list(site.case_ids()) + list(site.test_case_ids(test_per_site))
            for i, case in enumerate(cases):
                test = i >= site.scanner.n_cases
                images, label, _ = generate_multimodal_case(site, i, size, seed, _maps=maps)
                for c, modality in enumerate(MODALITIES):
                    if test or modality in site.channels:
                        demo._write_nifti(images[modality], spacing, origin, os.path.join(
                            folders['imagesTs' if test else 'imagesTr'], f'{case}_{c:04d}{FILE_ENDING}'))
                demo._write_nifti(label, spacing, origin,
                                  os.path.join(folders['labelsTs' if test else 'labelsTr'], f'{case}{FILE_ENDING}'))
                written += 1
            if verbose:
                print(f"[demo] site {site.name}: {site.scanner.n_cases} cases with {'+'.join(site.channels)}, "
                      f"{test_per_site} test cases with every contrast, shape {shape} (x,y,z), "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
        dataset_json = {
            'channel_names': channel_names(),
            'labels': dict(LABELS, lesion=LESION_LABEL),
            'numTraining': sum(s.scanner.n_cases for s in sites),  # the federation's, the same at every site
            'file_ending': FILE_ENDING,
            'name': name,
            'description': (f'fednnunet multimodal demo federation: brain tissue and white-matter lesions (visible '
                            f'in FLAIR) from T1, T2 and FLAIR, {len(sites)} sites with different contrasts ('
                            + ', '.join(f"{s.name}: {s.scanner.n_cases} cases, {'+'.join(s.channels)}" for s in sites)
                            + f'), per-site and per-contrast intensity drift; {test_per_site} held-out test cases '
                            f'per site with every contrast in imagesTs/labelsTs; synthetic subjects from random '
                            f'deformations of the MNI ICBM152 2009a T1 template and its GM/WM probability maps (as '
                            f'shipped with nilearn), size={size}, seed={seed}.'),
            'reference': demo.TEMPLATE_REFERENCE,
        }
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(dataset_json, f, indent=2)
        write_sites_json(tmp, {s.name: {'cases': list(s.case_ids()), 'channels': list(s.channels)}
                               for s in sites if only_site in (None, s.name)})
    if verbose:
        print(f'[demo] wrote {target} ({written} cases, {time.perf_counter() - t_start:.1f} s)', flush=True)
    return target


def test_cases(raw_folder: str, site: str) -> List[str]:
    """The site's held-out test cases in a multimodal demo folder (their labels in labelsTs/)."""
    folder = os.path.join(raw_folder, 'labelsTs')
    return sorted(f[:-len(FILE_ENDING)] for f in os.listdir(folder)
                  if f.endswith(FILE_ENDING) and f.rsplit('_', 1)[0] == site)
