"""A site's unlabelled cases as training batches: a weak and a strong view of the same patch.

Semi-supervised methods train on a site's unlabelled cases (``sites.json`` ``unlabelled``, preprocessed by nnU-Net's
preprocessor without a segmentation into ``<data_identifier>_unlabelled``, see :mod:`fednnunet.preprocessing`).
Their batches come from nnU-Net's own data loader and augmentation pipeline (the trainer's
``get_training_transforms``: spatial, intensity, mirroring), which makes the **weak** view; the **strong** view is
the weak view after extra intensity and noise transforms (:func:`strong_intensity_transforms`), so the two views
are aligned voxel for voxel and a pseudo-label from one is a target for the other.

Both views travel in one tensor, stacked on the channel axis (``data[:, :C]`` weak, ``data[:, C:]`` strong, see
:func:`split_views`), so that nnU-Net's loader and its background augmentation workers carry them unchanged.
"""
import os
from typing import Tuple

import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fednnunet.errors import FederationError


def strong_intensity_transforms(noise_variance: RandomScalar = (0.05, 0.2),
                                multiplier: Tuple[float, float] = (0.6, 1.4),
                                contrast: Tuple[float, float] = (0.6, 1.4),
                                gamma: Tuple[float, float] = (0.6, 1.6)) -> ComposeTransforms:
    """What the strong view adds to nnU-Net's augmentation: always noise, brightness and contrast, wider than
    nnU-Net's ranges (its noise variance 0-0.1 at p 0.1, brightness and contrast 0.75-1.25 at p 0.15), and at half
    the patches a gamma and a blur. Intensity only: the geometry stays the weak view's."""
    return ComposeTransforms([
        GaussianNoiseTransform(noise_variance=noise_variance, p_per_channel=1, synchronize_channels=True),
        MultiplicativeBrightnessTransform(multiplier_range=BGContrast(multiplier), synchronize_channels=False,
                                          p_per_channel=1),
        ContrastTransform(contrast_range=BGContrast(contrast), preserve_range=True, synchronize_channels=False,
                          p_per_channel=1),
        RandomTransform(GammaTransform(gamma=BGContrast(gamma), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.5),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.5), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=0.5),
    ])


class TwoViewTransform(BasicTransform):
    """``weak`` (nnU-Net's training pipeline) on the patch, then ``strong`` on a copy of the weak image; the image
    that comes out holds both views on the channel axis (weak first)."""

    def __init__(self, weak: BasicTransform, strong: BasicTransform):
        super().__init__()
        self.weak = weak
        self.strong = strong

    def apply(self, data_dict, **params):
        out = self.weak(**data_dict)
        weak = out['image']
        strong = self.strong(**{'image': weak.clone()})['image']
        out['image'] = torch.cat((weak, strong), dim=0)
        return out


def split_views(data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) from a batch of :class:`TwoViewTransform` (B, 2C, ...)."""
    if data.shape[1] % 2:
        raise ValueError(f'a two-view batch has an even number of channels, not {data.shape[1]}')
    c = data.shape[1] // 2
    return data[:, :c], data[:, c:]


class UnlabelledCases:
    """nnU-Net's dataset of a folder of unlabelled cases, for nnU-Net's data loader: an unlabelled case has no
    class to oversample, so its properties say so (``class_locations`` empty; the loader never oversamples
    here)."""

    def __init__(self, folder: str, site: str, cases=None):
        dataset_class = infer_dataset_class(folder) if os.path.isdir(folder) else None
        found = set(dataset_class.get_identifiers(folder)) if dataset_class is not None else set()
        missing = sorted(set(cases or ()) - found)
        if missing:
            raise FederationError(f'{folder} lacks the preprocessed unlabelled case(s) {missing[:3]}: run '
                                  f'fednnunet_plan_and_preprocess', site=site, field='unlabelled')
        self.identifiers = sorted(cases if cases is not None else found)
        if not self.identifiers:
            raise FederationError(f'{folder} holds no preprocessed unlabelled case: run fednnunet_plan_and_preprocess',
                                  site=site, field='unlabelled')
        self._dataset = dataset_class(folder, self.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        properties.setdefault('class_locations', {})
        return data, seg, seg_prev, properties

    def __len__(self):
        return len(self.identifiers)


def two_view_dataloader(trainer, folder: str, site: str, cases=None):
    """Batches of a site's unlabelled cases from nnU-Net's own ``get_dataloaders`` of ``trainer`` (its patch size,
    batch size, augmentation and augmentation workers, as nnU-Net runs them: ``nnUNet_n_proc_DA``), with the
    unlabelled cases in place of the training split and :class:`TwoViewTransform` around nnU-Net's training
    transforms (the weak view) adding :func:`strong_intensity_transforms` (the strong view). ``cases``: the
    identifiers to load (default: every case in ``folder``). The validation loader that get_dataloaders also builds
    is stopped at once. Unlabelled cases have no class locations, so every patch is drawn at random."""
    if trainer.label_manager.has_ignore_label:
        raise FederationError("semi-supervised training does not support datasets with an ignore label yet (nnU-Net's "
                              "loader samples their patches from annotated voxels, which unlabelled cases lack)",
                              site=site, field='labels')
    unlabelled = UnlabelledCases(folder, site, cases)
    weak_transforms = trainer.get_training_transforms
    # nnU-Net's get_dataloaders, with the unlabelled cases as its data and the two views as its training transforms
    trainer.get_tr_and_val_datasets = lambda: (unlabelled, unlabelled)
    trainer.get_training_transforms = lambda *a, **kw: TwoViewTransform(weak_transforms(*a, **kw),
                                                                        strong_intensity_transforms())
    try:
        train, val = nnUNetTrainer.get_dataloaders(trainer)  # nnU-Net's, not a federated trainer's override
    finally:
        del trainer.get_tr_and_val_datasets, trainer.get_training_transforms  # the class's methods again
    if hasattr(val, '_finish'):
        val._finish()
    return train
