"""The federated fingerprint and plans equal nnU-Net's own on the pooled data."""
import json
import os
import time

import numpy as np
import pytest

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiment_dataset
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncM

from fednnunet import fingerprint, parallel
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import Federation, server_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess

from conftest import DATASET_ID, DATASET_NAME, no_fork_pools, point_nnunet_folder

EXACT_STATS = ('min', 'max', 'median', 'percentile_00_5', 'percentile_99_5')
ACCUMULATED_STATS = ('mean', 'std')  # nnU-Net accumulates these in float32


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, 'tolist') else o))


@pytest.fixture(scope='module')
def pooled_vs_federated(demo_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp('plans')
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('nnUNet_n_proc_DA', '1')  # stock nnU-Net 2.8.1 planning crashes with 0
        no_fork_pools(mp)
        point_nnunet_folder(mp, 'nnUNet_preprocessed', root / 'stock')
        os.makedirs(root / 'stock')
        out['stock_fingerprint'] = _jsonable(extract_fingerprint_dataset(DATASET_ID, num_processes=1, clean=True,
                                                                         verbose=False, show_progress_bar=False))
        out['stock_plans'] = _jsonable(plan_experiment_dataset(DATASET_ID, ExperimentPlanner)[0])
        out['stock_plans_resenc'] = _jsonable(plan_experiment_dataset(DATASET_ID, nnUNetPlannerResEncM)[0])

        mp.setenv('nnUNet_n_proc_DA', '0')  # federated planning copes with what tests use for training
        point_nnunet_folder(mp, 'nnUNet_preprocessed', root / 'federated')
        os.makedirs(root / 'federated')
        # two case workers per site: the simulated sites fingerprint at the same time, sharing one pool
        engine = SimulationEngine.for_federation(Federation.from_raw(DATASET_ID), 2)
        calls, real_run_per_case = out.setdefault('fingerprint_calls', []), fingerprint.run_per_case

        def run_per_case(fn, args, num_processes, desc):
            started = time.perf_counter()
            result = real_run_per_case(fn, args, num_processes, desc)
            calls.append((desc, started, time.perf_counter(), id(parallel._pool)))
            return result
        mp.setattr(fingerprint, 'run_per_case', run_per_case)
        out['summary'] = plan_and_preprocess(engine, DATASET_NAME, preprocess=False)
        out['pool_after_planning'] = parallel._pool
        folder = server_folder(DATASET_NAME)
        with open(os.path.join(folder, 'dataset_fingerprint.json')) as f:
            out['federated_fingerprint'] = json.load(f)
        with open(os.path.join(folder, 'nnUNetPlans.json')) as f:
            out['federated_plans'] = json.load(f)
        plan_and_preprocess(engine, DATASET_NAME, planner_name='nnUNetPlannerResEncM', preprocess=False)
        with open(os.path.join(folder, 'nnUNetResEncUNetMPlans.json')) as f:
            out['federated_plans_resenc'] = json.load(f)
        out['server_files'] = sorted(os.listdir(folder))
        out['site_files'] = sorted(os.path.relpath(os.path.join(dp, f), folder)
                                   for dp, _, fs in os.walk(os.path.join(folder, 'sites')) for f in fs)
    return out


def _assert_intensity_properties_match(federated, stock):
    assert set(federated) == set(stock)
    for channel in stock:
        for stat in EXACT_STATS:  # order statistics and extremes: bit-exact
            assert federated[channel][stat] == stock[channel][stat], (channel, stat)
        for stat in ACCUMULATED_STATS:
            np.testing.assert_allclose(federated[channel][stat], stock[channel][stat], rtol=1e-5, err_msg=stat)


def test_fingerprint_equals_nnunet_on_pooled_data(pooled_vs_federated):
    fed, stock = pooled_vs_federated['federated_fingerprint'], pooled_vs_federated['stock_fingerprint']
    assert fed['spacings'] == stock['spacings']
    assert fed['shapes_after_crop'] == stock['shapes_after_crop']
    assert fed['median_relative_size_after_cropping'] == stock['median_relative_size_after_cropping']
    _assert_intensity_properties_match(fed['foreground_intensity_properties_per_channel'],
                                       stock['foreground_intensity_properties_per_channel'])
    assert pooled_vs_federated['summary']['order_statistic_rounds'] <= 6


@pytest.mark.parametrize('which', ['', '_resenc'])
def test_plans_equal_nnunet_plan_experiment(pooled_vs_federated, which):
    fed, stock = pooled_vs_federated['federated_plans' + which], pooled_vs_federated['stock_plans' + which]
    assert set(fed['configurations']) == set(stock['configurations'])
    for c in ('2d', '3d_fullres'):
        assert fed['configurations'][c] == stock['configurations'][c], c
    for key in stock:
        if key != 'foreground_intensity_properties_per_channel':
            assert fed[key] == stock[key], key
    _assert_intensity_properties_match(fed['foreground_intensity_properties_per_channel'],
                                       stock['foreground_intensity_properties_per_channel'])


def test_simulated_sites_fingerprint_at_once_in_one_shared_pool(pooled_vs_federated):
    """As nnU-Net's one pool for the pooled dataset: every site's cases go to the same pool of case workers, the
    sites at the same time (their fingerprints overlap in time), and the pool ends with the planning."""
    calls = pooled_vs_federated['fingerprint_calls'][:3]  # the first planning's (the fixture plans twice)
    assert len(calls) == 3 and all(pool is not None for *_, pool in calls)
    assert len({pool for *_, pool in calls}) == 1, calls  # one pool for all sites
    assert max(start for _, start, _, _ in calls) < min(end for _, _, end, _ in calls), calls  # all at once
    assert pooled_vs_federated['pool_after_planning'] is None


def test_server_keeps_no_site_data(pooled_vs_federated):
    """Planning-only run: the server folder holds the fingerprint, dataset.json, plans and the federation
    record; the sites' private samples were deleted after the merge."""
    files = pooled_vs_federated['server_files']
    assert {'dataset_fingerprint.json', 'dataset.json', 'nnUNetPlans.json', 'federation'} <= set(files)
    assert files == ['dataset.json', 'dataset_fingerprint.json', 'federation', 'nnUNetPlans.json',
                     'nnUNetResEncUNetMPlans.json', 'sites']
    # private samples are deleted once merged; each site keeps its own fingerprint and its count-query ledger
    # (how many plannings it has answered: fingerprint.CountQueryBudget)
    assert pooled_vs_federated['site_files'] == sorted(f'sites/{s}/{f}' for s in 'ABC'
                                                       for f in ('count_query_ledger.json', 'dataset_fingerprint.json'))


def test_two_channels_and_a_case_without_foreground(raw_copy, tmp_path, monkeypatch):
    """Multi-channel images and an empty label (which makes nnU-Net's pooled sample float64) still match."""
    import SimpleITK as sitk
    dj_file = raw_copy / 'dataset.json'
    dj = json.loads(dj_file.read_text())
    dj['channel_names'] = {'0': 'T1', '1': 'T2'}
    dj_file.write_text(json.dumps(dj))
    for f in sorted((raw_copy / 'imagesTr').iterdir()):
        img = sitk.ReadImage(str(f))
        second = sitk.GetImageFromArray(np.sqrt(np.abs(sitk.GetArrayFromImage(img))) * 7.0 + 3.0)
        second.CopyInformation(img)
        sitk.WriteImage(second, str(f).replace('_0000.nii.gz', '_0001.nii.gz'))
    label = sitk.ReadImage(str(raw_copy / 'labelsTr' / 'C_001.nii.gz'))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(label)))
    empty.CopyInformation(label)
    sitk.WriteImage(empty, str(raw_copy / 'labelsTr' / 'C_001.nii.gz'))

    no_fork_pools(monkeypatch)
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', tmp_path / 'stock')
    os.makedirs(tmp_path / 'stock')
    stock = _jsonable(extract_fingerprint_dataset(DATASET_ID, num_processes=1, clean=True, verbose=False,
                                                  show_progress_bar=False))
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', tmp_path / 'federated')
    os.makedirs(tmp_path / 'federated')
    engine = SimulationEngine.for_federation(Federation.from_raw(DATASET_ID), 1)
    plan_and_preprocess(engine, DATASET_NAME, preprocess=False)
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')) as f:
        fed = json.load(f)
    assert fed['spacings'] == stock['spacings'] and fed['shapes_after_crop'] == stock['shapes_after_crop']
    assert fed['median_relative_size_after_cropping'] == stock['median_relative_size_after_cropping']
    assert set(fed['foreground_intensity_properties_per_channel']) == {'0', '1'}
    _assert_intensity_properties_match(fed['foreground_intensity_properties_per_channel'],
                                       stock['foreground_intensity_properties_per_channel'])
