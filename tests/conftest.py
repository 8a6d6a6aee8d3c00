"""Shared fixtures: a tiny 3-site demo federation (32^3 volumes) and nnU-Net's folders in tmp dirs."""
import importlib
import os
import pkgutil
import shutil
import sys

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
    with pytest.MonkeyPatch.context() as mp:
        for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
            os.makedirs(root / var)
            point_nnunet_folder(mp, var, root / var)
        mp.setenv('nnUNet_n_proc_DA', '0')
        # every fednnunet module (and the nnunetv2 modules they use) imported now, with the session's folders: a
        # module imported first inside a test's private folders would otherwise keep them after that test
        import fednnunet
        for module in pkgutil.walk_packages(fednnunet.__path__, 'fednnunet.'):
            importlib.import_module(module.name)
        yield root


@pytest.fixture(scope='session')
def demo_raw(nnunet_environment):
    """The pooled raw folder of the tiny demo federation (read-only for tests: copy before changing)."""
    return build_demo_federation(DATASET_ID, raw_root=os.environ['nnUNet_raw'], size=TINY_SIZE, sites=TEST_SITES,
                                 seed=0, verbose=False)


def no_fork_pools(monkeypatch):
    """nnU-Net's file listing (nnunetv2.utilities.utils) starts a default, forking multiprocessing Pool; forked from
    this test process, which by then runs many threads (torch, tqdm, earlier tests), a worker can deadlock on a lock
    another thread held (seen once in a full run, stuck for minutes). Stock nnU-Net calls in the tests get a spawn
    pool instead; fednnunet's own code never lists files through it."""
    import multiprocessing
    import nnunetv2.utilities.utils as nnunet_utils
    monkeypatch.setattr(nnunet_utils, 'Pool', multiprocessing.get_context('spawn').Pool)


def point_nnunet_folder(monkeypatch, var: str, folder):
    """Points nnU-Net's folder ``var`` (nnUNet_raw/_preprocessed/_results) at ``folder`` until ``monkeypatch``
    undoes it. nnunetv2 reads its folders once, when nnunetv2.paths is first imported, and every module keeps the
    value it imported (fednnunet follows nnU-Net there); so the value is replaced in every loaded nnunetv2 and
    fednnunet module that holds it, and in the environment (for subprocesses and for modules imported later)."""
    monkeypatch.setenv(var, str(folder))
    for name, module in list(sys.modules.items()):
        if name.split('.')[0] in ('nnunetv2', 'fednnunet') and \
                isinstance(getattr(module, '__dict__', {}).get(var), str):
            monkeypatch.setattr(module, var, str(folder))


@pytest.fixture
def fresh_preprocessed(tmp_path, monkeypatch):
    """A private nnUNet_preprocessed for one test."""
    folder = tmp_path / 'nnUNet_preprocessed'
    folder.mkdir()
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', folder)
    return folder


@pytest.fixture
def raw_copy(demo_raw, tmp_path, monkeypatch):
    """A private, editable copy of the demo raw dataset, with nnU-Net's folders pointing at tmp_path."""
    raw_root = tmp_path / 'nnUNet_raw'
    shutil.copytree(demo_raw, raw_root / DATASET_NAME)
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / var).mkdir(exist_ok=True)
        point_nnunet_folder(monkeypatch, var, tmp_path / var)
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
    point_nnunet_folder(monkeypatch, 'nnUNet_results', folder)
    return folder
