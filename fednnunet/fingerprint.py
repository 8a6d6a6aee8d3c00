"""The federated dataset fingerprint: each site summarises its own cases, the server merges them.

Site side (:func:`fingerprint_site`): nnU-Net's own ``DatasetFingerprintExtractor.analyze_case`` runs on
every own case with the per-case sample budget nnU-Net would use on the pooled data
(``1e8 // N_total``). The sampled foreground intensities stay on the site's disk, sorted; what leaves is
per-case geometry and per-channel moments (count, sum, sum of squared deviations, min, max).

Server side (:func:`merge_site_fingerprints`): mean/std/min/max merge exactly from the moments; the
median and the 0.5/99.5 percentiles come from an exact federated order-statistic search in which sites
only answer counts (:mod:`fednnunet.federated_quantiles`). The result is nnU-Net's
``dataset_fingerprint.json``.
"""
import json
import os
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from fednnunet.errors import FederationError
from fednnunet.file_checks import check_complete, scalar_components
from fednnunet.federated_quantiles import exact_order_statistics, linear_percentiles, percentile_ranks
from fednnunet.federation import Site
from fednnunet.jsonio import write_json
from fednnunet.parallel import run_per_case

# DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats: nnU-Net samples this many foreground
# voxels over the whole dataset, int(budget // number of cases) per case.
NNUNET_FOREGROUND_SAMPLE_BUDGET = 10e7
NNUNET_PERCENTILES = (0.5, 50.0, 99.5)


def samples_per_case(num_cases_in_federation: int) -> int:
    return int(NNUNET_FOREGROUND_SAMPLE_BUDGET // num_cases_in_federation)


def expected_label_values(dataset_json: dict) -> List[int]:
    lm = LabelManager(dataset_json['labels'], regions_class_order=dataset_json.get('regions_class_order'))
    values = set(lm.all_labels)
    if lm.has_ignore_label:
        values.add(lm.ignore_label)
    return sorted(int(v) for v in values)


def _checked_reader(base, site: str, case: str, n_channels: int, expected_labels: Sequence[int], seen: dict):
    """nnU-Net's reader for this dataset, with the checks a federation needs at the moment of reading
    (so every file is read once): readable, channel count, no NaN, labels declared, geometry matches."""

    class CheckedReader(base):
        _reading_seg = False  # several readers implement read_seg through read_images

        def read_images(self, image_fnames):
            if self._reading_seg:
                return super().read_images(image_fnames)
            for i, f in enumerate(image_fnames):
                try:
                    check_complete(f)
                except ValueError as e:
                    raise FederationError(f'cannot read image file {f}: it {e}', site=site, case=case,
                                          field=f'channel {i}') from None
            try:
                images, props = super().read_images(image_fnames)
            except Exception as e:
                for i, f in enumerate(image_fnames):
                    try:
                        super().read_images([f])
                    except Exception:
                        raise FederationError(f'cannot read image file {f} ({type(e).__name__}: {e})', site=site,
                                              case=case, field=f'channel {i}') from None
                raise FederationError(f'cannot read images {list(image_fnames)} together ({e})', site=site,
                                      case=case, field='images') from None
            for i, f in enumerate(image_fnames if issubclass(base, SimpleITKIO) else ()):
                components = scalar_components(f)  # SimpleITKIO would read a vector image as extra dimension
                if components is not None and components > 1:
                    raise FederationError(f'image file {f} holds {components} components per voxel (a vector image); '
                                          f'nnU-Net reads one scalar image per channel file ({case}_0000, '
                                          f'{case}_0001, ...): split it into one file per channel', site=site,
                                          case=case, field=f'channel {i}')
            if images.ndim != 4 or images.shape[0] != n_channels:
                raise FederationError(f'the images {list(image_fnames)} read as an array of shape {images.shape}; '
                                      f'nnU-Net expects {n_channels} channel(s) of 3D images (the site\'s '
                                      f'channels of dataset.json)', site=site, case=case, field='channel_names')
            if np.isnan(images).any():
                raise FederationError('image contains NaN values', site=site, case=case, field='images')
            seen['shape'], seen['spacing'] = images.shape[1:], props['spacing']
            return images, props

        def read_seg(self, seg_fname):
            try:
                check_complete(seg_fname)
            except ValueError as e:
                raise FederationError(f'cannot read label file {seg_fname}: it {e}', site=site, case=case,
                                      field='label') from None
            self._reading_seg = True
            try:
                seg, props = super().read_seg(seg_fname)
            except Exception as e:
                raise FederationError(f'cannot read label file {seg_fname} ({type(e).__name__}: {e})', site=site,
                                      case=case, field='label') from None
            finally:
                self._reading_seg = False
            if seg.shape[1:] != seen.get('shape'):
                raise FederationError(f'label shape {seg.shape[1:]} differs from image shape {seen.get("shape")}',
                                      site=site, case=case, field='label')
            if not np.allclose(props['spacing'], seen['spacing']):
                raise FederationError(f"label spacing {props['spacing']} differs from image spacing "
                                      f"{seen['spacing']}", site=site, case=case, field='label')
            found = pd.unique(seg.ravel())
            unexpected = sorted(float(v) for v in found if v not in expected_labels)
            if unexpected:
                raise FederationError(f'label file holds values {unexpected} that dataset.json does not declare '
                                      f'(declared: {list(expected_labels)})', site=site, case=case, field='labels')
            return seg, props

    return CheckedReader


def _analyze_own_case(site: str, case: str, image_files: List[str], label_file: str, reader_name: str,
                      n_channels: int, expected_labels: Sequence[int], num_samples: int):
    """nnU-Net's analyze_case on one own case. The foreground sample (drawn with replacement, so mostly
    repeats) is returned losslessly as sorted distinct values and their multiplicities."""
    seen = {}
    reader = _checked_reader(recursive_find_reader_writer_by_name(reader_name), site, case, n_channels,
                             expected_labels, seen)
    shape_after_crop, spacing, samples, _, relative_size = DatasetFingerprintExtractor.analyze_case(
        image_files, label_file, reader, num_samples)
    compressed = [np.unique(np.asarray(s, dtype=np.float32), return_counts=True) for s in samples]
    return shape_after_crop, spacing, compressed, relative_size


def _private_files(private_folder: str, channel: int) -> Tuple[str, str]:
    return (os.path.join(private_folder, f'foreground_values_channel{channel}.npy'),
            os.path.join(private_folder, f'foreground_cumulative_counts_channel{channel}.npy'))


def _save_private(path: str, array: np.ndarray):
    tmp = path + '.partial.npy'
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def fingerprint_site(site: Site, reader_name: str, num_samples: int, private_folder: str,
                     num_processes: int = 1) -> dict:
    """A site's mergeable fingerprint. Returns what leaves the site; keeps its sample private (as sorted
    distinct values with cumulative counts, which answer every count query exactly)."""
    present = site.present_channels  # dataset.json's indices of the site's channels; its images hold these only
    n_channels = len(present)
    expected = expected_label_values(site.dataset_json)
    args = [(site.name, case, site.image_files(case), site.label_file(case), reader_name, n_channels, expected,
             num_samples) for case in site.cases]
    results = run_per_case(_analyze_own_case, args, num_processes, f'[site {site.name}] fingerprint')

    os.makedirs(private_folder, exist_ok=True)
    channels = {}
    has_empty_case = False
    for i, c in enumerate(present):  # i: the channel in the site's images, c: in dataset.json
        has_empty_case |= any(r[2][i][0].size == 0 for r in results)
        # a site without labelled training cases (semi-supervised) contributes no case and an empty sample
        values, inverse = np.unique(np.concatenate([r[2][i][0] for r in results] + [np.zeros(0, np.float32)]),
                                    return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([r[2][i][1] for r in results] + [np.zeros(0)]),
                             minlength=values.size).astype(np.int64)
        values_file, cumulative_file = _private_files(private_folder, int(c))
        _save_private(values_file, values)
        _save_private(cumulative_file, np.cumsum(counts))
        n = int(counts.sum())
        v64 = values.astype(np.float64)
        total = float(np.dot(counts, v64))
        mean = total / n if n else 0.0
        channels[c] = {
            'n': n, 'sum': total, 'm2': float(np.dot(counts, np.square(v64 - mean))),
            'min': float(values[0]) if n else None, 'max': float(values[-1]) if n else None,
        }
    cases = [{'case': case, 'spacing': [float(s) for s in r[1]], 'shape_after_crop': [int(s) for s in r[0]],
              'relative_size_after_cropping': float(r[3])} for case, r in zip(site.cases, results)]
    return {'site': site.name, 'cases': cases, 'channels': channels, 'has_empty_case': bool(has_empty_case),
            'num_samples_per_case': int(num_samples)}


def _number(value, what: str, site: str, integer: bool = False, low: float = -np.inf, high: float = np.inf):
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)) or \
            not np.isfinite(value) or not low <= value <= high:
        raise FederationError(f'{what} {repr(value)[:40]} is not a finite {"whole " if integer else ""}number in '
                              f'[{low}, {high}]', site=site, field='fingerprint')
    return value


def check_site_fingerprint(fp, site: str, channels: Sequence[str], num_cases: int) -> dict:
    """A site's fingerprint as the server receives it (data from the network): the channels the site declared
    (dataset.json indices), one entry per labelled training case it declared, finite moments and geometry."""
    if not isinstance(fp, dict) or not isinstance(fp.get('channels'), dict) or not isinstance(fp.get('cases'), list):
        raise FederationError('the fingerprint is not an object with channels and cases', site=site,
                              field='fingerprint')
    if sorted(fp['channels']) != sorted(channels):
        raise FederationError(f"the fingerprint has channels {sorted(fp['channels'])[:10]}, the site declared "
                              f"{sorted(channels)}", site=site, field='fingerprint')
    for c, m in fp['channels'].items():
        if not isinstance(m, dict) or set(m) != {'n', 'sum', 'm2', 'min', 'max'}:
            raise FederationError(f'channel {c}: the moments are not n, sum, m2, min, max', site=site,
                                  field='fingerprint')
        n = _number(m['n'], f'channel {c} n', site, integer=True, low=0)
        _number(m['sum'], f'channel {c} sum', site)
        _number(m['m2'], f'channel {c} m2', site, low=0)
        for k in ('min', 'max'):
            if n or m[k] is not None:
                _number(m[k], f'channel {c} {k}', site)
        if n and m['min'] > m['max']:
            raise FederationError(f'channel {c}: min above max', site=site, field='fingerprint')
    if len(fp['cases']) != num_cases:
        raise FederationError(f"the fingerprint has {len(fp['cases'])} cases, the site declared {num_cases}",
                              site=site, field='fingerprint')
    for case in fp['cases']:
        if not isinstance(case, dict) or not isinstance(case.get('case'), str) or \
                not isinstance(case.get('spacing'), list) or not isinstance(case.get('shape_after_crop'), list) or \
                len(case['spacing']) != 3 or len(case['shape_after_crop']) != 3:
            raise FederationError('a case entry is not {case, spacing (3), shape_after_crop (3), ...}', site=site,
                                  field='fingerprint')
        for v in case['spacing']:
            _number(v, f"case {case['case'][:40]!r} spacing", site, low=1e-6, high=1e6)
        for v in case['shape_after_crop']:
            _number(v, f"case {case['case'][:40]!r} shape", site, integer=True, low=1, high=10 ** 5)
        _number(case.get('relative_size_after_cropping'), f"case {case['case'][:40]!r} relative size", site, low=0,
                high=1)
    if not isinstance(fp.get('has_empty_case'), bool):
        raise FederationError('has_empty_case is not true or false', site=site, field='fingerprint')
    return fp


#: the honest search (federated_quantiles.exact_order_statistics over float32 keys, 255 thresholds per rank and
#: round) needs ceil(32 / log2(257)) = 4 rounds; a site answers at most this many count queries per planning
MAX_COUNT_QUERIES = 6
#: per channel and query: 3 percentiles x 2 neighbouring ranks x (255 thresholds + the midpoint)
MAX_THRESHOLDS_PER_CHANNEL = 3 * 2 * 256
#: plannings (fingerprints) a site answers from its data before its operator allows more (deletes the ledger)
MAX_PLANNINGS = 5
LEDGER_FILE = 'count_query_ledger.json'


class CountQueryBudget:
    """The count queries a site answers: the honest search's schedule and no more. A planning (a fingerprint
    request) opens a budget of MAX_COUNT_QUERIES queries of at most MAX_THRESHOLDS_PER_CHANNEL thresholds per
    channel; a site answers at most MAX_PLANNINGS plannings, counted in a ledger beside its private folder, which
    only the site's operator resets (by deleting it). Kept on disk: on Flower every message is a new process."""

    def __init__(self, private_folder: str, site: str):
        self.site = site
        self.queries_file = os.path.join(private_folder, 'count_queries.json')
        self.ledger_file = os.path.join(os.path.dirname(os.path.abspath(private_folder)), LEDGER_FILE)

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def reset(self):
        """A new planning: counted in the ledger (refused beyond MAX_PLANNINGS); its query budget starts at 0."""
        plannings = int(self._read(self.ledger_file).get('plannings', 0))
        if plannings >= MAX_PLANNINGS:
            raise FederationError(f'this site has answered {plannings} plannings from its data, the most it answers; '
                                  f'its operator deletes {self.ledger_file} to allow more', site=self.site,
                                  field='fingerprint')
        write_json(self.ledger_file, {'plannings': plannings + 1})
        os.makedirs(os.path.dirname(self.queries_file), exist_ok=True)
        write_json(self.queries_file, {'queries': 0})

    def spend(self, thresholds: Dict[str, np.ndarray], channels: Sequence[str]):
        """Checks one count query (about the site's ``channels``, dataset.json indices) against the schedule before
        it is answered; raises FederationError if not."""
        state = self._read(self.queries_file)
        if 'queries' not in state:
            raise FederationError('no private sample to count: count queries come after this planning\'s '
                                  'fingerprint and before its release', site=self.site, field='count_leq')
        if state['queries'] >= MAX_COUNT_QUERIES:
            raise FederationError(f'the planning asked more than {MAX_COUNT_QUERIES} count queries (the federated '
                                  f'percentile search needs 4); refused', site=self.site, field='count_leq')
        for channel, t in thresholds.items():
            if channel not in channels:
                raise FederationError(f'{channel[:20]!r} is not one of the site\'s channels {list(channels)}',
                                      site=self.site, field='count_leq')
            if np.asarray(t).ndim != 1 or len(t) > MAX_THRESHOLDS_PER_CHANNEL:
                raise FederationError(f'{np.asarray(t).size} thresholds for channel {channel}; the search asks at '
                                      f'most {MAX_THRESHOLDS_PER_CHANNEL} per query', site=self.site,
                                      field='count_leq')
            if not np.all(np.isfinite(np.asarray(t, dtype=np.float64))):
                raise FederationError(f'thresholds for channel {channel} are not finite', site=self.site,
                                      field='count_leq')
        write_json(self.queries_file, {'queries': int(state['queries']) + 1})


def count_values_leq(private_folder: str, thresholds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A site's whole answer to an order-statistic query: how many own sampled values are <= each t."""
    out = {}
    for channel, t in thresholds.items():
        values_file, cumulative_file = _private_files(private_folder, int(channel))
        values = np.load(values_file, mmap_mode='r', allow_pickle=False)
        cumulative = np.concatenate([[0], np.load(cumulative_file, allow_pickle=False)])
        out[channel] = cumulative[np.searchsorted(values, np.asarray(t, dtype=values.dtype), side='right')]
    return out


def release_private_sample(private_folder: str):
    """After the merge the sample has served its purpose; the site deletes it (and the folder, once empty)."""
    if os.path.isdir(private_folder):
        for f in os.listdir(private_folder):
            if f.startswith('foreground_') or f == 'count_queries.json':
                os.remove(os.path.join(private_folder, f))
        if not os.listdir(private_folder):
            os.rmdir(private_folder)


def merge_moments(parts: List[dict]) -> dict:
    """Exact pooled count/mean/std(ddof=0)/min/max from per-site (n, sum, m2, min, max) (Chan et al.)."""
    parts = [p for p in parts if p['n'] > 0]
    n = sum(p['n'] for p in parts)
    if n == 0:
        raise FederationError('no site has a single foreground voxel in this channel', field='labels')
    mean = sum(p['sum'] for p in parts) / n
    m2 = sum(p['m2'] + p['n'] * (p['sum'] / p['n'] - mean) ** 2 for p in parts)
    return {'n': n, 'mean': mean, 'std': float(np.sqrt(m2 / n)), 'min': min(p['min'] for p in parts),
            'max': max(p['max'] for p in parts)}


def merge_site_fingerprints(site_fingerprints: List[dict], count_leq: Callable[[Dict[str, np.ndarray]],
                                                                                  Dict[str, np.ndarray]]) -> dict:
    """nnU-Net's dataset_fingerprint.json from the sites' summaries and their answers to count queries.

    count_leq({channel: thresholds}) must return the counts summed over all sites."""
    cases = sorted((c for fp in site_fingerprints for c in fp['cases']), key=lambda c: c['case'])
    # a channel's statistics merge over the sites that have it (sites.json 'channels'); nnU-Net concatenates
    # float32 samples, and a case without foreground contributes an empty float64 list, which promotes the pooled
    # sample (and so the percentile arithmetic) to float64
    channels = sorted({c for fp in site_fingerprints for c in fp['channels']}, key=int)
    dtype = {c: np.float64 if any(fp['has_empty_case'] for fp in site_fingerprints if c in fp['channels'])
             else np.float32 for c in channels}
    moments = {c: merge_moments([fp['channels'][c] for fp in site_fingerprints if c in fp['channels']])
               for c in channels}

    wanted, ranks = {}, {}
    for c in channels:
        prev, nxt, gamma = percentile_ranks(moments[c]['n'], NNUNET_PERCENTILES)
        ranks[c] = (prev, nxt, gamma)
        wanted[c] = (sorted(set(prev.tolist()) | set(nxt.tolist())), moments[c]['min'], moments[c]['max'])
    order_stats, _ = exact_order_statistics(wanted, np.float32, count_leq, thresholds_per_rank=255)

    properties = {}
    for c in channels:
        prev, nxt, gamma = ranks[c]
        value_at = dict(zip(wanted[c][0], order_stats[c]))
        p005, median, p995 = linear_percentiles(np.array([value_at[i] for i in prev]).astype(dtype[c]),
                                                np.array([value_at[i] for i in nxt]).astype(dtype[c]), gamma)
        m = moments[c]
        properties[c] = {'mean': float(m['mean']), 'median': float(median), 'std': float(m['std']),
                         'min': float(m['min']), 'max': float(m['max']),
                         'percentile_99_5': float(p995), 'percentile_00_5': float(p005)}
    return {
        'spacings': [c['spacing'] for c in cases],
        'shapes_after_crop': [c['shape_after_crop'] for c in cases],
        'foreground_intensity_properties_per_channel': properties,
        'median_relative_size_after_cropping': float(np.median([c['relative_size_after_cropping'] for c in cases])),
    }
