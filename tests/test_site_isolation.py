"""A site reads only its own cases: shown with separate raw folders per site, and with strace on one
site's own process."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from fednnunet.engines.simulation import SimulationEngine
from fednnunet.federation import Federation, server_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess

from conftest import DATASET_NAME, point_nnunet_folder


def _fingerprint_and_plans(folder):
    with open(os.path.join(folder, 'dataset_fingerprint.json')) as f:
        fp = json.load(f)
    with open(os.path.join(folder, 'nnUNetCPUPlans.json')) as f:
        plans = json.load(f)
    return fp, plans


def test_sites_with_only_their_own_files_give_the_pooled_result(raw_copy, tmp_path, monkeypatch):
    pooled = Federation.from_folder(str(raw_copy))
    plan_and_preprocess(SimulationEngine.for_federation(pooled), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
    fp_pooled, plans_pooled = _fingerprint_and_plans(server_folder(DATASET_NAME))

    # every site gets a raw folder holding only its own cases (as on its own machine); the pooled folder keeps
    # only dataset.json and sites.json, so any read of another site's file would fail
    spec = {'sites': {}}
    for site in pooled.sites.values():
        own = tmp_path / 'hospitals' / site.name / DATASET_NAME
        for sub in ('imagesTr', 'labelsTr'):
            (own / sub).mkdir(parents=True)
        shutil.copy(raw_copy / 'dataset.json', own / 'dataset.json')
        for case in site.cases:
            for f in site.image_files(case):
                shutil.copy(f, own / 'imagesTr')
            shutil.copy(site.label_file(case), own / 'labelsTr')
        spec['sites'][site.name] = {'cases': list(site.cases), 'raw_folder': str(own)}
    shutil.rmtree(raw_copy / 'imagesTr')
    shutil.rmtree(raw_copy / 'labelsTr')
    with open(raw_copy / 'sites.json', 'w') as f:
        json.dump(spec, f)
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', tmp_path / 'separate_preprocessed')
    os.makedirs(tmp_path / 'separate_preprocessed')

    separate = Federation.from_folder(str(raw_copy))
    plan_and_preprocess(SimulationEngine.for_federation(separate), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
    fp_separate, plans_separate = _fingerprint_and_plans(server_folder(DATASET_NAME))
    assert fp_separate == fp_pooled
    assert plans_separate == plans_pooled


SITE_PROCESS = r'''
import sys
from fednnunet.federation import Federation
from fednnunet.site_worker import SiteWorker
from fednnunet.wire import Message
from fednnunet.fingerprint import samples_per_case
fed = Federation.from_folder(sys.argv[1], only_sites=[sys.argv[2]])
site = fed.sites[sys.argv[2]]
worker = SiteWorker(site, fed.dataset_name, num_processes=1)
d = worker.handle(Message('describe')).config
worker.handle(Message('fingerprint', {'reader_writer': d['reader_writer'], 'num_samples_per_case': samples_per_case(7)}))
print('site process done')
'''


@pytest.mark.skipif(shutil.which('strace') is None, reason='strace is not installed')
def test_a_site_process_never_opens_another_sites_files(raw_copy, tmp_path):
    fed = Federation.from_folder(str(raw_copy))
    own, others = 'B', [c for s in fed.sites.values() if s.name != 'B' for c in s.cases]
    log = tmp_path / 'strace.log'
    # every open or stat of a file counts (listing the pooled labelsTr to check sites.json reads no file)
    proc = subprocess.run(['strace', '-f', '-qq', '-e', 'trace=open,openat,openat2,stat,newfstatat,statx',
                           '-o', str(log), sys.executable, '-c', SITE_PROCESS, str(raw_copy), own],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'site process done' in proc.stdout
    opened = [line for line in log.read_text().splitlines() if DATASET_NAME in line and '.nii.gz' in line]
    assert any(f'{fed.sites[own].cases[0]}_0000.nii.gz' in line for line in opened), 'strace saw no own file'
    leaked = [line for line in opened if any(f'/{case}_0000.nii.gz' in line or f'/{case}.nii.gz' in line
                                             for case in others)]
    assert leaked == []
