"""Every stage that feeds a module data puts the module and the data on the same device.

Without a GPU the ``meta`` device stands in for one: a Runtime whose device is meta must move every
module that runs, and every input it sees, to meta. A forward pre-hook records the device of each
module call's own weights and inputs; a CPU module fed meta inputs would not fail (meta wins), so the
record, not an exception, is what shows a mismatch. Meta tensors hold no data, so a stage stops at
its first copy back to the host; that copy comes after the forwards whose placement is checked.
With CUDA present the same tests run on the GPU to the end (``pytest -m device``, bench/gpu_check.sh).

The onnxruntime stages cannot run on meta at all; for them a tensor subclass that refuses ``numpy()``
until ``cpu()`` was called stands in for a GPU tensor.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from compress_helpers import digits_as_synthetic_set, digits_teacher, digits_test_data
from dfcompress.compress.kd import KDConfig, train_kd
from dfcompress.data.synthetic import SyntheticSet, teacher_logits
from dfcompress.device import Runtime, module_device, resolve_runtime
from dfcompress.evaluate import module_logits
from dfcompress.stats.collect import collect_stats

pytestmark = pytest.mark.device


def _targets() -> list:
    meta = pytest.param(lambda: Runtime(torch.device("meta"), None, channels_last=False), id="meta")
    cuda = pytest.param(lambda: resolve_runtime("cuda"), id="cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))
    return [meta, cuda]


@contextlib.contextmanager
def placement(**roots: nn.Module):
    """{root name: set of device types} seen by the calls of every submodule of each root."""
    seen: dict[str, set[str]] = {name: set() for name in roots}
    handles = []
    for name, root in roots.items():
        def hook(mod, args, name=name):
            own = (*mod.parameters(recurse=False), *mod.buffers(recurse=False))
            seen[name].update(t.device.type for t in (*own, *(a for a in args if isinstance(a, Tensor))))
        handles += [m.register_forward_pre_hook(hook) for m in root.modules()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_until_host_copy(fn, runtime: Runtime) -> None:
    """Run a stage; on meta it ends at its first copy of a result back to the host."""
    if runtime.device.type != "meta":
        fn()
        return
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        fn()


def _assert_on(seen: dict[str, set[str]], runtime: Runtime) -> None:
    for name, devices in seen.items():
        assert devices == {runtime.device.type}, f"{name} ran with tensors on {sorted(devices)}"


@pytest.fixture
def teacher():
    return digits_teacher()  # a fresh module per test: stages move it


INFERENCE_PATHS = {  # each runs the teacher on 16 real digits, batch 8
    "collect_stats": lambda teacher, data, rt: collect_stats(teacher, data.x, data.y, runtime=rt, batch_size=8),
    "module_logits": lambda teacher, data, rt: module_logits(teacher.module, data.x, teacher, rt, batch_size=8),
    "teacher_logits": lambda teacher, data, rt: teacher_logits(teacher, data.x, rt, batch_size=8),
}


@pytest.mark.parametrize("path", list(INFERENCE_PATHS))
@pytest.mark.parametrize("make_runtime", _targets())
def test_inference_paths_run_the_teacher_on_the_runtime_device(teacher, make_runtime, path):
    runtime = make_runtime()
    data = digits_test_data(limit=16)
    with placement(teacher=teacher.module) as seen:
        run_until_host_copy(lambda: INFERENCE_PATHS[path](teacher, data, runtime), runtime)
    _assert_on(seen, runtime)


@pytest.mark.parametrize("make_runtime", _targets())
def test_batchnorm_recalibration_runs_on_the_runtime_device(teacher, make_runtime):
    """prune's BN re-estimation feeds the pruned model stored images: model and images on the runtime device
    (on meta it stops at the first BN layer, which reads its batch counter on the host)."""
    from dfcompress.compress.bn_recalibration import recalibrate_batchnorm

    runtime = make_runtime()
    with placement(model=teacher.module) as seen:
        run_until_host_copy(lambda: recalibrate_batchnorm(teacher.module, digits_test_data(limit=16).x, teacher, runtime,
                                                          batch_size=8), runtime)
    assert seen["model"], "the model never ran"
    _assert_on(seen, runtime)


@pytest.mark.parametrize("make_runtime", _targets())
def test_kd_step_runs_teacher_and_student_on_the_runtime_device(tmp_path, teacher, make_runtime):
    from dfcompress.compress.distill import build_student

    runtime = make_runtime()
    synth = digits_as_synthetic_set(tmp_path / "syn", digits_teacher(), n=48, shard_size=16)
    student = build_student("digits_cnn", teacher, seed=0)[1]
    cfg = KDConfig(batch_size=16, lr=0.01, temperature=4.0, crop_padding=1, flip=True)
    with placement(teacher=teacher.module, student=student) as seen:
        run_until_host_copy(lambda: train_kd(student, teacher, Subset(SyntheticSet(synth), range(40)), cfg, runtime,
                                             tmp_path / "ckpt", epochs=1, seed=0), runtime)
    assert seen["student"], "the student never ran"
    _assert_on(seen, runtime)


def test_module_device_reads_parameters_then_buffers():
    assert module_device(nn.Linear(2, 2).to("meta")).type == "meta"
    assert module_device(nn.BatchNorm2d(2, affine=False).to("meta")).type == "meta"
    assert module_device(nn.ReLU()).type == "cpu"


# ----------------------------------------------------------------------------------------------
# onnxruntime reads host memory: inputs must leave the device before it sees them


class OffHost(Tensor):
    """A tensor that behaves as if it lived on an accelerator: ``numpy()`` refuses, ``cpu()`` brings it home."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is Tensor.numpy:
            raise TypeError("can't convert an accelerator tensor to numpy; copy it to the host first")
        if func is Tensor.cpu:
            return args[0].as_subclass(Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_onnx_inputs_are_copied_to_the_host_first(tmp_path, teacher):
    from dfcompress.compress.quantize import SyntheticCalibrationReader
    from dfcompress.export import export_model, onnx_session, run_onnx

    images = digits_test_data(limit=6).x.float().div(255.0)
    off = images.as_subclass(OffHost)
    with pytest.raises(TypeError):
        off.numpy()  # the stand-in really refuses

    reader = SyntheticCalibrationReader([(img, 0, None) for img in off], range(6), teacher, "input", batch_size=4)
    batch = reader.get_next()["input"]
    assert batch.dtype.name == "float32" and batch.flags.c_contiguous and batch.shape == (4, *teacher.input_shape)

    path = tmp_path / "m.onnx"
    check = teacher.normalize(images)
    export_model(teacher.module, teacher, "onnx", path, check.as_subclass(OffHost), prefer_cuda=False)
    got = run_onnx(onnx_session(path, prefer_cuda=False), check.as_subclass(OffHost))
    assert got.shape == (6, teacher.num_classes)


def test_export_device_is_honoured_or_refused(tmp_path):
    """``export --device`` picks onnxruntime's provider for the parity check; an unusable one exits 2."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "dfcompress", "export", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True)
    bad = run("--device", "tpu", "-o", "a.onnx")
    assert bad.returncode == 2 and "--device" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        missing = run("--device", "cuda", "-o", "b.onnx")
        assert missing.returncode == 2 and "no CUDA GPU" in missing.stderr and not (tmp_path / "b.onnx").exists()
    ok = run("--device", "cpu", "-o", "c.onnx")
    assert ok.returncode == 0, ok.stderr
    assert "CPUExecutionProvider" in ok.stdout


def test_gpu_check_script_parses_and_lists_its_steps():
    """bench/gpu_check.sh cannot run without a GPU; its syntax and plan can (within the 8-minute budget)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    plan = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd="/")
    assert plan.returncode == 0, plan.stderr
    steps = [line.split() for line in plan.stdout.splitlines()]
    assert [s[0] for s in steps] == ["setup", "tests", "demo", "speed", "quality"]
    assert sum(int(s[1].rstrip("s")) for s in steps) <= 8 * 60
    assert all("--device cuda" in line for line in plan.stdout.splitlines()[2:])
    assert "-m device" in plan.stdout and "--quick" in plan.stdout and "--budget tiny" in plan.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_kd_loader_pins_batches_for_cuda(tmp_path):
    from dfcompress.compress.loader import KDLoader

    synth = digits_as_synthetic_set(tmp_path / "syn", digits_teacher(), n=32, shard_size=8)
    images, labels, logits = next(iter(KDLoader(SyntheticSet(synth), 8, seed=0, pin_memory=True).epoch(0)))
    assert images.is_pinned() and labels.is_pinned() and logits.is_pinned()
