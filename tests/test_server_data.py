"""The server's own labelled public set (sites.json ``server``): checked like a site's cases, pooled into the
fingerprint, preprocessed with the shared plans on the server's disk."""
import json
import os

import pytest

from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import SERVER_DATA, SITES_FILE, Federation, server_folder, site_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.server_data import WithServerData, planning_engine

from conftest import DATASET_NAME


def _edit_sites(raw, edit):
    with open(raw / SITES_FILE) as f:
        spec = json.load(f)
    edit(spec)
    with open(raw / SITES_FILE, 'w') as f:
        json.dump(spec, f)


def _c_at_the_server(spec):
    spec['server'] = {'cases': spec['sites'].pop('C')['cases']}


@pytest.fixture
def server_holds_c(planned, nnunet_environment, raw_copy):
    """Site C's cases become the server's public set; returns (federation, the three-site planning's folder)."""
    _edit_sites(raw_copy, _c_at_the_server)
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(planning_engine(SimulationEngine.for_federation(federation), federation), DATASET_NAME,
                        ['3d_fullres'], 'nnUNetPlannerCPU')
    return federation, nnunet_environment / 'nnUNet_preprocessed' / DATASET_NAME


def test_the_server_public_set_is_planned_like_a_site_and_preprocessed_on_the_servers_disk(server_holds_c):
    federation, three_sites = server_holds_c
    assert list(federation.sites) == ['A', 'B'] and federation.server.name == SERVER_DATA
    here = server_folder(DATASET_NAME)
    # pooled into the fingerprint: the same fingerprint and plans as when C took part as a site
    for f in ('dataset_fingerprint.json', 'nnUNetCPUPlans.json'):
        with open(os.path.join(here, f)) as a, open(three_sites / f) as b:
            assert json.load(a) == json.load(b), f
    negotiation = json.load(open(os.path.join(here, 'federation', 'negotiation_nnUNetCPUPlans.json')))
    assert negotiation['sites'][SERVER_DATA]['num_cases'] == len(federation.server.cases)
    folder = site_folder(DATASET_NAME, SERVER_DATA)
    for case in federation.server.cases:
        assert os.path.isfile(os.path.join(folder, 'nnUNetCPUPlans_3d_fullres', case + '.pkl'))
        assert os.path.isfile(os.path.join(folder, 'gt_segmentations', case + '.nii.gz'))
    assert os.path.isfile(os.path.join(folder, 'splits_final.json'))
    assert not os.path.isdir(site_folder(DATASET_NAME, 'C'))


@pytest.mark.parametrize('edit, field', [
    (lambda s: s['sites'].__setitem__(SERVER_DATA, s['sites'].pop('C')), 'name'),  # a site may not take the name
    (lambda s: s.__setitem__('server', {'cases': []}), 'cases'),
    (lambda s: s.__setitem__('server', {'cases': s['sites']['C']['cases'][:1]}), 'sites.json'),  # also C's case
    (lambda s: s.__setitem__('server', {'cases': ['X'], 'unlabelled': ['Y']}), 'sites.json'),
    (lambda s: s.__setitem__('server', {'cases': ['X'], 'gpu_memory_gb': -1}), 'gpu_memory_gb'),
    (lambda s: s.__setitem__('sever', {'cases': ['X']}), 'sites.json'),  # a typo is not ignored
])
def test_a_bad_server_entry_is_refused_by_name(raw_copy, edit, field):
    _edit_sites(raw_copy, edit)
    with pytest.raises(FederationError) as e:
        Federation.from_raw(DATASET_NAME)
    assert e.value.field == field, str(e.value)


def test_a_missing_public_file_names_the_server_and_the_case(raw_copy):
    _edit_sites(raw_copy, _c_at_the_server)
    case = json.load(open(raw_copy / SITES_FILE))['server']['cases'][0]
    os.remove(raw_copy / 'labelsTr' / f'{case}.nii.gz')
    with pytest.raises(FederationError) as e:
        Federation.from_raw(DATASET_NAME)
    assert (e.value.site, e.value.case, e.value.field) == (SERVER_DATA, case, 'label')


def test_a_site_cannot_speak_for_the_server_or_another_site(raw_copy):
    """A site whose description names another participant is planned under the name the engine knows it by."""
    federation = Federation.from_raw(DATASET_NAME)
    engine = SimulationEngine.for_federation(federation)
    honest = engine.workers['B'].describe
    engine.workers['B'].describe = lambda m: type(m)('description', {**honest(m).config, 'site': SERVER_DATA})
    engine.workers['B'].handlers['describe'] = engine.workers['B'].describe
    summary = plan_and_preprocess(engine, DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU', preprocess=False)
    assert sorted(summary['sites']) == ['A', 'B', 'C']
    with pytest.raises(FederationError, match="calls itself 'server'"):
        WithServerData(type('E', (), {'site_names': ['A', SERVER_DATA], 'bytes_sent': {}, 'bytes_received': {}})(),
                       None)
