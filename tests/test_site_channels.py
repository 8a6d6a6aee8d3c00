"""Sites with some of the dataset's channels (sites.json ``channels``): checked, fingerprinted per channel over the
sites that have it, preprocessed with the missing channels as zeros, refused by methods that need every channel."""
import json
import os
import pathlib
import pickle
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.cli import train_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import SITES_FILE, Federation, Site, server_folder, site_folder
from fednnunet.fingerprint import CountQueryBudget, check_site_fingerprint, samples_per_case
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.planners.negotiation import describe_site, negotiate
from fednnunet.preprocessing import channels_of_files, with_missing_channels

from conftest import DATASET_NAME

PLANS = 'nnUNetCPUPlans'


def _add_t2(raw, case: str):
    """A second contrast from the first: inverted and rescaled, with a little noise (same geometry)."""
    t1 = sitk.ReadImage(str(raw / 'imagesTr' / f'{case}_0000.nii.gz'))
    a = sitk.GetArrayFromImage(t1).astype(np.float32)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    t2 = np.where(a > 0, 2.0 * (a.max() - a) + 10.0 + rng.normal(0, 1, a.shape), 0).astype(np.float32)
    image = sitk.GetImageFromArray(t2)
    image.CopyInformation(t1)
    sitk.WriteImage(image, str(raw / 'imagesTr' / f'{case}_0001.nii.gz'))


@pytest.fixture
def two_channel_raw(raw_copy):
    """The demo's cases with a T2 beside their T1. A has both, B T1 only, C T2 only (its T1 files are gone)."""
    dataset_json = json.load(open(raw_copy / 'dataset.json'))
    dataset_json['channel_names'] = {'0': 'T1', '1': 'T2'}
    json.dump(dataset_json, open(raw_copy / 'dataset.json', 'w'))
    spec = json.load(open(raw_copy / SITES_FILE))
    for site, entry in spec['sites'].items():
        for case in entry['cases']:
            _add_t2(raw_copy, case)
            if site == 'B':
                os.remove(raw_copy / 'imagesTr' / f'{case}_0001.nii.gz')
            if site == 'C':
                os.remove(raw_copy / 'imagesTr' / f'{case}_0000.nii.gz')
    spec['sites']['B']['channels'] = ['T1']
    spec['sites']['C']['channels'] = ['T2']
    json.dump(spec, open(raw_copy / SITES_FILE, 'w'))
    return raw_copy


@pytest.fixture
def planned_channels(two_channel_raw):
    federation = Federation.from_raw(DATASET_NAME)
    summary = plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['3d_fullres'],
                                  'nnUNetPlannerCPU')
    return federation, summary


def test_a_site_declares_some_channels_and_reads_only_those(two_channel_raw):
    federation = Federation.from_raw(DATASET_NAME)  # B's T2 and C's T1 files are absent: no error
    b, c = federation.sites['B'], federation.sites['C']
    assert (b.present_channels, b.missing_channels) == (['0'], ['1'])
    assert (c.present_channels, c.missing_channels) == (['1'], ['0'])
    assert federation.sites['A'].present_channels == ['0', '1'] and not federation.sites['A'].missing_channels
    assert [os.path.basename(f) for f in c.image_files(c.cases[0])] == [f'{c.cases[0]}_0001.nii.gz']
    for channels, why in ((['FLAIR'], 'must name each'), (['T1', 'T1'], 'must name each'), ([], 'must name each')):
        site = Site('X', str(two_channel_raw), cases=b.cases, channels=tuple(channels))
        with pytest.raises(FederationError, match=why) as e:
            site.check_files_exist()
        assert (e.value.site, e.value.field) == ('X', 'channels')
    # a declared channel whose file is absent: named with site, case and channel
    os.remove(two_channel_raw / 'imagesTr' / f'{c.cases[0]}_0001.nii.gz')
    with pytest.raises(FederationError, match='is missing') as e:
        Federation.from_raw(DATASET_NAME)
    assert (e.value.site, e.value.case, e.value.field) == ('C', c.cases[0], 'channel 1 (T2)')


def test_negotiation_records_each_sites_channels_and_checks_what_it_is_told(two_channel_raw):
    federation = Federation.from_raw(DATASET_NAME)
    descriptions = {s: describe_site(site) for s, site in federation.sites.items()}
    negotiation = negotiate(list(descriptions.values()))
    assert negotiation['site_channels'] == {'A': ['0', '1'], 'B': ['0'], 'C': ['1']}
    assert negotiation['sites']['B']['channels'] == ['T1'] and 'channels' not in negotiation['sites']['A']
    # a channel that no site with labelled cases has cannot be normalised
    only_t1 = [dict(d, declared_channels=['T1']) for d in descriptions.values()]
    with pytest.raises(FederationError, match=r'channel 1 \(T2\) is at no participant') as e:
        negotiate(only_t1)
    assert e.value.field == 'channels'
    for lie in (['T1', 'T1'], ['FLAIR'], [], 'T1', [1], ['T1', 'T2', 'T3']):
        told = [dict(d) for d in descriptions.values()]
        told[1]['declared_channels'] = lie
        with pytest.raises(FederationError) as e:
            negotiate(told)
        assert (e.value.site, e.value.field) == ('B', 'channels'), lie


def _nnunet_channel_statistics(federation, channel: str) -> dict:
    """nnU-Net's own statistics (its analyze_case sample, pooled as its run() pools it) over the cases of the
    sites that have ``channel``, with the federation's per-case sample budget."""
    n_total = sum(len(s.cases) for s in federation.sites.values())
    samples = []
    for site in federation.sites.values():
        if channel not in site.present_channels:
            continue
        for case in site.cases:
            result = DatasetFingerprintExtractor.analyze_case(site.image_files(case), site.label_file(case),
                                                              SimpleITKIO, samples_per_case(n_total))
            samples.append(result[2][site.present_channels.index(channel)])
    values = np.concatenate(samples)
    p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
    return {'mean': float(np.mean(values)), 'median': float(median), 'std': float(np.std(values)),
            'min': float(np.min(values)), 'max': float(np.max(values)), 'percentile_99_5': float(p995),
            'percentile_00_5': float(p005)}


def test_each_channels_statistics_are_nnunets_over_the_sites_that_have_it(planned_channels):
    federation, summary = planned_channels
    fingerprint = json.load(open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')))
    merged = fingerprint['foreground_intensity_properties_per_channel']
    assert sorted(merged) == ['0', '1']
    for channel in ('0', '1'):
        reference = _nnunet_channel_statistics(federation, channel)
        for stat in ('min', 'max', 'median', 'percentile_00_5', 'percentile_99_5'):
            assert merged[channel][stat] == reference[stat], (channel, stat)
        for stat in ('mean', 'std'):
            np.testing.assert_allclose(merged[channel][stat], reference[stat], rtol=1e-5, err_msg=stat)
    # the two channels' statistics differ (T2 is not T1 relabelled), and every case's geometry is in
    assert merged['0']['median'] != merged['1']['median']
    assert len(fingerprint['spacings']) == sum(len(s.cases) for s in federation.sites.values())
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), f'{PLANS}.json')))
    assert plans['foreground_intensity_properties_per_channel'] == merged
    assert summary['sites']['C']['channels'] == ['T2']


def test_a_site_preprocesses_its_channels_as_nnunet_and_the_missing_ones_as_zeros(planned_channels):
    import blosc2
    federation, _ = planned_channels
    plans = json.load(open(os.path.join(server_folder(DATASET_NAME), f'{PLANS}.json')))
    dataset_json = json.load(open(os.path.join(server_folder(DATASET_NAME), 'dataset.json')))
    pm = PlansManager(plans)
    cm = pm.get_configuration('3d_fullres')
    for name, present in (('B', [0]), ('C', [1])):
        site = federation.sites[name]
        case = site.cases[0]
        folder = os.path.join(site_folder(DATASET_NAME, name), f'{PLANS}_3d_fullres')
        data = blosc2.open(os.path.join(folder, case + '.b2nd'), mode='r')[:]
        properties = pickle.load(open(os.path.join(folder, case + '.pkl'), 'rb'))
        assert data.shape[0] == 2 and properties['present_channels'] == present
        missing = 1 - present[0]
        assert not data[missing].any() and data[present[0]].std() > 0.1
        # the present channel is what nnU-Net's preprocessor makes of it with both channels there (the missing one
        # written for this comparison only), normalised with that channel's merged statistics
        raw = pathlib.Path(site.raw_folder)
        if missing == 1:
            _add_t2(raw, case)
        else:
            sitk.WriteImage(_t1_from_nowhere(str(raw / 'imagesTr' / f'{case}_0001.nii.gz')),
                            str(raw / 'imagesTr' / f'{case}_0000.nii.gz'))
        both = [str(raw / 'imagesTr' / f'{case}_{c:04d}.nii.gz') for c in (0, 1)]
        reference, _, _ = DefaultPreprocessor(verbose=False).run_case(both, site.label_file(case), pm, cm, dataset_json)
        np.testing.assert_allclose(data[present[0]], reference[present[0]], rtol=1e-5, atol=1e-5)
        os.remove(both[missing])
    # a site with every channel: exactly nnU-Net's output, no extra key
    a_case = federation.sites['A'].cases[0]
    a_props = pickle.load(open(os.path.join(site_folder(DATASET_NAME, 'A'), f'{PLANS}_3d_fullres', a_case + '.pkl'),
                               'rb'))
    assert 'present_channels' not in a_props


def _t1_from_nowhere(like: str):
    """A stand-in T1 with C's T2 geometry, positive where the T2 is (so nnU-Net crops the same region)."""
    t2 = sitk.ReadImage(like)
    a = sitk.GetArrayFromImage(t2)
    image = sitk.GetImageFromArray(np.where(a > 0, 100.0, 0.0).astype(np.float32))
    image.CopyInformation(t2)
    return image


def test_the_missing_channel_preprocessor_takes_the_channels_from_the_file_names(two_channel_raw):
    assert channels_of_files(['/x/c_0001.nii.gz'], '.nii.gz') == [1]
    assert channels_of_files(['/x/c_0000.nii.gz', '/x/c_0002.nii.gz'], '.nii.gz') == [0, 2]
    for bad in (['/x/c.nii.gz'], ['/x/c_0001.nii.gz', '/x/c_0000.nii.gz'], ['/x/c_0001.nii.gz'] * 2):
        with pytest.raises(ValueError):
            channels_of_files(bad, '.nii.gz')
    cls = with_missing_channels(DefaultPreprocessor)
    assert issubclass(cls, DefaultPreprocessor) and cls.__name__ == 'DefaultPreprocessor'


def test_a_method_that_needs_every_channel_refuses_a_site_without_one(planned_channels, capsys):
    with pytest.raises(SystemExit):
        train_entry([DATASET_NAME, '3d_fullres', '0', '-p', PLANS, '--method', 'fedavg', '--rounds', '1',
                     '--local-iterations', '1', '--val-iterations', '1', '-device', 'cpu'])
    err = capsys.readouterr().err
    assert "site 'B'" in err and "field 'channels'" in err and 'channel(s) 1 (T2)' in err, err
    assert not os.listdir(os.environ['nnUNet_results'])  # nothing written


def test_the_server_checks_a_sites_fingerprint_and_a_site_counts_only_its_channels(tmp_path):
    good = {'site': 'B', 'channels': {'0': {'n': 3, 'sum': 6.0, 'm2': 2.0, 'min': 1.0, 'max': 3.0}},
            'cases': [{'case': 'b1', 'spacing': [1.0, 1.0, 1.0], 'shape_after_crop': [4, 4, 4],
                       'relative_size_after_cropping': 0.5}], 'has_empty_case': False, 'num_samples_per_case': 3}
    assert check_site_fingerprint(good, 'B', ['0'], 1) is good
    bad_cases = [
        (['0', '1'], 1, {}), (['0'], 2, {}),
        (['0'], 1, {'channels': {'0': {'n': 3, 'sum': float('nan'), 'm2': 2.0, 'min': 1.0, 'max': 3.0}}}),
        (['0'], 1, {'channels': {'0': {'n': -1, 'sum': 6.0, 'm2': 2.0, 'min': 1.0, 'max': 3.0}}}),
        (['0'], 1, {'channels': {'0': {'n': 3, 'sum': 6.0, 'm2': 2.0, 'min': 4.0, 'max': 3.0}}}),
        (['0'], 1, {'cases': [{'case': 'b1', 'spacing': [1.0, 0.0, 1.0], 'shape_after_crop': [4, 4, 4],
                               'relative_size_after_cropping': 0.5}]}),
        (['0'], 1, {'cases': [{'case': 'b1', 'spacing': [1.0, 1.0, 1.0], 'shape_after_crop': [4, 4],
                               'relative_size_after_cropping': 0.5}]}),
        (['0'], 1, {'has_empty_case': 'no'}),
    ]
    for channels, num_cases, change in bad_cases:
        with pytest.raises(FederationError) as e:
            check_site_fingerprint(dict(good, **change), 'B', channels, num_cases)
        assert (e.value.site, e.value.field) == ('B', 'fingerprint'), change
    budget = CountQueryBudget(str(tmp_path / 'private'), 'B')
    budget.reset()
    budget.spend({'0': np.zeros(3)}, ['0'])
    with pytest.raises(FederationError, match="not one of the site's channels") as e:
        budget.spend({'1': np.zeros(3)}, ['0'])
    assert e.value.field == 'count_leq'
