"""nnU-Net's cascade, federated: 3d_lowres on the federation's folds leaves every site its own out-of-fold
predictions; 3d_cascade_fullres trains on them (they reach its network), validates and predicts with the previous
stage's predictions; find_best_configuration writes the two-stage commands, and they predict."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fednnunet.cli import predict_entry, train_entry
from fednnunet.cli_pipeline import find_best_configuration_entry, run_instructions
from fednnunet.demo import TEST_SITES, build_demo_federation
from fednnunet.errors import FederationError
from fednnunet.federation import Federation, site_folder

from conftest import DATASET_NAME, point_nnunet_folder

PLANS = 'nnUNetCPULowresPlans'
TINY = ['-p', PLANS, '--rounds', '1', '--local-iterations', '1', '--val-iterations', '1', '-device', 'cpu']
LOWRES = f'FedAvgTrainer__{PLANS}__3d_lowres'
CASCADE = f'FedAvgTrainer__{PLANS}__3d_cascade_fullres'


def _refused(entry, argv) -> str:
    """What a command that must refuse says on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        entry(argv)
    return err.getvalue()


@pytest.fixture(scope='module')
def cascade_trained(tmp_path_factory):
    """The tiny federation at size 48, planned with the CPU preset at 1 GB (small patches: nnU-Net's planner then
    adds 3d_lowres and 3d_cascade_fullres), 3d_lowres trained on every fold, the cascade on fold 0. Every site splits
    its cases into two folds (its own splits_final.json, kept as nnU-Net keeps a custom split): the same out-of-fold
    logic as five folds at two fifths of the training."""
    root = tmp_path_factory.mktemp('cascade')
    with pytest.MonkeyPatch.context() as mp:
        for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
            (root / var).mkdir()
            point_nnunet_folder(mp, var, root / var)
        build_demo_federation(raw_root=str(root / 'nnUNet_raw'), size=48, sites=TEST_SITES, seed=0, verbose=False)
        from fednnunet.engines.simulation import SimulationEngine
        from fednnunet.plan_and_preprocess import plan_and_preprocess
        federation = Federation.from_raw(DATASET_NAME)
        plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['3d_lowres', '3d_fullres'],
                            'nnUNetPlannerCPU', 1.0, PLANS)
        for name, site in federation.sites.items():
            cases = sorted(site.cases)
            splits = [{'train': [c for c in cases if c not in cases[k::2]], 'val': cases[k::2]} for k in range(2)]
            with open(os.path.join(site_folder(DATASET_NAME, name), 'splits_final.json'), 'w') as f:
                json.dump(splits, f)
        plans = json.load(open(root / 'nnUNet_preprocessed' / DATASET_NAME / f'{PLANS}.json'))
        assert plans['configurations']['3d_cascade_fullres']['previous_stage'] == '3d_lowres'
        # before the first stage: the sites have no predictions of it
        said = _refused(train_entry, [DATASET_NAME, '3d_cascade_fullres', '0'] + TINY)
        assert "field 'previous_stage'" in said and 'site ' in said, said
        # fold 0 alone: each site exports its fold-0 validation cases and no other (its training cases come from the
        # other fold); the cascade is still refused, naming what is missing
        train_entry([DATASET_NAME, '3d_lowres', '0', '--npz'] + TINY)
        for name in federation.sites:
            folder = (root / 'nnUNet_results' / DATASET_NAME / LOWRES / 'sites' / name / 'predicted_next_stage' /
                      '3d_cascade_fullres')
            exported = sorted(f.split('.')[0] for f in os.listdir(folder) if f.endswith('.b2nd'))
            splits = json.load(open(os.path.join(site_folder(DATASET_NAME, name), 'splits_final.json')))
            assert exported == sorted(splits[0]['val']), name
        assert 'are missing in' in _refused(train_entry, [DATASET_NAME, '3d_cascade_fullres', '0'] + TINY)
        train_entry([DATASET_NAME, '3d_lowres', '1', '--npz'] + TINY)
        train_entry([DATASET_NAME, '3d_cascade_fullres', '0', '--npz'] + TINY)
    return root


@pytest.fixture
def cascade(cascade_trained, monkeypatch):
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        point_nnunet_folder(monkeypatch, var, cascade_trained / var)
    return cascade_trained


@pytest.mark.slow
def test_every_site_predicts_its_cases_out_of_fold_and_the_cascade_reads_them(cascade, tmp_path, capsys):
    root = cascade
    federation = Federation.from_raw(DATASET_NAME)
    results = root / 'nnUNet_results' / DATASET_NAME
    for name, site in federation.sites.items():
        folder = results / LOWRES / 'sites' / name / 'predicted_next_stage' / '3d_cascade_fullres'
        assert sorted(f.split('.')[0] for f in os.listdir(folder) if f.endswith('.b2nd')) == sorted(site.cases), name
        # each case was predicted by a fold that did not train on it (where the site has more than one case)
        splits = json.load(open(os.path.join(site_folder(DATASET_NAME, name), 'splits_final.json')))
        assert all(set(s['val']).isdisjoint(s['train']) for s in splits)
        # and the cascade's final validation ran at the site, from the first stage's validation predictions
        summary = json.load(open(results / CASCADE / 'sites' / name / 'fold_0' / 'validation' / 'summary.json'))
        assert summary['metric_per_case']
    # the network takes the image and the previous stage's one-hot foreground labels
    weights = torch.load(results / CASCADE / 'fold_0' / 'checkpoint_final.pth', map_location='cpu',
                         weights_only=False)['network_weights']
    assert weights['encoder.stages.0.0.convs.0.conv.weight'].shape[1] == 1 + 2

    # prediction: the previous stage's segmentation reaches the network (another one, another prediction)
    a = federation.sites['A']
    case = a.cases[0]
    scans = tmp_path / 'scans'
    scans.mkdir()
    shutil.copy(a.image_files(case)[0], scans)
    args = ['-i', str(scans), '-d', DATASET_NAME, '-p', PLANS, '-device', 'cpu', '-f', '0']
    with pytest.raises(SystemExit):
        predict_entry(args + ['-o', str(tmp_path / 'x'), '-c', '3d_cascade_fullres'])
    assert "field '-prev_stage_predictions'" in capsys.readouterr().err and not (tmp_path / 'x').exists()
    predict_entry(args + ['-o', str(tmp_path / 'lowres'), '-c', '3d_lowres'])
    with pytest.raises(SystemExit):  # a model that is not a cascade stage takes no previous stage
        predict_entry(args + ['-o', str(tmp_path / 'y'), '-c', '3d_lowres', '-prev_stage_predictions',
                              str(tmp_path / 'lowres')])
    assert 'not a cascade stage' in capsys.readouterr().err and not (tmp_path / 'y').exists()
    empty = tmp_path / 'empty_lowres'
    empty.mkdir()
    image = sitk.ReadImage(str(tmp_path / 'lowres' / f'{case}.nii.gz'))
    zeros = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    zeros.CopyInformation(image)
    sitk.WriteImage(zeros, str(empty / f'{case}.nii.gz'))
    probabilities = []
    for previous in (tmp_path / 'lowres', empty):
        out = tmp_path / f'cascade_from_{previous.name}'
        predict_entry(args + ['-o', str(out), '-c', '3d_cascade_fullres', '-prev_stage_predictions', str(previous),
                              '--save_probabilities'])
        probabilities.append(np.load(out / f'{case}.npz')['probabilities'])
    assert not np.allclose(probabilities[0], probabilities[1])


@pytest.mark.slow
def test_find_best_configuration_writes_the_two_stage_commands_and_they_predict(cascade, tmp_path, capsys):
    root = cascade
    find_best_configuration_entry([DATASET_NAME, '-c', '3d_lowres', '3d_cascade_fullres', '-p', PLANS, '-f', '0'])
    text = open(root / 'nnUNet_results' / DATASET_NAME / 'inference_instructions.txt').read()
    info = json.load(open(root / 'nnUNet_results' / DATASET_NAME / 'inference_information.json'))
    assert set(info['all_results']) >= {LOWRES, CASCADE}
    if any(m['configuration'] == '3d_cascade_fullres' for m in info['best_model_or_ensemble']
           ['selected_model_or_models']):
        assert '-c 3d_lowres' in text and '-prev_stage_predictions OUTPUT_FOLDER_PREV_STAGE' in text
    scans = tmp_path / 'scans'
    scans.mkdir()
    a = Federation.from_raw(DATASET_NAME).sites['A']
    shutil.copy(a.image_files(a.cases[0])[0], scans)
    final = run_instructions(text, str(scans), str(tmp_path), ['-device', 'cpu'])
    assert os.path.isfile(os.path.join(final, f'{a.cases[0]}.nii.gz'))
    # whatever won, the cascade's own commands predict too
    from fednnunet.best_configuration import inference_instructions
    cascade_only = dict(info, best_model_or_ensemble=dict(info['best_model_or_ensemble'], selected_model_or_models=[
        {'configuration': '3d_cascade_fullres', 'trainer': 'FedAvgTrainer', 'plans_identifier': PLANS,
         'method': 'fedavg', 'previous_stage': '3d_lowres'}]), folds=[0])
    text = inference_instructions(cascade_only, DATASET_NAME)
    assert '-prev_stage_predictions OUTPUT_FOLDER_PREV_STAGE' in text
    final = run_instructions(text, str(scans), str(tmp_path / 'cascade_only'), ['-device', 'cpu'])
    assert os.path.isfile(os.path.join(final, f'{a.cases[0]}.nii.gz'))


def test_a_method_whose_network_takes_only_image_channels_refuses_the_cascade():
    from fednnunet.cascade import refuse_cascade
    from fednnunet.trainers.fedavg import FedAvgTrainer
    from fednnunet.trainers.fedfixmatch import FedFixMatchTrainer
    from fednnunet.trainers.fedmm import FedMMTrainer
    refuse_cascade(FedAvgTrainer, '3d_cascade_fullres', '3d_lowres')
    for trainer, why in ((FedMMTrainer, 'an encoder per image channel'), (FedFixMatchTrainer, 'unlabelled cases')):
        with pytest.raises(FederationError, match=why) as e:
            refuse_cascade(trainer, '3d_cascade_fullres', '3d_lowres')
        assert e.value.field == 'configuration'
