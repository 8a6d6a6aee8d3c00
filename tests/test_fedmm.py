"""FedMM end to end on sites with different channels: each modality's encoder travels only between the server and
the sites that have that modality and is averaged over them; modality dropout and the separate decoder's loss act;
the global model predicts a case that lacks a channel."""
import json
import os

import numpy as np
import pytest
import torch

from fednnunet.cli import train_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.strategies import ModalityFedAvg, weighted_mean

from conftest import DATASET_NAME
from test_site_channels import PLANS, planned_channels, two_channel_raw  # noqa: F401 (fixtures)

TRAIN = [DATASET_NAME, '3d_fullres', '0', '-p', PLANS, '--method', 'fedmm', '--rounds', '2', '--local-iterations',
         '2', '--val-iterations', '1', '-device', 'cpu']


def _final(base, *sub):
    return torch.load(os.path.join(base, *sub, 'fold_0', 'checkpoint_final.pth'), map_location='cpu',
                      weights_only=False)['network_weights']


def test_fedmm_shares_each_modality_encoder_with_exactly_the_sites_that_have_it(planned_channels, monkeypatch):
    traffic, merges, metrics, sent_first = [], [], [], []
    ask_one, aggregate = SimulationEngine._ask_one, ModalityFedAvg.aggregate

    def recording_ask_one(self, site, message):
        reply = ask_one(self, site, message)
        traffic.append((site, message.kind, set(message.arrays), set(reply.arrays)))
        if message.kind == 'fit':
            metrics.append((site, reply.config['metrics']))
            if site == 'A' and int(message.config['round']) == 0:
                sent_first.append(dict(message.arrays))  # the initial model
        return reply

    def recording_aggregate(self, r, updates, global_state):
        merged = aggregate(self, r, updates, global_state)
        merges.append(({u.site: (dict(u.arrays), self.weight(u)) for u in updates}, merged))
        return merged
    monkeypatch.setattr(SimulationEngine, '_ask_one', recording_ask_one)
    monkeypatch.setattr(ModalityFedAvg, 'aggregate', recording_aggregate)
    train_entry(TRAIN + ['--hp', 'full_set_probability=0'])

    # B (T1 only) never sees or sends T2's encoder, C (T2 only) never T1's; A has both
    for site, lacks in (('B', 'encoders.1.'), ('C', 'encoders.0.'), ('A', None)):
        keys = set().union(*[sent | got for s, kind, sent, got in traffic if s == site and kind in ('fit', 'finish')])
        assert keys and all(k.split('.')[0] in ('encoders', 'fusion', 'decoder', 'separate_decoder') for k in keys)
        if lacks:
            assert not [k for k in keys if k.startswith(lacks)], site
        else:
            assert [k for k in keys if k.startswith('encoders.1.')] and [k for k in keys if k.startswith('encoders.0.')]
    # each encoder is the mean over the sites that have its modality; the shared parts over all three
    assert len(merges) == 2
    for updates, merged in merges:
        for key, owners in (('encoders.0.stages.0.0.convs.0.conv.weight', 'AB'),
                            ('encoders.1.stages.0.0.convs.0.conv.weight', 'AC'),
                            ('fusion.0.block.0.weight', 'ABC')):
            assert {s for s, (arrays, _) in updates.items() if key in arrays} == set(owners), key
            expected = weighted_mean([updates[s][0][key] for s in owners], [updates[s][1] for s in owners])
            np.testing.assert_allclose(merged[key], expected, rtol=1e-6, atol=1e-7)
    assert len(metrics) == 6  # 2 rounds x 3 sites
    for site, m in metrics:
        # full_set_probability 0: every sample of A's (two modalities) drops one; B and C have one, never drop it
        assert (m['dropped_modalities'] > 0) == (site == 'A'), (site, m)
        assert m['separate_loss'] > 0
    # every site validated its final model on its own cases, which lack a channel at B and C
    base = os.path.join(os.environ['nnUNet_results'], DATASET_NAME, f'FedMMTrainer__{PLANS}__3d_fullres')
    summary = json.load(open(os.path.join(base, 'fold_0', 'federated_summary.json')))
    assert set(summary['final_validation']['per_site']) == {'A', 'B', 'C'}

    # the separate decoder's loss is what trains the separate decoder: without it, it never moves
    trained = _final(base)
    train_entry(TRAIN + ['--hp', 'separate_weight=0', '--overwrite'])
    untrained = _final(base)
    initial = sent_first[0]
    assert np.array_equal(sent_first[1]['fusion.0.block.0.weight'], initial['fusion.0.block.0.weight'])  # same seed
    separate = [k for k in trained if k.startswith('separate_decoder.') and k in initial]
    assert separate
    assert all(np.array_equal(untrained[k].numpy(), initial[k]) for k in separate)
    assert any(not np.array_equal(trained[k].numpy(), initial[k]) for k in separate)


def test_the_global_fedmm_model_predicts_a_case_without_one_of_its_channels(planned_channels, tmp_path):
    """fednnunet_predict on a folder in which C's case has its T2 file only and A's case both files; a model that
    needs every channel says so for the same folder."""
    import shutil
    import SimpleITK as sitk
    from fednnunet.cli import predict_entry
    federation, _ = planned_channels
    train_entry(TRAIN + ['--no-val'])
    images = tmp_path / 'in'
    images.mkdir()
    a, c = federation.sites['A'], federation.sites['C']
    for f in a.image_files(a.cases[0]) + c.image_files(c.cases[0]):
        shutil.copy(f, images)
    predict_entry(['-i', str(images), '-o', str(tmp_path / 'out'), '-d', DATASET_NAME, '-c', '3d_fullres', '-p',
                   PLANS, '--method', 'fedmm', '-device', 'cpu'])
    for site, case in ((a, a.cases[0]), (c, c.cases[0])):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'out' / f'{case}.nii.gz')))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(site.image_files(case)[0])).shape
        assert set(np.unique(seg)) <= {0, 1, 2}
    from fednnunet.errors import FederationError
    from fednnunet.inference import input_files
    with pytest.raises(FederationError, match='lack a channel'):  # what a model without FedMM's network is told
        input_files(str(images), json.load(open(os.path.join(
            os.environ['nnUNet_results'], DATASET_NAME, f'FedMMTrainer__{PLANS}__3d_fullres', 'dataset.json'))))


def test_the_server_sends_and_accepts_a_modality_encoder_only_to_and_from_its_owners():
    from fednnunet.training_server import present_channels, update_problem
    from fednnunet.errors import FederationError
    strategy = ModalityFedAvg()
    dataset_json = {'channel_names': {'0': 'T1', '1': 'T2'}}
    strategy.sites_ready({'A': present_channels(['0', '1'], dataset_json, 'A'),
                          'B': present_channels(['0'], dataset_json, 'B')})
    state = {'encoders.0.w': np.zeros(2, np.float32), 'encoders.1.w': np.ones(2, np.float32),
             'fusion.0.w': np.zeros(2, np.float32)}
    assert set(strategy.configure_fit(0, 'A', state)) == set(state)
    assert set(strategy.configure_fit(0, 'B', state)) == {'encoders.0.w', 'fusion.0.w'}
    expected = strategy.site_update_keys(0, 'B', set(state))
    assert expected == {'encoders.0.w', 'fusion.0.w'}
    spec = {k: ((2,), np.dtype('float32')) for k in state}
    from fednnunet.wire import Message
    metrics = {'pseudo_dice': 0.5, 'ema_pseudo_dice': 0.5, 'train_loss': 1.0, 'val_loss': 1.0, 'lr': 0.01,
               'seconds': 1.0, 'num_training_cases': 1, 'state_from_round': None, 'tp': [1, 1], 'fp': [1, 1],
               'fn': [1, 1]}
    honest = Message('update', {'num_examples': 1, 'metrics': metrics}, arrays={k: state[k] for k in expected})
    sneaky = Message('update', {'num_examples': 1, 'metrics': metrics}, arrays=dict(state))  # T2's encoder too
    assert update_problem(honest, expected, spec, 2, 2) is None
    assert 'encoders.1.w' in update_problem(sneaky, expected, spec, 2, 2)
    # what a site says of its channels is checked; a site nobody heard from gets no encoder
    for bad in (['2'], ['0', '0'], [], '0', [0]):
        with pytest.raises(FederationError):
            present_channels(bad, dataset_json, 'B')
    with pytest.raises(ValueError, match="did not say which channels"):
        strategy.configure_fit(0, 'C', state)


def test_fedmm_trains_and_predicts_in_2d(two_channel_raw, tmp_path):
    """The 2d configuration: FedMM's network from nnU-Net's 2d plans (2d encoders per modality), trained over the
    federation whose sites lack a channel each, its global model predicting C's case from its T2 file alone."""
    import SimpleITK as sitk
    from fednnunet.cli import predict_entry
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    federation = Federation.from_raw(DATASET_NAME)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['2d'], 'nnUNetPlannerCPU')
    train_entry([DATASET_NAME, '2d'] + TRAIN[2:] + ['--no-val'])
    base = os.path.join(os.environ['nnUNet_results'], DATASET_NAME, f'FedMMTrainer__{PLANS}__2d')
    weights = _final(base)
    assert weights['encoders.1.stages.0.0.convs.0.conv.weight'].dim() == 4  # 2d convolutions, one input channel
    assert weights['encoders.1.stages.0.0.convs.0.conv.weight'].shape[1] == 1
    c = federation.sites['C']
    images = tmp_path / 'in'
    images.mkdir()
    (t2,) = c.image_files(c.cases[0])
    os.symlink(t2, images / os.path.basename(t2))
    predict_entry(['-i', str(images), '-o', str(tmp_path / 'out'), '-d', DATASET_NAME, '-c', '2d', '-p', PLANS,
                   '--method', 'fedmm', '-device', 'cpu'])
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'out' / f'{c.cases[0]}.nii.gz')))
    assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(t2)).shape and set(np.unique(seg)) <= {0, 1, 2}
