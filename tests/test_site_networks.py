"""Per-site networks: configurations per capacity inheriting from the shared one, chosen by sites.json or by memory,
built by nnU-Net's trainer and loaded by nnU-Net's predictor."""
import json
import os

import numpy as np
import pytest
import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import SITES_FILE, Federation, server_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess
from fednnunet.planners.site_networks import (NETWORKS, RESENC_CLASS, add_site_networks, estimated_memory_gb,
                                              network_configuration)
from fednnunet.server_data import planning_engine

from conftest import DATASET_NAME

PLANS = 'nnUNetCPUPlans'


def _plans_and_dataset_json():
    folder = server_folder(DATASET_NAME)
    return (json.load(open(os.path.join(folder, PLANS + '.json'))),
            json.load(open(os.path.join(folder, 'dataset.json'))))


def _network(plans, dataset_json, configuration):
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return nnUNetTrainer.build_network_architecture(pm, cm, 1, pm.get_label_manager(dataset_json).num_segmentation_heads,
                                                    False), cm


@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_every_network_shares_the_negotiated_geometry_and_its_outputs_align(planned, configuration):
    plans, dataset_json = _plans_and_dataset_json()
    plans, assignment = add_site_networks(plans, dataset_json, {'A': {'network': 'plain'}, 'B': {'network': 'resenc'},
                                                                'server': {'network': 'resenc_wide'}})
    assert assignment['A'][configuration] == configuration
    assert assignment['B'][configuration] == f'{configuration}_resenc'
    shared = PlansManager(plans).get_configuration(configuration)
    sizes, shapes = [], []
    for network in NETWORKS:
        net, cm = _network(plans, dataset_json, network_configuration(configuration, network))
        for field in ('patch_size', 'spacing', 'data_identifier', 'normalization_schemes', 'batch_size'):
            assert getattr(cm, field) == getattr(shared, field), (network, field)
        assert (cm.network_arch_class_name == RESENC_CLASS) == (network != 'plain')
        x = torch.zeros((1, 1, *shared.patch_size))
        with torch.no_grad():
            shapes.append(tuple(net(x).shape))
        sizes.append(sum(p.numel() for p in net.parameters()))
    assert len(set(shapes)) == 1 and shapes[0][2:] == tuple(shared.patch_size)  # voxel for voxel
    assert sizes[0] < sizes[1] < sizes[2]  # plain < residual encoder < wide residual encoder


def test_auto_takes_the_largest_network_that_fits_the_declared_memory(planned):
    plans, dataset_json = _plans_and_dataset_json()
    with_all, _ = add_site_networks(plans, dataset_json, {n: {'network': n} for n in NETWORKS})
    c = '3d_fullres'
    needs = [estimated_memory_gb(PlansManager(with_all).get_configuration(network_configuration(c, n)).configuration[
        'architecture'], plans['configurations'][c]['patch_size'], plans['configurations'][c]['batch_size'], 1, 3)
        for n in NETWORKS]
    assert needs[2] > max(needs[:2])  # twice the features need more (plain and resenc: nnU-Net's own calibrations)
    wishes = {'tiny': {'network': 'auto', 'gpu_memory_gb': min(needs) * 0.99},  # nothing fits: the shared one
              'almost': {'network': 'auto', 'gpu_memory_gb': needs[2] * 0.99},
              'large': {'network': 'auto', 'gpu_memory_gb': needs[2] * 1.01},
              'unknown': {'network': 'auto', 'gpu_memory_gb': None}}
    _, assignment = add_site_networks(plans, dataset_json, wishes)
    assert {s: a[c] for s, a in assignment.items()} == {
        'tiny': c, 'almost': f'{c}_resenc' if needs[1] <= needs[2] * 0.99 else c, 'large': f'{c}_resenc_wide',
        'unknown': c}


def test_planned_per_site_networks_are_in_the_plans_and_load_in_nnunets_predictor(raw_copy, tmp_path):
    spec = json.load(open(raw_copy / SITES_FILE))
    spec['sites']['B']['network'] = 'resenc'
    spec['server'] = {'cases': spec['sites'].pop('C')['cases'], 'network': 'resenc_wide'}
    json.dump(spec, open(raw_copy / SITES_FILE, 'w'))
    federation = Federation.from_raw(DATASET_NAME)
    summary = plan_and_preprocess(planning_engine(SimulationEngine.for_federation(federation), federation),
                                  DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
    assert summary['networks']['B']['3d_fullres'] == '3d_fullres_resenc'
    assert summary['networks']['server']['3d_fullres'] == '3d_fullres_resenc_wide'
    assert summary['networks']['A']['3d_fullres'] == '3d_fullres'
    plans, dataset_json = _plans_and_dataset_json()
    assert plans['configurations']['3d_fullres_resenc']['inherits_from'] == '3d_fullres'
    # a site's checkpoint of its network, in nnU-Net's format, is loaded and run by nnU-Net's own predictor
    model = tmp_path / 'model'
    (model / 'fold_0').mkdir(parents=True)
    json.dump(plans, open(model / 'plans.json', 'w'))
    json.dump(dataset_json, open(model / 'dataset.json', 'w'))
    net, cm = _network(plans, dataset_json, '3d_fullres_resenc')
    torch.save({'network_weights': net.state_dict(), 'trainer_name': 'nnUNetTrainer',
                'inference_allowed_mirroring_axes': None,
                'init_args': {'plans': plans, 'configuration': '3d_fullres_resenc', 'fold': 0,
                              'dataset_json': dataset_json}}, model / 'fold_0' / 'checkpoint_final.pth')
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device('cpu'),
                                perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), 'checkpoint_final.pth')
    assert type(predictor.network).__name__ == 'ResidualEncoderUNet'
    image = np.random.default_rng(0).normal(size=(1, 24, 30, 26)).astype(np.float32)
    seg = predictor.predict_single_npy_array(image, {'spacing': [7.8, 6.5, 6.5]}, None, None, False)
    assert seg.shape == image.shape[1:]


def test_an_unknown_network_is_refused_by_name(raw_copy):
    spec = json.load(open(raw_copy / SITES_FILE))
    spec['sites']['B']['network'] = 'transformer'
    json.dump(spec, open(raw_copy / SITES_FILE, 'w'))
    with pytest.raises(FederationError) as e:
        Federation.from_raw(DATASET_NAME)
    assert (e.value.site, e.value.field) == ('B', 'network')


TRAIN = ['501', '3d_fullres', '0', '--rounds', '1', '--local-iterations', '1', '--val-iterations', '1', '-p', PLANS,
         '-device', 'cpu']


def test_local_training_gives_each_site_its_planned_network_and_merging_methods_the_shared_one(raw_copy, capsys):
    """Site B plans a residual-encoder network: with --method local it trains it (its checkpoint is that network, and
    its final validation ran it through nnU-Net's predictor); fedavg, which averages weights, trains the shared
    network at every site and says so."""
    from fednnunet.cli import train_entry
    from fednnunet.site_training import results_folder
    from fednnunet.trainers.fedavg import FedAvgTrainer
    from fednnunet.trainers.local import LocalTrainer
    spec = json.load(open(raw_copy / SITES_FILE))
    spec['sites']['B']['network'] = 'resenc'
    json.dump(spec, open(raw_copy / SITES_FILE, 'w'))
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
    train_entry(TRAIN + ['--method', 'local'])
    base = results_folder(DATASET_NAME, LocalTrainer, PLANS, '3d_fullres')
    trained = {}
    for site in ('A', 'B', 'C'):
        ck = torch.load(os.path.join(base, 'sites', site, 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                        weights_only=True)
        trained[site] = ck['init_args']['configuration']
        assert os.path.isfile(os.path.join(base, 'sites', site, 'fold_0', 'validation', 'summary.json'))
    assert trained == {'A': '3d_fullres', 'B': '3d_fullres_resenc', 'C': '3d_fullres'}
    train_entry(TRAIN + ['--method', 'fedavg', '--no-val'])
    assert "fedavg merges weights, so every site trains '3d_fullres'" in capsys.readouterr().out
    base = results_folder(DATASET_NAME, FedAvgTrainer, PLANS, '3d_fullres')
    ck = torch.load(os.path.join(base, 'sites', 'B', 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                    weights_only=True)
    assert ck['init_args']['configuration'] == '3d_fullres'


def test_a_site_refuses_a_network_configuration_that_is_not_its_runs(planned):
    from fednnunet.site_training import trained_configuration
    plans, _ = _plans_and_dataset_json()
    plans, _ = add_site_networks(plans, {'channel_names': {'0': 'T1'}, 'labels': {'a': 0, 'b': 1, 'c': 2}},
                                 {'B': {'network': 'resenc'}})
    config = {'configuration': '3d_fullres', 'method': 'local'}
    assert trained_configuration(plans, {**config, 'network_configuration': '3d_fullres_resenc'}, 'B') == \
        '3d_fullres_resenc'
    for bad in ('2d', '3d_fullres_other'):
        with pytest.raises(FederationError) as e:
            trained_configuration(plans, {**config, 'network_configuration': bad}, 'B')
        assert e.value.field == 'network_configuration'
    with pytest.raises(FederationError, match='merges weights'):
        trained_configuration(plans, {**config, 'method': 'fedavg', 'network_configuration': '3d_fullres_resenc'}, 'B')


def test_residual_encoder_plans_keep_their_network_and_refuse_another_by_name(planned):
    plans, dataset_json = _plans_and_dataset_json()
    resenc_plans, _ = add_site_networks(plans, dataset_json, {'x': {'network': 'resenc'}})
    for c in list(resenc_plans['configurations']):  # as a residual-encoder planner would have planned them
        if c.endswith('_resenc'):
            base = c[:-len('_resenc')]
            resenc_plans['configurations'][base]['architecture'] = resenc_plans['configurations'].pop(c)['architecture']
    _, assignment = add_site_networks(resenc_plans, dataset_json, {'A': {'network': 'plain'},
                                                                   'B': {'network': 'auto', 'gpu_memory_gb': 80}})
    assert assignment == {'A': {'2d': '2d', '3d_fullres': '3d_fullres'}, 'B': {'2d': '2d', '3d_fullres': '3d_fullres'}}
    with pytest.raises(FederationError) as e:
        add_site_networks(resenc_plans, dataset_json, {'A': {'network': 'plain'}, 'B': {'network': 'resenc_wide'}})
    assert (e.value.site, e.value.field) == ('B', 'network')
