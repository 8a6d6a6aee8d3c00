"""Multi-FedAvg (and local) at sites that lack a channel: nnU-Net's U-Net on every channel, a site's missing channels
zero in every training batch (even after augmentation noise touched them) and in prediction."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fednnunet.cli import predict_entry, train_entry
from fednnunet.trainers.base import FederatedTrainer

from conftest import DATASET_NAME
from test_site_channels import PLANS, planned_channels, two_channel_raw  # noqa: F401 (fixtures)

TRAIN = [DATASET_NAME, '3d_fullres', '0', '-p', PLANS, '--rounds', '2', '--local-iterations', '2',
         '--val-iterations', '1', '-device', 'cpu', '--no-val']


@pytest.mark.parametrize('method', ['multifedavg', 'local'])
def test_a_site_trains_on_zeros_in_the_channels_it_lacks_even_after_augmentation_noise(planned_channels, monkeypatch,
                                                                                      method):
    """Every training batch gets noise on every channel before the step (as nnU-Net's Gaussian noise transform
    may add it); what reaches nnU-Net's train_step at B (T1 only) has T2 all zero, at C (T2 only) T1 all zero, and at
    A both channels as loaded."""
    seen = {}
    nnunet_step = nnUNetTrainer.train_step

    def noisy_local_step(self):
        batch = next(self.dataloader_train)
        data = batch['data']
        batch = dict(batch, data=data + 0.1 * torch.randn_like(data))
        return self.train_step(batch)

    def recording_step(self, batch):
        if self.network.training:
            seen.setdefault(self.site_name, []).append(batch['data'].detach().abs().amax(dim=(0, 2, 3, 4)))
        return nnunet_step(self, batch)
    monkeypatch.setattr(FederatedTrainer, 'local_step', noisy_local_step)
    monkeypatch.setattr(nnUNetTrainer, 'train_step', recording_step)
    train_entry(TRAIN + ['--method', method])
    assert {s: len(v) for s, v in seen.items()} == {'A': 4, 'B': 4, 'C': 4}
    for site, zero in (('A', None), ('B', 1), ('C', 0)):
        for peaks in seen[site]:
            for channel in (0, 1):
                assert (float(peaks[channel]) == 0) == (channel == zero), (site, channel, peaks)


def test_multifedavg_predicts_a_case_without_a_channel_file_as_with_that_channel_all_zero(planned_channels, tmp_path):
    """fednnunet_predict with the global Multi-FedAvg model: B's case from its T1 file alone gives the prediction of
    the same case with a T2 file of zeros (its missing channel is filled with zeros, as in training)."""
    federation, _ = planned_channels
    train_entry(TRAIN + ['--method', 'multifedavg'])
    b = federation.sites['B']
    case = b.cases[0]
    (t1,) = b.image_files(case)
    alone, padded = tmp_path / 'alone', tmp_path / 'padded'
    for folder in (alone, padded):
        folder.mkdir()
        shutil.copy(t1, folder)
    image = sitk.ReadImage(t1)
    zeros = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    zeros.CopyInformation(image)
    sitk.WriteImage(zeros, str(padded / f'{case}_0001.nii.gz'))
    segs = []
    for folder in (alone, padded):
        out = tmp_path / f'out_{folder.name}'
        predict_entry(['-i', str(folder), '-o', str(out), '-d', DATASET_NAME, '-c', '3d_fullres', '-p', PLANS,
                       '--method', 'multifedavg', '-device', 'cpu', '--save_probabilities'])
        segs.append(np.load(out / f'{case}.npz')['probabilities'])
    np.testing.assert_allclose(segs[0], segs[1], atol=1e-6)
    assert segs[0].shape[0] == len(json.load(open(os.path.join(os.environ['nnUNet_raw'], DATASET_NAME,
                                                                'dataset.json')))['labels'])
