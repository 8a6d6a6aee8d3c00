"""A kept trainer compiles its network where nnU-Net would (on CUDA by default): forced here on the CPU, a compiled
site trains, receives and sends the same weights as an uncompiled one, and writes checkpoints stock nnU-Net loads."""

import pytest
import torch

from fednnunet.federation import Federation
from fednnunet.training_server import FederatedTraining

from conftest import DATASET_ID, point_nnunet_folder
from test_live_trainer import CountingBuilds
from test_training import _config, _engine, _final_weights

pytestmark = pytest.mark.extended  # 70 s on 2 CPU cores, most of it compiling


def test_a_compiled_kept_trainer_gives_the_uncompiled_weights(planned, tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    fed = Federation.from_raw(DATASET_ID)
    weights, built = {}, {}
    for compiled in (False, True):
        monkeypatch.setattr(nnUNetTrainer, '_do_i_compile', lambda self, c=compiled: c)  # nnU-Net's rule on CUDA
        point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / f'compiled_{compiled}')
        counting = CountingBuilds(monkeypatch)
        FederatedTraining(_engine(fed, keep_trainers=True), _config('fedavg', rounds=2, validate=False)).run()
        weights[compiled], built[compiled] = _final_weights('fedavg'), counting.built
    for site, (trainer,) in built[True].items():
        assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule), site
    for site, (trainer,) in built[False].items():
        assert not isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule), site
    assert set(weights[True]) == set(weights[False])
    assert not any(k.startswith('_orig_mod') for k in weights[True])
    worst = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in weights[True])
    print('largest difference', worst)
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-3, atol=1e-4)
