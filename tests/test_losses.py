"""Unit tests of the inversion losses and augmentations (pure functions, tiny tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from dfcompress.distillation import kd_loss
from dfcompress.inversion import losses
from dfcompress.inversion.augment import jitter_flip, random_resized_crop


def test_total_variation_zero_for_constant_and_known_value():
    assert losses.total_variation(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # horizontal: one diff of 1, vertical: one diff of 1, diagonal (1,0)-(0,1): 0, diagonal (0,0)-(1,1): 1
    assert losses.total_variation(x).item() == pytest.approx(3.0)


def test_total_variation_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(2, 3, 16, 16)
    noisy = smooth + 0.5 * torch.randn(2, 3, 16, 16, generator=g)
    assert losses.total_variation(noisy) > 5 * losses.total_variation(smooth)


def test_l2_prior_is_batch_norm():
    x = torch.tensor([[[[3.0, 4.0]]]])
    assert losses.l2_prior(x).item() == pytest.approx(5.0)


def test_moments_match_batchnorm_definition():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    mean, var = losses.moments(f)
    assert torch.allclose(mean, f.mean((0, 2, 3)))
    assert torch.allclose(var, f.var((0, 2, 3), unbiased=False))


def test_global_stat_loss_zero_when_stats_match_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 4, 3, 3, generator=g)
    mean, var = losses.moments(f)
    assert losses.global_stat_loss(f, mean, var).item() == pytest.approx(0.0, abs=1e-6)
    shifted = losses.global_stat_loss(f, mean + torch.tensor([3.0, 0, 0, 4.0]), var)
    assert shifted.item() == pytest.approx(5.0, rel=1e-5)  # ||(3, 0, 0, 4)||_2


def _naive_class_moments(f, labels, classes):
    means, vars_ = [], []
    for c in classes:
        sel = f[labels == c]
        means.append(sel.mean((0, 2, 3)))
        vars_.append(sel.var((0, 2, 3), unbiased=False))
    return torch.stack(means), torch.stack(vars_)


def test_class_moments_match_naive_per_class_computation():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 1, 3, 3, 0, 1])
    f = torch.randn(6, 5, 4, 4, generator=g) + labels.view(-1, 1, 1, 1).float()
    index = losses.ClassIndex(labels)
    assert index.classes.tolist() == [0, 1, 3]
    mean_y, var_y = losses.class_moments(f, index)
    ref_mean, ref_var = _naive_class_moments(f, labels, [0, 1, 3])
    assert torch.allclose(mean_y, ref_mean, atol=1e-5)
    assert torch.allclose(var_y, ref_var, atol=1e-5)


def test_class_conditional_loss_zero_when_per_class_stats_match():
    g = torch.Generator().manual_seed(2)
    k, c = 4, 3
    labels = torch.tensor([0, 2, 2, 0, 2])
    f = torch.randn(5, c, 3, 3, generator=g)
    ref_mean, ref_var = _naive_class_moments(f, labels, [0, 2])
    target_mean = torch.randn(k, c, generator=g)  # classes 1 and 3 absent: their rows must not matter
    target_var = torch.rand(k, c, generator=g)
    target_mean[[0, 2]], target_var[[0, 2]] = ref_mean, ref_var
    index = losses.ClassIndex(labels)
    assert losses.class_conditional_stat_loss(f, index, target_mean, target_var).item() == pytest.approx(0.0, abs=1e-5)
    # wrong statistics for one of the two present classes -> half its distance (average over classes)
    target_mean[2] += torch.tensor([0.0, 3.0, 4.0])
    assert losses.class_conditional_stat_loss(f, index, target_mean, target_var).item() == pytest.approx(2.5, rel=1e-4)
    # a class marked as having no statistics is left out of the average
    valid = torch.tensor([True, True, False, True])
    assert losses.class_conditional_stat_loss(f, index, target_mean, target_var, valid).item() == pytest.approx(0.0, abs=1e-5)


def test_class_conditional_differs_from_global_for_mixed_classes():
    """Matching global statistics is not enough when the classes differ: that is the point of R_CC."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1])
    f = torch.randn(4, 2, 3, 3, generator=g)
    mean, var = losses.moments(f)
    index = losses.ClassIndex(labels)
    per_class_targets = (mean.expand(2, 2).clone() + torch.tensor([[1.0], [-1.0]]), var.expand(2, 2).clone())
    assert losses.global_stat_loss(f, mean, var).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.class_conditional_stat_loss(f, index, *per_class_targets).item() > 0.5


def test_layer_weights_and_weighted_sum():
    assert losses.layer_weights(3, 10.0) == [10.0, 1.0, 1.0]
    assert losses.layer_weights(0, 10.0) == []
    total = losses.weighted_sum([torch.tensor(1.0), torch.tensor(2.0)], [10.0, 1.0])
    assert total.item() == pytest.approx(12.0)


def test_js_divergence_symmetric_zero_and_bounded():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    assert losses.js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.js_divergence(a, b).item() == pytest.approx(losses.js_divergence(b, a).item(), rel=1e-6)
    assert losses.js_divergence(a, b).item() > 0
    far = losses.js_divergence(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]]))
    assert far.item() == pytest.approx(math.log(2.0), rel=1e-4)
    assert losses.competition_loss(a, a).item() == pytest.approx(1.0)


def test_info_nce_prefers_aligned_positives():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(8, 16, generator=g)
    aligned = losses.info_nce(keys + 0.01 * torch.randn(8, 16, generator=g), keys, 0.1)
    shuffled = losses.info_nce(keys.roll(1, 0), keys, 0.1)
    assert aligned.item() < 0.1 < shuffled.item()
    # memory-bank negatives after the positives make the task harder, never easier
    bank = torch.randn(32, 16, generator=g)
    assert losses.info_nce(keys.roll(1, 0), torch.cat([keys, bank]), 0.1) >= shuffled


def test_kd_loss_zero_for_identical_logits():
    x = torch.randn(4, 10)
    assert kd_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(x, -x).item() > 0


def test_jitter_flip_deterministic_and_identity_when_off():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    assert torch.equal(jitter_flip(x, 0, False, torch.Generator().manual_seed(0)), x)
    a = jitter_flip(x, 2, True, torch.Generator().manual_seed(7))
    b = jitter_flip(x, 2, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert sorted(a.flatten().tolist()) == sorted(x.flatten().tolist())  # a permutation of the pixels


def test_random_resized_crop_shape_and_gradient():
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    out = random_resized_crop(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    again = random_resized_crop(x.detach(), torch.Generator().manual_seed(0))
    assert torch.equal(out.detach(), again)


def test_moments_gradient_matches_autograd_reference():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)

    def ref(x):
        return (x.mean((0, 2, 3)) * w1).sum() + (x.var((0, 2, 3), unbiased=False) * w2).sum()

    def ours(x):
        mean, var = losses.moments(x)
        return (mean * w1).sum() + (var * w2).sum()

    x1, x2 = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    ref(x1).backward()
    ours(x2).backward()
    assert torch.allclose(x1.grad.float(), x2.grad.float(), atol=1e-5)


def test_moments_of_flat_features():
    """[N, C] features (BatchNorm1d inputs, Linear outputs) have per-channel moments over the batch only."""
    f = torch.randn(7, 3, generator=torch.Generator().manual_seed(7))
    mean, var = losses.moments(f)
    assert torch.allclose(mean, f.mean(0)) and torch.allclose(var, f.var(0, unbiased=False), atol=1e-6)
