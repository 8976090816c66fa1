"""Each claimed part of an inversion method does something observable through ``synthesize_batch``.

The end-to-end tests (test_synthesizers.py) check that a method inverts the teacher, which stays true
when one of its parts is silently dropped. These tests pin the parts themselves, through the public
per-batch API and the public settings only:

- NaturalInversion's Feature Transfer Pyramid: the images depend on the pyramid's output (on the
  teacher's stage features and on the pyramid's weights), and the pyramid's weights learn;
- NaturalInversion's Adaptive Channel Scaling: the image is alpha ⊗ x with alpha drawn from
  (alpha_mean, alpha_std) and learnt per image and per channel;
- ADI's competition term: it is part of the loss with weight lambda_adi, moves the images when its
  weight changes, and exerts no pull when the student agrees with the teacher.

The teacher is an untrained 3-channel CNN (the mechanics, not inversion quality, are under test) with
non-trivial BN running statistics, so every loss term has a gradient; a batch takes milliseconds.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from dfcompress.device import resolve_runtime
from dfcompress.inversion.synthesizers import build_synthesizer
from dfcompress.models.teacher import Teacher
from dfcompress.models.zoo import create_model
from dfcompress.settings import SynthesizeSettings

CPU = resolve_runtime("cpu")
LABELS = torch.tensor([0, 1, 2, 3, 4, 5])
# mean 0.5 / std 0.25: pixels [0, 1] are [-2, 2] in the teacher's space, so alpha ~ 1 images are never clamped
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SMALL = dict(latent_dim=16, generator_width=16, jitter=0, flip=False)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("digits_cnn_small", num_classes=10, in_channels=3, input_size=8)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics a random input does not already match
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return Teacher(model.eval(), (3, 8, 8), 10, MEAN, STD, "state_dict", "test:fidelity", "7" * 64)


def _synth(teacher: Teacher, **overrides):
    return build_synthesizer(teacher, SynthesizeSettings(**{**SMALL, **overrides}), CPU)


def _space(teacher: Teacher, images01: torch.Tensor) -> torch.Tensor:
    """Stored images back in the teacher's input space, where I_hat = alpha ⊗ x lives."""
    return teacher.normalize(images01)


def _plane_gains(after: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares gain per (image, channel) plane of ``after ≈ gain * before``, and the worst residual."""
    gain = (after * before).sum((2, 3)) / (before * before).sum((2, 3))
    residual = (after - gain[..., None, None] * before).abs().amax()
    return gain, residual


# ------------------------------------------------------------------ Feature Transfer Pyramid


def _perturb_stage(module: nn.Module, name: str) -> Callable[[], None]:
    """Forward hook that shifts one stage's output (what the pyramid reads); returns its remover."""
    handle = module.get_submodule(name).register_forward_hook(lambda _m, _i, out: out + 1.0)
    return handle.remove


def test_naturalinversion_images_depend_on_the_teachers_stage_features(teacher):
    """With one iteration the stored image is alpha ⊗ FTP(g, f): shifting the deepest stage's features moves it."""
    synth = _synth(teacher, iterations=1)
    assert synth.stages, "the teacher should have resolution stages for the pyramid"
    plain = synth.synthesize_batch(LABELS, seed=0).images01
    remove = _perturb_stage(synth.model, synth.stages[-1].name)
    try:
        shifted = synth.synthesize_batch(LABELS, seed=0).images01
    finally:
        remove()
    assert torch.equal(synth.synthesize_batch(LABELS, seed=0).images01, plain)  # hook gone: same images again
    assert (shifted - plain).abs().amax() > 1e-3


def test_naturalinversion_pyramid_weights_learn_and_shape_the_images(teacher, monkeypatch):
    """Every pyramid parameter gets a gradient and moves; other pyramid weights give other images."""
    synth = _synth(teacher, iterations=3)
    build = synth.build_pyramid
    built: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def spy(seed: int) -> nn.Module:
        ftp = build(seed)
        built.append((ftp, {k: v.detach().clone() for k, v in ftp.named_parameters()}))
        return ftp

    monkeypatch.setattr(synth, "build_pyramid", spy)
    plain = synth.synthesize_batch(LABELS, seed=0).images01
    (ftp, initial), = built
    unchanged = [k for k, p in ftp.named_parameters() if torch.equal(p.detach(), initial[k])]
    assert not unchanged, f"pyramid parameters that never learnt: {unchanged}"

    def shifted_output(seed: int) -> nn.Module:
        ftp = build(seed)
        with torch.no_grad():
            ftp.out.bias.add_(0.5)  # the pyramid's last layer, right before its tanh
        return ftp

    monkeypatch.setattr(synth, "build_pyramid", shifted_output)
    other = synth.synthesize_batch(LABELS, seed=0).images01
    assert (other - plain).abs().amax() > 1e-3


def test_pyramid_computes_eq_5_literally(teacher):
    """m_1 = W1(up(f_N)), m_l = W1(up(W3(m_{l-1} + f_{N-l+1}))), out = tanh(W1(g + m_N)), written out with explicit resizes."""
    import torch.nn.functional as F

    from dfcompress.inversion.pyramid import FeatureTransferPyramid, StageTaps
    from dfcompress.models.stages import probe_stages

    model = teacher.module
    stages = probe_stages(model, teacher.input_shape)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ftp = FeatureTransferPyramid(stages, teacher.input_shape)
        for p in ftp.parameters():  # non-zero biases too, so every addition shows
            nn.init.normal_(p, 0.0, 0.3)
        g = torch.randn(2, *teacher.input_shape)
    with StageTaps(model, stages) as taps:
        feats = taps.capture(model, g)
    sizes = [(s.height, s.width) for s in reversed(stages)][1:] + [tuple(teacher.input_shape[1:])]
    m = None
    for block, f, size in zip(ftp.blocks, reversed(feats), sizes):
        x = f if m is None else block.conv3(m + f)
        m = block.conv1(F.interpolate(x, size=size, mode="nearest"))
    want = torch.tanh(ftp.out(g + m))
    with torch.no_grad():
        assert torch.allclose(ftp(g, feats), want, atol=1e-5)


# ------------------------------------------------------------------ Adaptive Channel Scaling


def test_channel_scaling_multiplies_the_image_by_alpha(teacher):
    """alpha_std 0: alpha = alpha_mean exactly, so doubling alpha_mean doubles the first image (same seed)."""
    one = _space(teacher, _synth(teacher, iterations=1, alpha_mean=0.5, alpha_std=0.0).synthesize_batch(LABELS, seed=0).images01)
    two = _space(teacher, _synth(teacher, iterations=1, alpha_mean=1.0, alpha_std=0.0).synthesize_batch(LABELS, seed=0).images01)
    assert one.abs().amax() > 0.05
    assert torch.allclose(two, 2.0 * one, atol=1e-5)


def test_channel_scaling_alpha_is_per_image_and_per_channel(teacher):
    """alpha ~ N(mean, std) of shape [B, C, 1, 1]: a larger std rescales each (image, channel) plane by its own gain."""
    narrow = _space(teacher, _synth(teacher, iterations=1, alpha_mean=1.0, alpha_std=0.1).synthesize_batch(LABELS, seed=0).images01)
    wide = _space(teacher, _synth(teacher, iterations=1, alpha_mean=1.0, alpha_std=0.2).synthesize_batch(LABELS, seed=0).images01)
    gain, residual = _plane_gains(wide, narrow)
    assert residual < 1e-4  # a pure per-plane gain (1 + 0.2 n) / (1 + 0.1 n), nothing else changed
    assert gain.std(0).amin() > 1e-3  # differs between images, for every channel
    assert gain.std(1).amin() > 1e-3  # differs between channels, for every image


def test_channel_scaling_alpha_is_learnt_per_image_and_per_channel(teacher):
    """With the generator and pyramid frozen (lr 0) only alpha can learn: the images get rescaled, plane by plane."""
    frozen_x = dict(alpha_mean=1.0, alpha_std=0.0, lr_generator=0.0, lr_pyramid=0.0)
    first = _space(teacher, _synth(teacher, iterations=1, **frozen_x).synthesize_batch(LABELS, seed=0).images01)
    res = _synth(teacher, iterations=12, **frozen_x).synthesize_batch(LABELS, seed=0)
    later = _space(teacher, res.images01)
    gain, residual = _plane_gains(later, first)
    assert residual < 1e-4  # nothing but alpha moved
    assert (gain - 1.0).abs().amax() > 0.05  # alpha learnt (it started at exactly 1)
    assert gain.std(0).amax() > 1e-3 and gain.std(1).amax() > 1e-3  # its own value per image and per channel
    assert res.history[-1]["total"] < res.history[0]["total"]
    # and without a learning rate for alpha nothing changes at all
    still = _synth(teacher, iterations=12, lr_scaling=0.0, **frozen_x).synthesize_batch(LABELS, seed=0)
    assert torch.allclose(_space(teacher, still.images01), first, atol=1e-6)


def _prior_terms(s: SynthesizeSettings, row: dict[str, float]) -> float:
    """The documented objective without method-specific terms: λ_ce CE + λ_bn R_stats + λ_tv TV + λ_l2 l2."""
    return s.lambda_ce * row["ce"] + s.lambda_bn * row["bn"] + s.lambda_tv * row["tv"] + s.lambda_l2 * row["l2"]


def test_naturalinversion_loss_is_the_weighted_sum_of_its_terms(teacher):
    """Each recorded term enters the optimised total with its own weight (weights chosen distinct so a mix-up shows)."""
    s = SynthesizeSettings(**SMALL, iterations=3, lambda_ce=1.5, lambda_bn=0.7, lambda_tv=0.3, lambda_l2=0.2)
    res = build_synthesizer(teacher, s, CPU).synthesize_batch(LABELS, seed=0)
    for row in res.history:
        assert min(row["ce"], row["bn"], row["tv"], row["l2"]) > 0
        assert row["total"] == pytest.approx(_prior_terms(s, row), rel=1e-5)


# ------------------------------------------------------------------ ADI competition term


ADI = dict(method="adi", adi_student="digits_cnn_small", iterations=6, lr_pixels=0.1)


def test_adi_loss_includes_the_weighted_competition_term(teacher):
    """total = the DeepInversion terms + lambda_adi * (1 - JS/ln2), at every iteration."""
    s = SynthesizeSettings(**SMALL, **ADI, lambda_adi=3.0)
    res = build_synthesizer(teacher, s, CPU).synthesize_batch(LABELS, seed=0)
    for row in res.history:
        assert 0.0 <= row["adi"] < 1.0  # a fresh student disagrees with the teacher
        assert row["total"] == pytest.approx(_prior_terms(s, row) + 3.0 * row["adi"], rel=1e-5, abs=1e-6)


def test_adi_competition_weight_moves_the_images(teacher):
    """A larger lambda_adi pulls the same seed's pixels elsewhere, and lowers the competition term further."""
    low = _synth(teacher, **ADI, lambda_adi=1.0).synthesize_batch(LABELS, seed=0)
    high = _synth(teacher, **ADI, lambda_adi=50.0).synthesize_batch(LABELS, seed=0)
    assert (high.images01 - low.images01).abs().amax() > 1e-3
    assert high.history[-1]["adi"] < low.history[-1]["adi"]


def test_adi_student_that_agrees_with_the_teacher_exerts_no_pull(teacher):
    """JS(teacher, teacher) = 0 is a minimum: with the teacher as its own student lambda_adi changes nothing."""
    images = []
    for weight in (1.0, 50.0):
        synth = _synth(teacher, **ADI, lambda_adi=weight)
        synth.student = copy.deepcopy(teacher.module)
        res = synth.synthesize_batch(LABELS, seed=0)
        assert all(row["adi"] == pytest.approx(1.0, abs=1e-6) for row in res.history)
        images.append(res.images01)
    assert torch.allclose(images[0], images[1], atol=1e-5)


def test_pixel_clamp_is_straight_through():
    """pixel_clamp: the teacher sees exactly the clamped pixels, yet saturated pixels keep an identity gradient."""
    from dfcompress.inversion.synthesizers.common import straight_through_clamp

    lo, hi = torch.tensor(-1.0).view(1, 1, 1, 1), torch.tensor(2.0).view(1, 1, 1, 1)
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0, 5.0]).view(1, 1, 1, 5).requires_grad_(True)
    out = straight_through_clamp(x, lo, hi)
    assert torch.equal(out.detach(), x.detach().clamp(-1.0, 2.0))
    (out * torch.arange(1.0, 6.0).view(1, 1, 1, 5)).sum().backward()
    assert torch.equal(x.grad, torch.arange(1.0, 6.0).view(1, 1, 1, 5))
