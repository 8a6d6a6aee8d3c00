"""HSSF's loss terms (Ma et al., TMI 2024; issue 13), for nnU-Net's softmax outputs in 2d and 3d.

Pure tensor functions, so that each can be checked against hand-computed numbers; the HSSF trainer composes them.
Shapes: logits (B, C, *spatial), confidence logits (B, 1, *spatial) from the self-assessment head, labels
(B, *spatial) as class indices. Where the paper's public code (YxMa666/HSSF) fixes a detail, these follow it, and
documentation/methods/hssf.md lists the deviations:

- self-assessment target: 1 where the argmax is right; wrong voxels weigh #right / #wrong over the batch;
- KL(teacher || student) at temperature T, averaged per sample over classes and voxels, without the T^2 factor, and
  gated per sample (a gated-out sample counts as 0 in the batch mean);
- reliable pseudo-labels (RPG): where the confidence is below 0.3 the label is flipped; with more than two classes a
  flip has no single meaning, so the runner-up class of the softmax is taken (for two classes that is the flip);
- the pseudo-label per voxel comes from the view whose self-assessed confidence is higher; an image is used when its
  mean confidence exceeds 0.75;
- feature-perturbation consistency: per class, the squared difference of clean and perturbed logits weighted by the
  perturbed branch's mean probability of that class, averaged over classes.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(1)


def _labels(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Class indices (B, *spatial) from nnU-Net's (B, 1, *spatial) targets too; shapes must then match ``like``."""
    if labels.dim() == like.dim() + 1 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != like.shape:
        raise ValueError(f'labels of shape {tuple(labels.shape)} do not match predictions of shape {tuple(like.shape)}')
    return labels.long()


def prediction_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the argmax of ``logits`` is the label, else 0.0 (no gradient): the self-assessment head's target."""
    predicted = logits.detach().argmax(1)
    return (predicted == _labels(labels, predicted)).float()


def confidence_loss(confidence_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of the self-assessed confidence against "the prediction is right", with every wrong voxel weighted
    #right / #wrong (counted over the whole batch) so that the rare errors count as much as the many right voxels."""
    target = prediction_correct(logits, labels)
    bce = F.binary_cross_entropy_with_logits(confidence_logits[:, 0].float(), target, reduction='none')
    right, wrong = target.sum(), (1 - target).sum()
    # every voxel wrong (no right one to balance against): the wrong ones weigh 1, the head still learns from them
    ratio = right / wrong.clamp_min(1) if right > 0 else torch.ones_like(right)
    weight = torch.where(target > 0, torch.ones_like(target), ratio)
    return (bce * weight).mean()


def pixel_accuracy(labels_predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: the share of voxels whose predicted label is right (B,)."""
    return _per_sample_mean((labels_predicted == _labels(labels, labels_predicted)).float())


def gated_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gate: torch.Tensor,
             temperature: float = 2.0) -> torch.Tensor:
    """mean_b gate_b * mean_{c,voxels} KL(softmax(teacher/T) || softmax(student/T)); no gradient to the teacher."""
    log_student = F.log_softmax(student_logits.float() / temperature, 1)
    teacher = F.softmax(teacher_logits.detach().float() / temperature, 1)
    kl = F.kl_div(log_student, teacher, reduction='none')
    return (_per_sample_mean(kl) * gate.float()).mean()


def reliable_pseudo_labels(logits: torch.Tensor, confidence: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """RPG: the argmax label, replaced by the runner-up class where the self-assessed confidence (a probability, shape
    (B, *spatial)) is below ``threshold`` (for two classes: the flipped label)."""
    top2 = logits.detach().topk(2, dim=1).indices
    return torch.where(confidence < threshold, top2[:, 1], top2[:, 0])


def pseudo_labels_from_two_views(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                                 weak_confidence: torch.Tensor, strong_confidence: torch.Tensor,
                                 threshold: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per voxel, the label of the view whose confidence is higher (the weak view's on ties), corrected by RPG with
    the higher of the two confidences; returns (labels, that confidence). Nothing here carries a gradient."""
    strong_wins = strong_confidence.detach() > weak_confidence.detach()
    confidence = torch.maximum(weak_confidence, strong_confidence).detach()
    logits = torch.where(strong_wins.unsqueeze(1), strong_logits.detach(), weak_logits.detach())
    return reliable_pseudo_labels(logits, confidence, threshold), confidence


def image_gate(confidence: torch.Tensor, threshold: float = 0.75) -> torch.Tensor:
    """Per sample: 1.0 where the mean confidence exceeds ``threshold`` (B,)."""
    return (_per_sample_mean(confidence.detach()) > threshold).float()


def best_teacher(own_accuracy: torch.Tensor, own_logits: torch.Tensor, accuracies: Sequence[torch.Tensor],
                 teacher_logits: Sequence[torch.Tensor], threshold: float = 0.75) -> Tuple[torch.Tensor, torch.Tensor]:
    """The server's rectification: per sample, the most accurate of the other models, if it is more accurate than
    the model itself and than ``threshold``; returns (teacher logits, gate). A sample without such a model gets gate
    0 (its teacher is then the model's own output, which a gated KL ignores)."""
    best = own_accuracy.detach().clone()
    teacher = own_logits.detach().clone()
    for accuracy, logits in zip(accuracies, teacher_logits):
        better = accuracy.detach() > best
        best = torch.where(better, accuracy.detach(), best)
        teacher = torch.where(better.view(-1, *([1] * (teacher.dim() - 1))), logits.detach(), teacher)
    gate = (best > own_accuracy.detach()) & (best > threshold)
    return teacher, gate.float()


def feature_perturbation_loss(clean_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """Consistency of the outputs with and without feature dropout: per class c, mean_b pi_{b,c} * mean over voxels of
    (clean - perturbed)_c^2, with pi_{b,c} the perturbed branch's mean probability of class c in sample b; averaged
    over classes. Both branches get gradients."""
    squared = (clean_logits.float() - perturbed_logits.float()) ** 2
    per_class = squared.reshape(*squared.shape[:2], -1).mean(2)  # (B, C)
    pi = F.softmax(perturbed_logits.float(), 1).reshape(*squared.shape[:2], -1).mean(2)
    return (pi * per_class).mean(0).mean()
