"""KD loop and distill stage on a real trained digits teacher.

The "synthetic" set here is made of real scikit-learn digits written in the synthetic-set format
(see compress_helpers): these are unit tests of the training machinery, not of data-free quality.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from compress_helpers import digits_as_synthetic_set, digits_teacher, digits_test_data, fast_settings
from dfcompress.compress.distill import build_student, distill
from dfcompress.compress.kd import CHECKPOINT, KDConfig, augment, train_kd
from dfcompress.distillation import kd_loss
from dfcompress.data.synthetic import SyntheticSet
from dfcompress.device import resolve_runtime
from dfcompress.errors import UserError
from dfcompress.models.model_dir import read_model_dir

CPU = resolve_runtime("cpu")


@pytest.fixture(scope="module")
def teacher():
    return digits_teacher()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory, teacher):
    return digits_as_synthetic_set(tmp_path_factory.mktemp("syn"), teacher, n=512)


def test_kd_loss_is_hinton_kl_times_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p, q = F.softmax(t / 3, 1), F.softmax(s / 3, 1)
    manual = (p * (p.log() - q.log())).sum(1).mean() * 9
    assert torch.allclose(kd_loss(s, t, 3.0), manual, atol=1e-6)
    assert kd_loss(t, t, 3.0).abs().item() < 1e-6


def test_augment_is_seeded_crops_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    a = augment(x, torch.Generator().manual_seed(3), padding=1, flip=True)
    b = augment(x, torch.Generator().manual_seed(3), padding=1, flip=True)
    assert torch.equal(a, b) and a.shape == x.shape
    # every output row is a (possibly flipped, shifted) window of the zero-padded input
    padded = F.pad(x, [1] * 4)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    assert torch.equal(augment(x, torch.Generator(), padding=0, flip=False), x)


def test_kd_config_takes_missing_fields_from_fallback():
    s = fast_settings(**{"prune.lr": 0.02, "distill.crop_padding": 3, "distill.optimizer": "adam"})
    cfg = KDConfig.from_section(s.prune, s.distill)
    assert (cfg.lr, cfg.crop_padding, cfg.optimizer, cfg.batch_size) == (0.02, 3, "adam", s.prune.batch_size)


def test_distill_student_agrees_with_teacher(tmp_path, teacher, synth_dir):
    settings = fast_settings(**{"distill.epochs": 3, "distill.batch_size": 32, "distill.lr": 0.1,
                                "distill.student": "digits_cnn_small"})
    data = digits_test_data()
    m = distill(teacher, None, synth_dir, settings, tmp_path / "out", CPU, eval_data=data)
    # chance is 10%: a student that learned nothing from the teacher cannot pass this
    assert m["agreement"] > 60.0 and m["top1"] > 60.0, m
    assert m["holdout_agreement"] > 50.0
    assert m["teacher_top1"] > 90.0
    assert m["student"] == "digits_cnn_small" and m["student_params"] < m["teacher_params"]
    assert m["student_macs"] > 0 and m["teacher_macs"] > m["student_macs"]
    losses = [h["loss"] for h in m["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    desc = read_model_dir(tmp_path / "out")
    assert desc["created_by"] == "distill" and desc["arch"] == "digits_cnn_small"
    assert set(desc["files"]) == {"state_dict", "onnx"}
    assert desc["input_shape"] == [1, 8, 8] and desc["num_classes"] == 10 and desc["mean"] == list(teacher.mean)
    assert desc["exports"]["onnx"]["max_abs_diff"] < 1e-3
    # the state_dict reloads into the zoo architecture and reproduces the student
    from safetensors.torch import load_file

    _, fresh = build_student("digits_cnn_small", teacher, seed=123)
    fresh.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert json.loads((tmp_path / "out" / "dfcompress.json").read_text())["teacher_sha256"] == teacher.sha256


def _student(teacher):
    return build_student("wrn_16_1", teacher, seed=0)[1]


def test_resume_after_crash_is_bit_exact(tmp_path, teacher, synth_dir):
    train = Subset(SyntheticSet(synth_dir), range(160))
    cfg = KDConfig(batch_size=48, lr=0.05, temperature=4.0, crop_padding=1, flip=True)

    straight = _student(teacher)
    train_kd(straight, teacher, train, cfg, CPU, tmp_path / "a", epochs=3, seed=5)

    calls = {"n": 0}

    def crash_in_third_epoch(model):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return {}

    crashed = _student(teacher)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_kd(crashed, teacher, train, cfg, CPU, tmp_path / "b", epochs=3, seed=5, eval_fn=crash_in_third_epoch)
    state = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 2

    resumed = _student(teacher)  # a new process would start from fresh weights
    result = train_kd(resumed, teacher, train, cfg, CPU, tmp_path / "b", epochs=3, seed=5)
    assert result["resumed_from_epoch"] == 2 and len(result["history"]) == 3
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # a different seed really changes the result (so the equality above is not vacuous)
    other = _student(teacher)
    train_kd(other, teacher, train, cfg, CPU, tmp_path / "c", epochs=3, seed=6)
    assert not torch.equal(other.state_dict()["fc.weight"], a["fc.weight"])

    # re-running a finished run trains nothing and keeps the weights
    again = _student(teacher)
    done = train_kd(again, teacher, train, cfg, CPU, tmp_path / "a", epochs=3, seed=5)
    assert done["resumed_from_epoch"] == 3 and torch.equal(again.state_dict()["fc.weight"], a["fc.weight"])


def test_resume_with_other_settings_is_refused(tmp_path, teacher, synth_dir):
    small = Subset(SyntheticSet(synth_dir), range(64))
    cfg = KDConfig(batch_size=128, lr=0.05, temperature=4.0)
    train_kd(_student(teacher), teacher, small, cfg, CPU, tmp_path, epochs=1)
    other = KDConfig(batch_size=128, lr=0.01, temperature=4.0)
    with pytest.raises(UserError, match="lr=0.05"):
        train_kd(_student(teacher), teacher, small, other, CPU, tmp_path, epochs=1)


def test_nan_learning_rate_is_reported(tmp_path, teacher, synth_dir):
    from dfcompress.errors import NumericalError

    small = Subset(SyntheticSet(synth_dir), range(128))
    cfg = KDConfig(batch_size=32, lr=1e30, temperature=4.0)
    with pytest.raises(NumericalError, match="lower the learning rate"):
        train_kd(_student(teacher), teacher, small, cfg, CPU, tmp_path, epochs=2)


@pytest.mark.parametrize("how", ["mixup", "cutmix"])
def test_mix_batch_blends_each_image_with_a_partner_deterministically(how):
    from dfcompress.compress.kd import mix_batch

    x = torch.rand(6, 3, 8, 8)
    a = mix_batch(x, torch.Generator().manual_seed(1), how)
    b = mix_batch(x, torch.Generator().manual_seed(1), how)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    if how == "cutmix":  # every pixel comes from the image itself or from one partner image
        from_self = (a == x).all(1)
        assert from_self.any() and (~from_self).any()
    else:  # convex combinations stay inside the pixel range
        assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(mix_batch(x, torch.Generator().manual_seed(1), "none"), x)


def test_mixing_changes_what_the_student_learns_and_resumes_exactly(tmp_path, teacher, synth_dir):
    """--mix reaches the KD loop (the student differs from plain KD) and stays seeded (two runs are equal)."""
    train = Subset(SyntheticSet(synth_dir), range(96))
    weights = {}
    for how in ("none", "mixup", "mixup-again"):
        cfg = KDConfig(batch_size=32, lr=0.05, temperature=4.0, mix=how.split("-")[0])
        student = _student(teacher)
        train_kd(student, teacher, train, cfg, CPU, tmp_path / how, epochs=1, seed=5)
        weights[how] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert not torch.equal(weights["none"], weights["mixup"])
    assert torch.equal(weights["mixup"], weights["mixup-again"])
