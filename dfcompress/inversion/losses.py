"""Inversion losses as pure functions of tensors (no hooks, no modules, no state).

The synthesizers collect features with hooks and hand plain tensors here, so every term can be
unit-tested on its own and reused by NaturalInversion, DeepInversion/ADI and CMI alike.

Conventions follow the papers' reference code, whose default weights (lambda_TV = 6e-3,
lambda_l2 = 1.5e-5) were tuned for them: TV and l2 are norms over the *whole batch* (so their weight
grows like sqrt(batch size)), the statistics term is a *sum* over layers of l2 distances (eq. 3).
Everything is computed in float32 whatever the autocast dtype of the features.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def total_variation(x: Tensor) -> Tensor:
    """R_TV: l2 norms of the horizontal, vertical and both diagonal pixel differences (DeepInversion's ``loss_var_l2``)."""
    x = x.float()
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return torch.linalg.vector_norm(d1) + torch.linalg.vector_norm(d2) + torch.linalg.vector_norm(d3) + torch.linalg.vector_norm(d4)


def l2_prior(x: Tensor) -> Tensor:
    """R_l2 = ||x||_2 over the batch: keeps the image norm small (eq. 4)."""
    return torch.linalg.vector_norm(x.float())


class _SpatialMoments(torch.autograd.Function):
    """(E[x], E[x^2]) over the last dim of [N, C, L] in float32, with a one-pass backward.

    Autograd's own backward of ``mean`` and ``x * x`` makes four full-size passes per layer; this one
    makes a single ``addcmul`` (dE/dx = g1/L + 2 g2 x / L). It runs on every statistics layer every
    iteration, where it was ~15% of a NaturalInversion step on CPU. The low-precision input (autocast)
    is what is saved, not a float32 copy.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(x)
        xf = x.float()
        return xf.mean(2), (xf * xf).mean(2)

    @staticmethod
    def backward(ctx: Any, g1: Tensor, g2: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        n = x.shape[2]
        grad = torch.addcmul((g1 / n).unsqueeze(2), (g2 * (2.0 / n)).unsqueeze(2), x.float())
        return grad.to(x.dtype)


def _spatial_moments(feat: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel E[x] and E[x^2] over the spatial dims ([N, C] each; 2-D features pass through)."""
    if feat.dim() <= 2:
        feat = feat.float()
        return feat, feat * feat
    return _SpatialMoments.apply(feat.flatten(2))


def moments(feat: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance over every dim but dim 1 (what BN normalises with).

    Computed as E[x^2] - E[x]^2 from per-sample spatial sums: twice as fast as ``var_mean`` over
    (N, H, W) on CPU, forward and backward, and this runs on every statistics layer every iteration.
    The cancellation error (~1e-7 * mean^2 / var, relative) is negligible for conv/BN features.
    """
    m1, m2 = _spatial_moments(feat)
    mean = m1.mean(0)
    return mean, (m2.mean(0) - mean * mean).clamp_min(0.0)


def stat_distance(mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor) -> Tensor:
    """||mu - mu_hat||_2 + ||var - var_hat||_2 for one layer (eq. 3 / You-Get-What-You-Sow eq. 7).

    With leading class dims ([P, C]) the distance is taken per row and returned per row ([P]).
    """
    target_mean = target_mean.to(mean.dtype)
    target_var = target_var.to(var.dtype)
    return torch.linalg.vector_norm(mean - target_mean, dim=-1) + torch.linalg.vector_norm(var - target_var, dim=-1)


def global_stat_loss(feat: Tensor, target_mean: Tensor, target_var: Tensor) -> Tensor:
    """DeepInversion's R_BN term of one layer: batch statistics vs stored (running) statistics."""
    mean, var = moments(feat)
    return stat_distance(mean, var, target_mean, target_var)


class ClassIndex:
    """Which class each sample belongs to, computed once per batch (labels stay fixed while optimising).

    ``classes`` [P] are the distinct labels present, ``inverse`` [B] maps samples to rows of ``classes``,
    ``counts`` [P] is the number of samples per present class.
    """

    def __init__(self, labels: Tensor):
        self.classes, self.inverse, self.counts = torch.unique(labels, return_inverse=True, return_counts=True)


def class_moments(feat: Tensor, index: ClassIndex) -> tuple[Tensor, Tensor]:
    """Per-class channel mean/variance [P, C] over (samples of the class, spatial positions).

    Per-sample spatial moments are summed into their class rows with one ``index_add_`` (no loop
    over classes); every sample has the same number of positions, so class moments are plain averages.
    """
    m1, m2 = _spatial_moments(feat)
    p, c = index.classes.numel(), m1.shape[1]
    counts = index.counts.to(m1.device, torch.float32).unsqueeze(1)
    inverse = index.inverse.to(m1.device)
    mean_y = m1.new_zeros(p, c).index_add_(0, inverse, m1) / counts
    sq_y = m2.new_zeros(p, c).index_add_(0, inverse, m2) / counts
    return mean_y, (sq_y - mean_y * mean_y).clamp_min(0.0)


def class_conditional_stat_loss(
    feat: Tensor, index: ClassIndex, target_mean: Tensor, target_var: Tensor, valid: Tensor | None = None
) -> Tensor:
    """F_l of You-Get-What-You-Sow eq. 7 averaged over the classes present in the batch.

    ``target_mean``/``target_var`` are [K, C] per-class statistics; ``valid`` [K] marks classes that
    have statistics at all (a class without seed images cannot be regularised and is left out).
    """
    mean_y, var_y = class_moments(feat, index)
    classes = index.classes.to(target_mean.device)
    per_class = stat_distance(mean_y, var_y, target_mean[classes].to(feat.device), target_var[classes].to(feat.device))
    if valid is None:
        return per_class.mean()
    keep = valid.to(per_class.device)[index.classes.to(per_class.device)].to(per_class.dtype)
    return (per_class * keep).sum() / keep.sum().clamp_min(1.0)


def layer_weights(n: int, first_multiplier: float) -> list[float]:
    """DeepInversion's ``first_bn_multiplier``: extra weight on the first statistics layer."""
    return [float(first_multiplier)] + [1.0] * (n - 1) if n else []


def weighted_sum(terms: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_l w_l * term_l (eq. 3's sum over layers)."""
    if not terms:
        raise ValueError("no statistics layers to sum over")
    total = terms[0] * weights[0]
    for t, w in zip(terms[1:], weights[1:]):
        total = total + t * w
    return total


def js_divergence(logits_p: Tensor, logits_q: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between two softmaxes, averaged over the batch.

    Symmetric and zero for identical logits; ADI's competition term is ``1 - JS / ln 2``.
    """
    p = F.softmax(logits_p.float() / temperature, dim=1)
    q = F.softmax(logits_q.float() / temperature, dim=1)
    m = 0.5 * (p + q)
    log_m = m.clamp_min(1e-12).log()
    kl_pm = (p * (p.clamp_min(1e-12).log() - log_m)).sum(1)
    kl_qm = (q * (q.clamp_min(1e-12).log() - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def competition_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """ADI: 1 - JS/ln2, minimised where teacher and student disagree (DeepInversion uses T = 3)."""
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature) / math.log(2.0)


def info_nce(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """Contrastive instance discrimination (CMI eq. 7): query i's positive is key i, all other keys are negatives.

    ``queries`` [B, D], ``keys`` [B + M, D] (the batch's positives followed by M memory-bank negatives);
    both are l2-normalised here, so the logits are cosine similarities / temperature.
    """
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    logits = q @ k.t() / temperature
    target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, target)


