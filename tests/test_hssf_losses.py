"""HSSF's loss terms against numbers computed by hand (fednnunet/trainers/hssf_losses.py)."""
import math

import pytest
import torch

from fednnunet.trainers import hssf_losses as L


def _logits(labels_and_margins, classes=2):
    """(B, C, N) logits whose argmax is the given label, with the given margin over the other classes."""
    out = torch.zeros(len(labels_and_margins), classes, len(labels_and_margins[0]))
    for b, row in enumerate(labels_and_margins):
        for i, (label, margin) in enumerate(row):
            out[b, label, i] = margin
    return out


def test_the_confidence_loss_weighs_each_wrong_voxel_by_right_over_wrong():
    logits = _logits([[(1, 2.0), (0, 2.0), (0, 2.0), (1, 2.0)]])
    labels = torch.tensor([[1, 0, 0, 0]])  # 3 right, 1 wrong (the last voxel)
    a = torch.tensor([[[0.5, -1.0, 2.0, 0.3]]])
    bce = lambda x, t: -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
    expected = (bce(0.5, 1) + bce(-1.0, 1) + bce(2.0, 1) + 3 * bce(0.3, 0)) / 4
    assert float(L.confidence_loss(a, logits, labels)) == pytest.approx(expected, rel=1e-6)
    # without the weighting the wrong voxel would count once: the weight is what makes the term differ
    assert expected != pytest.approx((bce(0.5, 1) + bce(-1.0, 1) + bce(2.0, 1) + bce(0.3, 0)) / 4)
    # the head learns from it: its gradient pushes the wrong voxel's confidence down, the right ones' up
    a.requires_grad_(True)
    L.confidence_loss(a, logits, labels).backward()
    assert a.grad[0, 0, 3] > 0 and (a.grad[0, 0, :3] < 0).all()


def test_nnunet_shaped_targets_and_a_batch_without_a_right_voxel():
    logits = _logits([[(1, 2.0), (0, 2.0)], [(1, 2.0), (1, 2.0)]])  # (B=2, C=2, N=2)
    labels = torch.tensor([[1, 0], [0, 0]])
    assert L.pixel_accuracy(logits.argmax(1), labels[:, None]).tolist() == [1.0, 0.0]  # nnU-Net's (B, 1, ...) target
    with pytest.raises(ValueError, match='do not match'):
        L.pixel_accuracy(logits.argmax(1), labels[:1])
    # every voxel wrong: the loss still pushes every confidence down (the wrong voxels weigh 1, not 0)
    a = torch.zeros(1, 1, 2, requires_grad=True)
    loss = L.confidence_loss(a, logits[1:], labels[1:, None])
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert (a.grad > 0).all()


def test_the_gated_kl_is_the_tempered_kl_of_the_teacher_per_sample_and_zero_where_gated_out():
    student = torch.tensor([[[0.0], [1.0]], [[2.0], [0.0]]])  # (B=2, C=2, N=1)
    teacher = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])
    t = 2.0

    def kl(s, q):
        ps = [math.exp(v / t) for v in s]
        pq = [math.exp(v / t) for v in q]
        ps = [v / sum(ps) for v in ps]
        pq = [v / sum(pq) for v in pq]
        return sum(b * math.log(b / a) for a, b in zip(ps, pq)) / 2  # mean over the two classes

    k0, k1 = kl([0.0, 1.0], [1.0, 0.0]), kl([2.0, 0.0], [0.0, 1.0])
    assert float(L.gated_kl(student, teacher, torch.tensor([1.0, 1.0]), t)) == pytest.approx((k0 + k1) / 2, rel=1e-6)
    assert float(L.gated_kl(student, teacher, torch.tensor([0.0, 1.0]), t)) == pytest.approx(k1 / 2, rel=1e-6)
    assert float(L.gated_kl(student, teacher, torch.tensor([0.0, 0.0]), t)) == 0
    teacher.requires_grad_(True)
    s = student.clone().requires_grad_(True)
    L.gated_kl(s, teacher, torch.tensor([1.0, 1.0]), t).backward()
    assert teacher.grad is None and s.grad.abs().sum() > 0  # the teacher only teaches


def test_rpg_flips_labels_below_the_confidence_threshold():
    logits = _logits([[(1, 3.0), (0, 1.0), (1, 0.5), (0, 2.0)]])
    confidence = torch.tensor([[0.9, 0.29, 0.31, 0.1]])
    assert L.reliable_pseudo_labels(logits, confidence, 0.3).tolist() == [[1, 1, 1, 1]]
    # three classes: the runner-up class, not "1 - label"
    logits3 = torch.tensor([[[0.0], [3.0], [2.0]]])
    assert L.reliable_pseudo_labels(logits3, torch.tensor([[0.1]])).tolist() == [[2]]
    assert L.reliable_pseudo_labels(logits3, torch.tensor([[0.5]])).tolist() == [[1]]


def test_the_pseudo_label_comes_from_the_more_confident_view_and_the_image_gate_from_its_confidence():
    weak = _logits([[(0, 1.0), (1, 1.0), (1, 1.0)]])
    strong = _logits([[(1, 1.0), (0, 1.0), (0, 1.0)]])
    c_weak = torch.tensor([[0.9, 0.2, 0.6]])
    c_strong = torch.tensor([[0.8, 0.25, 0.7]])
    labels, confidence = L.pseudo_labels_from_two_views(weak, strong, c_weak, c_strong, 0.3)
    # voxel 0: weak wins (0); voxel 1: strong wins (0) but 0.25 < 0.3, flipped to 1; voxel 2: strong wins (0)
    assert labels.tolist() == [[0, 1, 0]]
    assert confidence[0].tolist() == pytest.approx([0.9, 0.25, 0.7])
    assert L.image_gate(confidence, 0.75).tolist() == [0.0]  # mean 0.617
    assert L.image_gate(torch.tensor([[0.8, 0.76], [0.9, 0.5]]), 0.75).tolist() == [1.0, 0.0]


def test_the_server_learns_per_sample_from_the_best_client_above_the_threshold_only():
    own = torch.zeros(3, 2, 1)
    clients = [torch.full((3, 2, 1), 1.0), torch.full((3, 2, 1), 2.0)]
    own_accuracy = torch.tensor([0.6, 0.9, 0.7])
    accuracies = [torch.tensor([0.8, 0.95, 0.72]), torch.tensor([0.85, 0.8, 0.74])]
    teacher, gate = L.best_teacher(own_accuracy, own, accuracies, clients, 0.75)
    # sample 0: client 1 (0.85) is best and above 0.75; sample 1: client 0 (0.95 > 0.9); sample 2: the best client
    # (0.74) is more accurate than the server (0.7) but not above 0.75: no teacher
    assert gate.tolist() == [1.0, 1.0, 0.0]
    assert teacher[:, 0, 0].tolist() == [2.0, 1.0, 2.0]
    assert L.pixel_accuracy(torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])
                            ).tolist() == [0.75, 0.75]


def test_feature_perturbation_consistency_weighs_classes_by_the_perturbed_probability():
    clean = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # (B=1, C=2, N=2)
    perturbed = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    p0 = (1 / (1 + math.exp(0.0)) + 1 / (1 + math.exp(-2.0))) / 2  # mean softmax probability of class 0
    expected = (p0 * 1.0 + (1 - p0) * 0.0) / 2
    assert float(L.feature_perturbation_loss(clean, perturbed)) == pytest.approx(expected, rel=1e-6)
    assert float(L.feature_perturbation_loss(clean, clean)) == 0


@pytest.mark.parametrize('configuration, network', [('3d_fullres', 'plain'), ('2d', 'plain'),
                                                    ('3d_fullres', 'resenc')])
def test_the_self_assessment_head_reads_the_unets_last_layer_and_learns_where_it_is_wrong(planned, configuration,
                                                                                         network):
    """On nnU-Net's own networks: one confidence logit per voxel, the U-Net's state dict unchanged (its checkpoint
    stays nnU-Net's), the confidence loss trains the head and the U-Net, and a few steps on a fixed batch lower it."""
    import json
    import os
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from fednnunet.federation import server_folder
    from fednnunet.networks.self_assessment import SelfAssessment
    from fednnunet.planners.site_networks import add_site_networks, network_configuration
    from conftest import DATASET_NAME
    folder = server_folder(DATASET_NAME)
    plans = json.load(open(os.path.join(folder, 'nnUNetCPUPlans.json')))
    dataset_json = json.load(open(os.path.join(folder, 'dataset.json')))
    plans, _ = add_site_networks(plans, dataset_json, {'x': {'network': network}})
    pm = PlansManager(plans)
    cm = pm.get_configuration(network_configuration(configuration, network))
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, True)
    keys = set(net.state_dict())
    sa = SelfAssessment(net, 3)
    assert set(net.state_dict()) == keys
    x = torch.randn(2, 1, *cm.patch_size)
    labels = torch.randint(0, 3, (2, *cm.patch_size))
    out = net(x)[0]
    a = sa.confidence_logits()
    assert a.shape == (2, 1, *cm.patch_size)
    L.confidence_loss(a, out, labels).backward()
    assert sa.head.out.weight.grad.abs().sum() > 0
    assert net.decoder.seg_layers[-1].weight.grad.abs().sum() > 0  # F and z are not detached
    optimizer = torch.optim.Adam(sa.head.parameters(), 1e-2)
    with torch.no_grad():
        fixed = net(x)[0]
    # the prediction is right where the input is positive, wrong elsewhere: something the head can learn to see
    top2 = fixed.topk(2, 1).indices
    labels = torch.where(x[:, 0] > 0, top2[:, 0], top2[:, 1])
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        with torch.no_grad():
            net(x)
        loss = L.confidence_loss(sa.confidence_logits(), fixed, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    sa.detach()
