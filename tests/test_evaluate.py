"""evaluate() on the real trained digits teacher and its real held-out split, plus the --max-drop gate."""
from __future__ import annotations

import pytest
import torch

from compress_helpers import digits_teacher, digits_test_data, fast_settings
from dfcompress.compress.gate import check_drop
from dfcompress.errors import GateFailed, UserError
from dfcompress.evaluate import agreement, evaluate, top1
from dfcompress.export import export_model
from dfcompress.models.introspect import count_params
from dfcompress.models.zoo import create_model


@pytest.fixture(scope="module")
def teacher():
    return digits_teacher()


def test_teacher_top1_size_and_latency(teacher):
    settings = fast_settings(**{"eval.latency_runs": 5})
    data = digits_test_data()
    r = evaluate(teacher, data, None, settings)
    assert r["num_images"] == 450 and r["top1"] > 90.0  # a trained teacher on real held-out digits
    assert r["agreement"] is None
    assert r["params"] == count_params(teacher.module) and r["macs"] > r["params"]
    lat = r["latency"]
    assert lat["provider"] == "CPUExecutionProvider" and lat["runs"] == 5
    for bs in (1, 32):
        b = lat[f"batch_{bs}"]
        assert 0 < b["p50_ms"] <= b["p90_ms"]
    assert r["onnx_bytes"] > 4 * r["params"] * 0.9  # fp32 weights dominate the exported file


def test_onnx_file_and_module_give_the_same_figures(tmp_path, teacher):
    settings = fast_settings()
    data = digits_test_data(limit=200)
    check = (data.x[:16].float() / 255 - teacher.mean[0]) / teacher.std[0]
    path = tmp_path / "t.onnx"
    export_model(teacher.module, teacher, "onnx", path, check)
    via_module = evaluate(teacher.module, data, teacher, settings, onnx_path=path)
    via_onnx = evaluate(path, data, teacher, settings)
    assert via_module["agreement"] == 100.0 and via_onnx["agreement"] == 100.0
    assert abs(via_module["top1"] - via_onnx["top1"]) < 1.0
    assert via_onnx["params"] >= 0.99 * via_module["params"]  # BN folded into the convs on export
    assert via_onnx["model_bytes"] == path.stat().st_size and via_onnx["macs"] is None


def test_untrained_student_agreement_is_low(teacher):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = create_model("wrn_16_1", num_classes=10, in_channels=1, input_size=8).eval()
    data = digits_test_data(limit=200)
    r = evaluate(student, data, teacher, fast_settings(), latency=False)
    assert r["agreement"] < 50.0 and r["top1"] < 50.0 and r["latency"] is None


def test_wrong_image_shape_is_a_user_error(teacher):
    from dfcompress.data.real import LabelledImages

    data = LabelledImages(x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), y=None, class_names=None, source="x")
    with pytest.raises(UserError, match="expects"):
        evaluate(teacher, data, None, fast_settings(), latency=False)


def test_metric_helpers():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert top1(logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    assert agreement(logits, logits.flip(1)) == 0.0


def test_gate_raises_with_exit_code_3():
    with pytest.raises(GateFailed) as exc:
        check_drop(91.0, 86.8, 2.0, "accuracy")
    assert exc.value.exit_code == 3
    assert str(exc.value) == "accuracy fell 4.2 pt (91.0 → 86.8), more than --max-drop 2.0"
    check_drop(91.0, 89.0, 2.0, "accuracy")  # exactly at the limit passes
    check_drop(91.0, 95.0, 0.0, "accuracy")  # improvements always pass
    check_drop(91.0, 10.0, None, "accuracy")  # no gate
    with pytest.raises(GateFailed, match="could not be measured"):
        check_drop(91.0, float("nan"), 1.0, "accuracy")
    with pytest.raises(UserError, match="non-negative"):
        check_drop(91.0, 90.0, -1.0, "accuracy")
