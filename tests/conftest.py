"""Shared fixtures: a tiny 3-site demo federation (32^3 volumes) and nnU-Net's folders in tmp dirs."""
import os
import shutil

# before nnunetv2 is imported anywhere: one process for nnU-Net's pools, single-threaded augmentation (2-core CI)
os.environ.setdefault('nnUNet_def_n_proc', '1')
os.environ['nnUNet_n_proc_DA'] = '0'

import pytest

from fednnunet.demo import TEST_SITES, build_demo_federation, dataset_folder_name

DATASET_ID = 501
DATASET_NAME = dataset_folder_name(DATASET_ID)
TINY_SIZE = 32


@pytest.fixture(scope='session', autouse=True)
def nnunet_environment(tmp_path_factory):
    """nnU-Net's three folders point into a session tmp dir; single-threaded augmentation (2-core CI)."""
    root = tmp_path_factory.mktemp('nnunet')
    old = {k: os.environ.get(k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results',
                                          'nnUNet_n_proc_DA')}
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = str(root / var)
        os.makedirs(os.environ[var])
    os.environ['nnUNet_n_proc_DA'] = '0'
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope='session')
def demo_raw(nnunet_environment):
    """The pooled raw folder of the tiny demo federation (read-only for tests: copy before changing)."""
    return build_demo_federation(DATASET_ID, raw_root=os.environ['nnUNet_raw'], size=TINY_SIZE, sites=TEST_SITES,
                                 seed=0, verbose=False)


@pytest.fixture
def fresh_preprocessed(tmp_path, monkeypatch):
    """A private nnUNet_preprocessed for one test."""
    folder = tmp_path / 'nnUNet_preprocessed'
    folder.mkdir()
    monkeypatch.setenv('nnUNet_preprocessed', str(folder))
    return folder


@pytest.fixture
def raw_copy(demo_raw, tmp_path, monkeypatch):
    """A private, editable copy of the demo raw dataset, with nnU-Net's folders pointing at tmp_path."""
    raw_root = tmp_path / 'nnUNet_raw'
    shutil.copytree(demo_raw, raw_root / DATASET_NAME)
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / var).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / var))
    return raw_root / DATASET_NAME


@pytest.fixture(scope='session')
def planned(demo_raw):
    """The tiny federation planned with the CPU preset and preprocessed (2d, 3d_fullres) at every site, in the
    session's nnUNet_preprocessed. Returns the Federation."""
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    federation = Federation.from_raw(DATASET_ID)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['2d', '3d_fullres'],
                        'nnUNetPlannerCPU')
    return federation


@pytest.fixture
def fresh_results(tmp_path, monkeypatch):
    """A private nnUNet_results for one test."""
    folder = tmp_path / 'nnUNet_results'
    folder.mkdir()
    monkeypatch.setenv('nnUNet_results', str(folder))
    return folder
