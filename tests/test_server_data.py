"""The server's own labelled public set (sites.json ``server``): checked like a site's cases, pooled into the
fingerprint, preprocessed with the shared plans on the server's disk."""
import json
import os

import numpy as np
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
    (lambda s: s.__setitem__('server', {'cases': ['X', 'X']}), 'cases'),
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


TRAIN = ['501', '3d_fullres', '0', '--rounds', '2', '--local-iterations', '2', '--val-iterations', '1', '-p',
         'nnUNetCPUPlans', '-device', 'cpu']


def _final_weights(folder):
    import torch
    return torch.load(os.path.join(folder, 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                      weights_only=True)['network_weights']


def test_server_iterations_train_the_merged_model_on_the_public_set(server_holds_c):
    """fedavg --server-iterations: every round's global model is the merge trained on the server's public set (the
    server's own nnU-Net model folder holds the same final model); without them the same seeded run differs."""
    import torch
    from fednnunet.cli import train_entry
    from fednnunet.server_data import ServerTrainer
    from fednnunet.site_training import results_folder
    from fednnunet.strategies import FedAvg
    from fednnunet.trainers.fedavg import FedAvgTrainer
    base = results_folder(DATASET_NAME, FedAvgTrainer, 'nnUNetCPUPlans', '3d_fullres')
    merged, trained = [], []
    aggregate, fit = FedAvg.aggregate, ServerTrainer.fit
    with pytest.MonkeyPatch.context() as mp:  # (the fixtures' own patches stay)
        mp.setattr(FedAvg, 'aggregate', lambda self, *a: merged.append(aggregate(self, *a)) or merged[-1])
        mp.setattr(ServerTrainer, 'fit', lambda self, *a: trained.append(fit(self, *a)) or trained[-1])
        train_entry(TRAIN + ['--method', 'fedavg', '--server-iterations', '3'])
    assert len(merged) == len(trained) == 2
    saved = torch.load(os.path.join(base, 'fold_0', 'federated_round_latest.pth'), weights_only=True)['global_state']
    # the round's global model is what the server trained, and not the plain merge of the sites' updates
    assert all(np.array_equal(saved[k].numpy(), trained[-1].arrays[k]) for k in saved)
    assert any(not np.array_equal(merged[-1][k], trained[-1].arrays[k]) for k in saved)
    log = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
    assert [sorted(r['sites']) for r in log] == [['A', 'B']] * 2
    for r in log:
        assert np.isfinite(r['server']['train_loss']) and r['server']['num_training_cases'] > 0
    server_log = open(os.path.join(base, 'sites', SERVER_DATA, 'fold_0', 'training_log.txt')).read()
    assert server_log.count('validation (before local training) measured the received model') == 2
    with_server = _final_weights(base)
    server_own = _final_weights(os.path.join(base, 'sites', SERVER_DATA))
    assert all(torch.equal(with_server[k], server_own[k]) for k in with_server)
    summary = json.load(open(os.path.join(base, 'fold_0', 'federated_summary.json')))
    assert summary['server_validation'] is not None

    train_entry(TRAIN + ['--method', 'fedavg', '--overwrite'])
    without = _final_weights(base)
    assert any(not torch.equal(with_server[k], without[k]) for k in with_server)


def test_server_iterations_need_a_public_set_and_a_merged_model(planned, fresh_results):
    from fednnunet.method_options import check_strategy_options
    from fednnunet.training_server import FederatedTraining, TrainingConfig
    with pytest.raises(SystemExit):  # the command line names the problem and stops (no public set in sites.json)
        from fednnunet.cli import train_entry
        train_entry(TRAIN + ['--method', 'fedavg', '--server-iterations', '2'])
    federation = Federation.from_raw(DATASET_NAME)
    config = TrainingConfig(DATASET_NAME, '3d_fullres', 0, 'fedavg', 'nnUNetCPUPlans', 1, 1, 1,
                            strategy_options={'server_iterations': 2})
    with pytest.raises(FederationError) as e:
        FederatedTraining(SimulationEngine.for_federation(federation, device='cpu'), config).run()
    assert e.value.field == 'server'
    for method in ('lcfed', 'local'):
        with pytest.raises(ValueError, match='server iterations'):
            check_strategy_options({'weighting': 'num_examples', 'server_iterations': 2}, method)
    with pytest.raises(ValueError, match='whole number'):
        check_strategy_options({'weighting': 'num_examples', 'server_iterations': 1.5}, 'fedavg')


@pytest.mark.parametrize('field, value', [('num_cases', -1), ('num_cases', 10 ** 9), ('num_cases', True),
                                          ('num_unlabelled', 2.5), ('num_validation', '3'),
                                          ('gpu_memory_gb', float('nan')), ('gpu_memory_gb', -4),
                                          ('network', '../../x')])
def test_negotiation_refuses_a_description_that_lies_about_its_counts_or_device(planned, field, value):
    """A site's description is data from the network: counts that are no counts, a memory that is no memory and a
    network no planner knows stop the planning with the site and the field named."""
    from fednnunet.planners.negotiation import describe_site, negotiate
    federation = Federation.from_raw(DATASET_NAME)
    descriptions = [describe_site(s) for s in federation.sites.values()]
    descriptions[1][field] = value
    with pytest.raises(FederationError) as e:
        negotiate(descriptions)
    assert (e.value.site, e.value.field) == (descriptions[1]['site'], field)


def test_planning_refuses_a_federation_in_which_no_participant_has_a_labelled_case(planned):
    """Every site unlabelled-only (each hospital's own sites.json accepted it): nnU-Net plans from labelled cases,
    so the negotiation stops before any fingerprint; a server's labelled public set is enough."""
    from fednnunet.planners.negotiation import describe_site, negotiate
    federation = Federation.from_raw(DATASET_NAME)
    descriptions = [describe_site(s) for s in federation.sites.values()]
    for d in descriptions:
        d['num_unlabelled'], d['num_cases'] = d['num_cases'], 0
    with pytest.raises(FederationError, match='no site has a labelled training case') as e:
        negotiate(descriptions)
    assert e.value.field == 'cases'
    descriptions[0]['num_cases'] = 2
    negotiate(descriptions)
