"""A site refuses what a malicious server could send to steer its disk or its imports (issue 10), before it
writes, removes or imports anything; and what it sends back on an error carries no folder of its machine."""
import copy
import json
import os
import sys

import numpy as np
import pytest

from fednnunet import server_input
from fednnunet.errors import FederationError
from fednnunet.federation import Federation, server_folder, site_folder
from fednnunet.site_worker import SiteWorker
from fednnunet.wire import Message

from conftest import DATASET_ID, DATASET_NAME
from test_training import PLANS


def _tree(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[path] = os.lstat(path).st_mtime_ns
    return out


@pytest.fixture
def worker(planned):
    return SiteWorker(Federation.from_raw(DATASET_ID).sites['A'], DATASET_NAME, device='cpu')


@pytest.fixture
def plans():
    with open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')) as f:
        return json.load(f)


def _dataset_json():
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset.json')) as f:
        return json.load(f)


@pytest.mark.parametrize('edit, field', [
    (lambda p: p['configurations']['3d_fullres'].update(data_identifier='../../../escaped'), 'data_identifier'),
    (lambda p: p['configurations']['3d_fullres'].update(data_identifier='/tmp/escaped'), 'data_identifier'),
    (lambda p: p.update(plans_name='../../evil'), 'plans_name'),
    (lambda p: p['configurations'].update({'../x': p['configurations']['2d']}), 'plans.configurations'),
    (lambda p: p['configurations']['3d_fullres'].update(preprocessor_name='../Evil'), 'preprocessor_name'),
])
def test_path_like_names_in_plans_are_refused_and_nothing_changes(worker, plans, tmp_path, edit, field):
    edit(plans)
    root = os.path.dirname(os.path.dirname(worker.folder))  # the dataset's preprocessed folder, all sites
    before = _tree(root)
    request = Message('preprocess', {'plans': plans, 'dataset_json': _dataset_json(), 'configurations': ['3d_fullres']})
    with pytest.raises(FederationError, match=f"site 'A', field '[^']*{field.split('.')[-1]}") as e:
        worker.handle(request)
    assert 'not a valid name' in str(e.value)
    assert _tree(root) == before and not os.path.exists('/tmp/escaped')


def test_a_file_ending_with_a_path_is_refused(worker, plans):
    dataset_json = dict(_dataset_json(), file_ending='/../../../x.nii.gz')
    with pytest.raises(FederationError, match="field 'file_ending'"):
        worker.handle(Message('preprocess', {'plans': plans, 'dataset_json': dataset_json,
                                             'configurations': ['3d_fullres']}))


def test_a_class_that_is_not_allow_listed_is_refused_before_it_is_imported(worker, plans, tmp_path, monkeypatch):
    marker = tmp_path / 'imported'
    (tmp_path / 'evil_module.py').write_text(f'open({str(marker)!r}, "w").write("ran")\nclass Net: pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = plans['configurations']['3d_fullres']['architecture']
    cases = [
        ({**arch, 'network_class_name': 'evil_module.Net'}, 'network_class_name'),
        ({**arch, 'arch_kwargs': {**arch['arch_kwargs'], 'nonlin': 'evil_module.Net'}}, 'arch_kwargs.nonlin'),
        ({**arch, 'arch_kwargs': {**arch['arch_kwargs'], 'nonlin': 'subprocess.Popen'}}, 'arch_kwargs.nonlin'),
        ({**arch, 'arch_kwargs': {**arch['arch_kwargs'], 'block': 'evil_module.Net'},
          '_kw_requires_import': list(arch['_kw_requires_import']) + ['block']}, '_kw_requires_import'),
        ({'network_class_name': 'fednnunet.networks.feddp.FedDPUNet',
          'arch_kwargs': {**arch['arch_kwargs'], 'base_network_class_name': 'evil_module.Net', 'wrapper': {}},
          '_kw_requires_import': arch['_kw_requires_import']}, 'arch_kwargs.base_network_class_name'),
    ]
    for bad, field in cases:
        p = copy.deepcopy(plans)
        p['configurations']['3d_fullres']['architecture'] = bad
        with pytest.raises(FederationError, match=f"field 'configurations.3d_fullres.architecture.{field}'.*"
                                                  r"(refused before anything was imported|not a keyword)"):
            worker.handle(Message('preprocess', {'plans': p, 'dataset_json': _dataset_json(),
                                                 'configurations': ['3d_fullres']}))
    assert not marker.exists() and 'evil_module' not in sys.modules
    # nnU-Net's own planners' classes pass, in both spellings torch offers
    ok = copy.deepcopy(plans)
    ok['configurations']['3d_fullres']['architecture']['arch_kwargs']['nonlin'] = 'torch.nn.ReLU'
    server_input.plans(ok)


def _training_request(**change):
    config = {'method': 'fedavg', 'configuration': '3d_fullres', 'fold': 0, 'plans_identifier': PLANS, 'rounds': 2,
              'local_iterations': 2, 'val_iterations': 1, 'seed': 1, 'hyperparameters': {}, 'site_index': 0,
              'num_sites': 3, 'run_id': 'a' * 32, 'overwrite': False, 'continue': False, 'round': 0}
    config.update(change)
    return config


@pytest.mark.parametrize('kind', ['check_training', 'fit', 'finish'])
@pytest.mark.parametrize('change, field', [
    ({'run_id': '../../../../tmp/x'}, 'run_id'),
    ({'fold': '../../x'}, 'fold'),
    ({'fold': 7}, 'fold'),
    ({'plans_identifier': '/etc/passwd'}, 'plans_identifier'),
    ({'configuration': '../../3d_fullres'}, 'configuration'),
    ({'method': 'os.system'}, 'method'),
    ({'site_index': 3}, 'site_index'),
    ({'rounds': 0}, 'rounds'),
    ({'hyperparameters': {'mu': 'rm -rf'}}, 'hyperparameters'),
    ({'hyperparameters': {'mu': float('nan')}}, 'hyperparameters'),
    ({'hyperparameters': {'mu': float('inf')}}, 'hyperparameters'),
    ({'overwrite': 'yes'}, 'overwrite'),
])
def test_training_requests_with_path_like_or_bad_values_are_refused(worker, fresh_results, kind, change, field):
    before = _tree(str(fresh_results))
    with pytest.raises(FederationError, match=f"site 'A', field '{field}'"):
        worker.handle(Message(kind, _training_request(**change)))
    assert _tree(str(fresh_results)) == before


@pytest.mark.parametrize('change, field', [
    ({'results_folder_name': '../../../etc'}, 'results_folder_name'),
    ({'results_folder_name': 'FedAvgTrainer__nnUNetCPUPlans'}, 'results_folder_name'),
    ({'checkpoint': '../../checkpoint_final.pth'}, 'checkpoint'),
    ({'checkpoint': 'payload.py'}, 'checkpoint'),
    ({'model': '../site'}, 'model'),
    ({'fold': 'all/../..'}, 'fold'),
])
def test_evaluate_requests_with_path_like_values_are_refused(worker, fresh_results, change, field):
    config = {'results_folder_name': f'FedAvgTrainer__{PLANS}__3d_fullres', 'model': 'site',
              'checkpoint': 'checkpoint_final.pth', 'fold': 0, **change}
    before = _tree(str(fresh_results))
    with pytest.raises(FederationError, match=f"site 'A', field '{field}'"):
        worker.handle(Message('evaluate', config))
    assert _tree(str(fresh_results)) == before


def test_inside_follows_symbolic_links(tmp_path):
    (tmp_path / 'site').mkdir()
    os.symlink('/tmp', tmp_path / 'site' / 'link')
    with pytest.raises(FederationError):
        server_input.inside(str(tmp_path / 'site' / 'link' / 'x'), str(tmp_path / 'site'), 'f')
    assert server_input.inside(str(tmp_path / 'site' / 'a' / 'b'), str(tmp_path / 'site'), 'f')


# ---------------------------------------------------------------- count queries: the search's schedule only
def test_count_queries_beyond_the_search_schedule_are_refused(raw_copy):
    from fednnunet.fingerprint import MAX_COUNT_QUERIES, MAX_PLANNINGS, MAX_THRESHOLDS_PER_CHANNEL
    fed = Federation.from_folder(str(raw_copy), only_sites=['C'])
    worker = SiteWorker(fed.sites['C'], DATASET_NAME)
    worker.handle(Message('fingerprint', {'reader_writer': 'SimpleITKIO', 'num_samples_per_case': 1000}))
    for _ in range(MAX_COUNT_QUERIES):
        reply = worker.handle(Message('count_leq', arrays={'0': np.linspace(0, 300, 50, dtype=np.float32)}))
        assert reply.arrays['0'].shape == (50,)
    with pytest.raises(FederationError, match=f"site 'C', field 'count_leq'.*more than {MAX_COUNT_QUERIES}"):
        worker.handle(Message('count_leq', arrays={'0': np.array([100.0], dtype=np.float32)}))
    # a new planning opens a new budget; too many thresholds, an unknown channel or NaN are refused
    worker.handle(Message('fingerprint', {'reader_writer': 'SimpleITKIO', 'num_samples_per_case': 1000}))
    for bad, what in (({'0': np.zeros(MAX_THRESHOLDS_PER_CHANNEL + 1, np.float32)}, 'thresholds'),
                      ({'1': np.zeros(3, np.float32)}, 'channel'), ({'0': np.array([np.nan], np.float32)}, 'finite')):
        with pytest.raises(FederationError, match=what):
            worker.handle(Message('count_leq', arrays=bad))
    worker.handle(Message('release_fingerprint'))
    with pytest.raises(FederationError, match='no private sample'):
        worker.handle(Message('count_leq', arrays={'0': np.array([1.0], np.float32)}))
    for _ in range(MAX_PLANNINGS - 2):
        worker.handle(Message('fingerprint', {'reader_writer': 'SimpleITKIO', 'num_samples_per_case': 1000}))
    with pytest.raises(FederationError, match=f'answered {MAX_PLANNINGS} plannings'):
        worker.handle(Message('fingerprint', {'reader_writer': 'SimpleITKIO', 'num_samples_per_case': 1000}))
    with pytest.raises(FederationError, match="field 'reader_writer'"):
        worker.handle(Message('fingerprint', {'reader_writer': '../x', 'num_samples_per_case': 1000}))


def test_the_honest_planning_stays_within_the_schedule(raw_copy):
    """The real federated fingerprint (every site, the order-statistic search) needs no more than the budget."""
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.fingerprint import MAX_COUNT_QUERIES
    from fednnunet.plan_and_preprocess import federated_fingerprint
    fed = Federation.from_folder(str(raw_copy))
    result = federated_fingerprint(SimulationEngine.for_federation(fed))
    assert result['count_rounds'] <= MAX_COUNT_QUERIES


# ---------------------------------------------------------------- what goes back on an error
def test_error_replies_carry_no_folder_of_the_site(worker, tmp_path):
    from fednnunet.engines.flower import CONFIG_RECORD, error_record, handle_site_message
    error = FederationError(f'image file {tmp_path}/hospital/raw/imagesTr/A_001_0000.nii.gz is missing', site='A',
                            case='A_001', field='channel 0')
    record = error_record(error, 'A')[CONFIG_RECORD]
    assert str(tmp_path) not in record['error'] and '/hospital/' not in record['error']
    assert "site 'A', case 'A_001', field 'channel 0'" in record['error'] and 'A_001_0000.nii.gz' in record['error']
    # end to end through the ClientApp's handler: a request that fails at the site
    from fednnunet.engines.flower import to_record_dict
    reply = handle_site_message(lambda: worker, to_record_dict(Message('fit', _training_request(fold=9))), site='A')
    text = reply[CONFIG_RECORD]['error']
    assert "field 'fold'" in text and site_folder(DATASET_NAME, 'A') not in text
