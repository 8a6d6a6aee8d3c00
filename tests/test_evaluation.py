"""Evaluation gives nnU-Net's numbers; what a site sends names its cases; models load through nnU-Net's loader
without unpickling anything."""
import math
import os
import pickle

import pytest
import torch

from fednnunet.evaluation import case_id, shareable_summary, summarize_cases
from fednnunet.inference import load_predictor


def _case(dice_1, dice_2, hd_1=1.0, hd_2=2.0):
    def m(d, hd):
        return {'Dice': d, 'IoU': d, 'TP': 1, 'FP': 0, 'FN': 0, 'TN': 1, 'n_pred': 1, 'n_ref': 1, 'HD95': hd}
    return {'reference_file': 'r', 'prediction_file': 'p', 'metrics': {1: m(dice_1, hd_1), 2: m(dice_2, hd_2)}}


def test_foreground_mean_is_nnunets_plain_mean_over_labels():
    """nnU-Net's compute_metrics_on_folder: per label the NaN-ignoring mean over cases, foreground the plain mean
    over labels (a label that is NaN in every case makes the foreground mean NaN: nanmean would hide it)."""
    summary = summarize_cases([_case(0.8, float('nan')), _case(0.6, float('nan'))], [1, 2])
    assert summary['mean'][1]['Dice'] == pytest.approx(0.7)
    assert math.isnan(summary['mean'][2]['Dice'])
    assert math.isnan(summary['foreground_mean']['Dice'])
    summary = summarize_cases([_case(0.8, float('nan')), _case(0.6, 0.4)], [1, 2])
    assert summary['foreground_mean']['Dice'] == pytest.approx((0.7 + 0.4) / 2)
    # HD95 (fednnunet's addition): infinite (one mask empty) values are counted, not averaged
    summary = summarize_cases([_case(0.8, 0.5, hd_1=float('inf')), _case(0.6, 0.4, hd_1=3.0)], [1, 2])
    assert summary['mean'][1]['HD95'] == 3.0 and summary['mean'][1]['HD95_undefined'] == 1
    assert summary['foreground_mean']['HD95'] == pytest.approx((3.0 + 2.0) / 2)


def test_shared_summary_names_cases_whose_ids_hold_dots():
    summary = {'metric_per_case': [{'prediction_file': '/site/private/path/pat.01.v2.nii.gz', 'metrics': {}}],
               'mean': {}, 'foreground_mean': {}}
    shared = shareable_summary(summary, '.nii.gz')
    assert shared['metric_per_case'][0]['case'] == 'pat.01.v2'
    assert '/site/private' not in repr(shared)
    assert case_id('/x/A_001.nii.gz', '.nii.gz') == 'A_001'
    with pytest.raises(ValueError):
        case_id('/x/A_001.nrrd', '.nii.gz')


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/fednnunet_pwned',))


def test_a_checkpoint_with_pickled_code_is_refused_not_run(tmp_path):
    """nnU-Net's own loader reads checkpoints with torch.load(weights_only=False), which would run this payload;
    fednnunet's load_predictor goes through nnU-Net's loader with weights_only=True."""
    marker = '/tmp/fednnunet_pwned'
    if os.path.exists(marker):
        os.remove(marker)
    fold = tmp_path / 'model' / 'fold_0'
    fold.mkdir(parents=True)
    (tmp_path / 'model' / 'plans.json').write_text('{}')
    (tmp_path / 'model' / 'dataset.json').write_text('{}')
    torch.save({'network_weights': {}, 'trainer_name': 'FedAvgTrainer', 'payload': _Payload(),
                'init_args': {'configuration': '3d_fullres'}}, fold / 'checkpoint_final.pth')
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        load_predictor(str(tmp_path / 'model'), 0)
    assert not os.path.exists(marker)
    assert torch.load.__module__ == 'torch.serialization'  # restored after the call


def test_checkpoint_loading_works_without_numpy_2s_private_module(monkeypatch, tmp_path):
    """numpy 1.x has no np._core (pyproject allows numpy>=1.24): the allow-list falls back to np.core."""
    import warnings
    import numpy as np
    from fednnunet.inference import _numpy_scalar_globals, load_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # numpy 2 keeps np.core as a deprecated alias
        core = np.core
        monkeypatch.delattr(np, '_core')
        assert _numpy_scalar_globals()[0] is core.multiarray.scalar
    torch.save({'logging': {'x': [np.float32(1.5)]}}, tmp_path / 'c.pth')
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / 'c.pth'))['logging']['x'][0] == 1.5
