"""Per-site preprocessing: nnU-Net's own output for each site's cases, per-site splits that never mix sites."""
import json
import os
import shutil

import numpy as np
import pytest

from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import Federation, server_folder, site_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.preprocessing import site_splits

from conftest import DATASET_ID, DATASET_NAME, no_fork_pools, point_nnunet_folder

CONFIGS = ('2d', '3d_fullres')


@pytest.fixture(scope='module')
def preprocessed(demo_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp('pp')
    with pytest.MonkeyPatch.context() as mp:
        point_nnunet_folder(mp, 'nnUNet_preprocessed', root / 'federated')
        fed = Federation.from_raw(DATASET_ID)
        summary = plan_and_preprocess(SimulationEngine.for_federation(fed), DATASET_NAME, CONFIGS, 'nnUNetPlannerCPU')
        # stock nnU-Net preprocessing of the pooled data with the very same plans
        stock = root / 'stock' / DATASET_NAME
        os.makedirs(stock)
        for f in ('nnUNetCPUPlans.json', 'dataset.json'):
            shutil.copy(os.path.join(server_folder(DATASET_NAME), f), stock / f)
        point_nnunet_folder(mp, 'nnUNet_preprocessed', root / 'stock')
        no_fork_pools(mp)
        preprocess_dataset(DATASET_ID, 'nnUNetCPUPlans', CONFIGS, [1], show_progress_bar=False)
        point_nnunet_folder(mp, 'nnUNet_preprocessed', root / 'federated')
        sites = {s: site_folder(DATASET_NAME, s) for s in fed.sites}
    return {'federation': fed, 'summary': summary, 'sites': sites, 'stock': stock,
            'root': root / 'federated', 'server': os.path.join(root / 'federated', DATASET_NAME)}


def test_each_site_holds_nnunets_own_preprocessing_of_its_cases(preprocessed):
    fed, stock = preprocessed['federation'], preprocessed['stock']
    assert preprocessed['summary']['preprocessed'] == {c: sorted(fed.sites) for c in CONFIGS}
    for name, folder in preprocessed['sites'].items():
        own = list(fed.sites[name].cases)
        for c in CONFIGS:
            data_folder = os.path.join(folder, f'nnUNetCPUPlans_{c}')
            assert sorted(nnUNetDatasetBlosc2.get_identifiers(data_folder)) == own
            mine = nnUNetDatasetBlosc2(data_folder, own)
            theirs = nnUNetDatasetBlosc2(str(stock / f'nnUNetCPUPlans_{c}'), own)
            for case in own:
                d1, s1, _, p1 = mine.load_case(case)
                d2, s2, _, p2 = theirs.load_case(case)
                np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
                np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
                assert p1['shape_after_cropping_and_before_resampling'] == \
                    p2['shape_after_cropping_and_before_resampling']
        assert sorted(os.listdir(os.path.join(folder, 'gt_segmentations'))) == sorted(c + '.nii.gz' for c in own)
        for f in ('dataset.json', 'nnUNetCPUPlans.json'):
            with open(os.path.join(folder, f)) as a, open(os.path.join(preprocessed['server'], f)) as b:
                assert json.load(a) == json.load(b)
        assert not any(n.endswith('.partial') for n in os.listdir(folder))


def test_splits_are_per_site_and_valid_for_every_fold(preprocessed):
    fed = preprocessed['federation']
    for name, folder in preprocessed['sites'].items():
        with open(os.path.join(folder, 'splits_final.json')) as f:
            splits = json.load(f)
        own = set(fed.sites[name].cases)
        assert len(splits) == 5
        for fold in splits:
            assert set(fold['train']) | set(fold['val']) == own  # never another site's case
            assert fold['val'] and fold['train']
            if len(own) > 1:
                assert not set(fold['train']) & set(fold['val'])


def test_site_splits_follow_nnunet():
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    cases = [f'X_{i:03d}' for i in range(7)]
    assert site_splits(cases) == generate_crossval_split(cases, seed=12345, n_splits=5)
    three = site_splits(['a', 'b', 'c'])
    assert len(three) == 5 and sorted(v for s in three[:3] for v in s['val']) == ['a', 'b', 'c']
    assert site_splits(['only']) == [{'train': ['only'], 'val': ['only']}] * 5


def test_rerun_replaces_outputs_atomically(preprocessed, monkeypatch):
    """Preprocessing again (e.g. after adding a case) rewrites complete folders and keeps a valid split."""
    fed = preprocessed['federation']
    folder = preprocessed['sites']['A']
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', preprocessed['root'])
    before = sorted(os.listdir(os.path.join(folder, 'nnUNetCPUPlans_3d_fullres')))
    from fednnunet.site_worker import SiteWorker
    from fednnunet.wire import Message
    with open(os.path.join(server_folder(DATASET_NAME), 'nnUNetCPUPlans.json')) as f:
        plans = json.load(f)
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset.json')) as f:
        dj = json.load(f)
    SiteWorker(fed.sites['A'], DATASET_NAME).handle(
        Message('preprocess', {'plans': plans, 'dataset_json': dj, 'configurations': ['3d_fullres']}))
    assert sorted(os.listdir(os.path.join(folder, 'nnUNetCPUPlans_3d_fullres'))) == before
