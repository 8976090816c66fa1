"""The synthesis runner: files, balanced labels, exact resume after a crash, NaN retries, ranks, ADI.

Most tests drive the runner with ``PixelCE``, a small but real inversion method defined here (Adam on
pixels against the teacher's cross-entropy), so they exercise the runner's own logic quickly; the
last ones use the project's real synthesizers (ADI, NaturalInversion) with a few iterations.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfcompress.data.synthetic import SyntheticSet, teacher_logits
from dfcompress.device import resolve_runtime
from dfcompress.errors import NumericalError, UserError
from dfcompress.inversion.runner import finalize, shard_labels, synthesize
from dfcompress.seeds import synthesis_seed
from dfcompress.inversion.synthesizers.base import BatchResult, Synthesizer
from dfcompress.models.teacher import Teacher
from dfcompress.settings import Settings

CPU = resolve_runtime("cpu")


def tiny_teacher(classes: int = 4) -> Teacher:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return Teacher(m, (3, 8, 8), classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "state_dict", "tiny", "cd" * 32)


def make_settings(n: int = 12, batch: int = 4, iterations: int = 3, **synth) -> Settings:
    s = Settings()
    s.seed = 7
    s.synthesize.method = "deepinversion"
    s.synthesize.num_images, s.synthesize.batch_size, s.synthesize.iterations = n, batch, iterations
    s.synthesize.preview_per_class = 2
    for k, v in synth.items():
        setattr(s.synthesize, k, v)
    return s


class PixelCE(Synthesizer):
    """A tiny real inversion method: Adam on normalised pixels minimising CE (+ a small l2 prior).

    ``fail_calls``: call numbers (1-based) whose loss is made NaN, to exercise the retry path;
    ``nan_images_calls``: calls that return NaN pixels without raising (a buggy method).
    """

    name = "pixel-ce"

    def __init__(self, teacher, settings, runtime, stats=None, fail_calls=(), nan_images_calls=()):
        super().__init__(teacher, settings, runtime, stats)
        self.calls = 0
        self.seeds: list[int] = []
        self.fail_calls, self.nan_images_calls = set(fail_calls), set(nan_images_calls)

    def synthesize_batch(self, labels, seed, on_step=None) -> BatchResult:
        self.calls += 1
        self.seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(labels.shape[0], *self.teacher.input_shape, generator=g).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.1)
        history = []
        for it in range(self.settings.iterations):
            ce = F.cross_entropy(self.teacher.module(x), labels)
            l2 = x.pow(2).mean()
            total = ce + 1e-3 * l2
            if self.calls in self.fail_calls:
                total = total * float("nan")
            if not torch.isfinite(total):
                raise NumericalError(f"loss became {total.item()} at iteration {it}")
            h = {"total": total.item(), "ce": ce.item(), "l2": l2.item()}
            history.append(h)
            if on_step:
                on_step(it, h)
            opt.zero_grad()
            total.backward()
            opt.step()
        images = self.teacher.denormalize(x.detach()).clamp(0, 1)
        if self.calls in self.nan_images_calls:
            images[0, 0, 0, 0] = float("nan")
        return BatchResult(images, history, history[-1]["total"])


class CrashingProgress:
    """A progress sink whose ``update`` (called from the runner's on_step) raises on its n-th call: a crash mid-shard."""

    def __init__(self, crash_at: int):
        self.crash_at, self.updates = crash_at, 0

    def add_task(self, *a, **k) -> int:
        return 0

    def advance(self, *a, **k) -> None:
        pass

    def update(self, *a, **k) -> None:
        self.updates += 1
        if self.updates == self.crash_at:
            raise KeyboardInterrupt("simulated crash")


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def run(out, settings, teacher=None, synth=None, **kw):
    teacher = teacher or tiny_teacher()
    synth = synth or PixelCE(teacher, settings.synthesize, CPU)
    return synthesize(teacher, settings, out, CPU, synthesizer=synth, **kw), synth


# -- helpers -------------------------------------------------------------------------------------

def test_stable_seed_and_balanced_shard_labels():
    assert synthesis_seed(7, 0, 1, 0) == synthesis_seed(7, 0, 1, 0) != synthesis_seed(7, 0, 1, 1)
    lab = shard_labels(7, 2, 8, 12, 4)
    assert sorted(lab.tolist()) == [0, 1, 2, 3] and torch.equal(lab, shard_labels(7, 2, 8, 12, 4))


# -- a complete run ------------------------------------------------------------------------------

def test_complete_run_files_labels_and_logits(tmp_path):
    teacher = tiny_teacher()
    settings = make_settings(n=10, batch=4)
    manifest, synth = run(tmp_path, settings, teacher)
    assert synth.calls == 3
    for name in ("manifest.json", "preview.png", "loss.csv", "loss.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["num_images"] == 10 and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["counts_per_class"] == [3, 3, 2, 2]  # image i has class i % K
    assert manifest["seed"] == 7 and manifest["settings"]["num_images"] == 10 and manifest["retries"] == 0
    assert manifest["teacher"]["sha256"] == teacher.sha256
    ds = SyntheticSet(tmp_path)
    for k, shard in enumerate(manifest["shards"]):
        images, labels, logits = ds.shard(k)
        assert sorted(labels.tolist()) == sorted((torch.arange(4 * k, 4 * k + shard["count"]) % 4).tolist())
        assert torch.equal(logits, teacher_logits(teacher, images))  # teacher logits on the stored uint8 pixels
    rows = list(csv.reader((tmp_path / "loss.csv").open()))
    assert rows[0] == ["shard", "batch", "iteration", "total", "ce", "l2"] and len(rows) == 1 + 3 * 3
    assert float(rows[1][3]) == pytest.approx(synth_first_total(tmp_path))


def synth_first_total(d: Path) -> float:
    side = json.loads((d / "shards" / "shard-00000.json").read_text())
    assert side["loss"]["batches"][0]["retries"] == 0
    return json.loads((d / "shards" / "shard-00000.loss.json").read_text())["rows"][0][2]


def test_shard_size_independent_of_batch(tmp_path):
    manifest, synth = run(tmp_path, make_settings(n=9, batch=2, shard_size=5))
    assert [s["count"] for s in manifest["shards"]] == [5, 4] and synth.calls == 3 + 2


# -- resume --------------------------------------------------------------------------------------

def test_crash_then_resume_is_byte_identical(tmp_path):
    settings = make_settings(n=12, batch=4)
    run(tmp_path / "clean", settings)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", settings, progress=CrashingProgress(crash_at=3))  # dies at the start of shard 2
    partial = tmp_path / "crashed"
    assert not (partial / "manifest.json").exists()
    assert sorted(p.name for p in (partial / "shards").glob("*.safetensors")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    _, synth = run(partial, settings)
    assert synth.calls == 1  # only the unfinished shard was made
    assert files(tmp_path / "clean") == files(partial)


def test_damaged_shard_is_redone(tmp_path):
    settings = make_settings(n=8, batch=4)
    run(tmp_path / "a", settings)
    clean = files(tmp_path / "a")
    shard = tmp_path / "a" / "shards" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    _, synth = run(tmp_path / "a", settings)
    assert synth.calls == 1 and files(tmp_path / "a") == clean


def test_more_images_extends_the_set(tmp_path):
    run(tmp_path / "direct", make_settings(n=12, batch=4))
    run(tmp_path / "grown", make_settings(n=6, batch=4))  # shards [4, 2]
    _, synth = run(tmp_path / "grown", make_settings(n=12, batch=4))
    assert synth.calls == 2  # the partial shard 1 and the new shard 2
    assert files(tmp_path / "direct") == files(tmp_path / "grown")


def test_refuses_to_mix_runs(tmp_path):
    run(tmp_path, make_settings(n=4, batch=4))
    with pytest.raises(UserError, match="different lr_pixels.*--overwrite"):
        run(tmp_path, make_settings(n=4, batch=4, lr_pixels=0.5))
    other = make_settings(n=4, batch=4)
    other.seed = 8
    with pytest.raises(UserError, match="different seed"):
        run(tmp_path, other)
    (tmp_path / "run.json").unlink()
    with pytest.raises(UserError, match="not from a resumable synthesize run"):
        run(tmp_path, make_settings(n=4, batch=4))


# -- numerical failures --------------------------------------------------------------------------

def test_nan_batch_is_retried_with_a_new_seed(tmp_path):
    settings = make_settings(n=8, batch=4)
    teacher = tiny_teacher()
    synth = PixelCE(teacher, settings.synthesize, CPU, fail_calls={1}, nan_images_calls={3})
    manifest, _ = run(tmp_path, settings, teacher, synth)
    assert synth.calls == 4 and synth.seeds[0] == synthesis_seed(7, 0, 0, 0) and synth.seeds[1] == synthesis_seed(7, 0, 0, 1)
    assert [s["retries"] for s in manifest["shards"]] == [1, 1] and manifest["retries"] == 2
    side = json.loads((tmp_path / "shards" / "shard-00000.json").read_text())
    assert side["retries"] == 1 and side["loss"]["batches"][0]["seed"] == synthesis_seed(7, 0, 0, 1)
    ds = SyntheticSet(tmp_path)
    assert all(torch.isfinite(ds[i][2]).all() for i in range(len(ds)))


def test_gives_up_after_max_retries_without_writing(tmp_path):
    settings = make_settings(n=4, batch=4, max_retries=2)
    teacher = tiny_teacher()
    synth = PixelCE(teacher, settings.synthesize, CPU, fail_calls={1, 2, 3})
    with pytest.raises(NumericalError, match="all 3 attempts"):
        run(tmp_path, settings, teacher, synth)
    assert synth.calls == 3 and not list((tmp_path / "shards").glob("*.safetensors"))


def test_nan_teacher_is_refused_up_front(tmp_path):
    teacher = tiny_teacher()
    teacher.module[-1].bias.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN/inf logits"):
        run(tmp_path, make_settings(n=4), teacher)
    assert not (tmp_path / "run.json").exists()  # refused before anything was written


# -- ranks ---------------------------------------------------------------------------------------

def test_two_ranks_equal_one(tmp_path):
    settings = make_settings(n=12, batch=4)
    run(tmp_path / "one", settings)
    teacher = tiny_teacher()
    r1, s1 = run(tmp_path / "two", settings, teacher, rank=1, world_size=2)
    assert r1 == {"rank": 1, "shards": [1]} and not (tmp_path / "two" / "manifest.json").exists()
    with pytest.raises(UserError, match="shard 0 .* missing"):
        finalize(teacher, settings, tmp_path / "two")
    run(tmp_path / "two", settings, teacher, rank=0, world_size=2)
    finalize(teacher, settings, tmp_path / "two")
    assert files(tmp_path / "one") == files(tmp_path / "two")


# -- real synthesizers ---------------------------------------------------------------------------

STATEFUL = {  # methods whose batches depend on earlier ones: (settings, sequential shards of 3)
    "adi": (dict(method="adi", adi_student="digits_cnn"), 3),
    "cmi": (dict(method="cmi", latent_dim=16, cmi_bank_size=64, cmi_head_dim=8), 3),
    "fast-ni": (dict(method="fast-ni", latent_dim=16, meta_shards=2), 2),
}


@pytest.mark.parametrize("method", list(STATEFUL))
def test_stateful_methods_carry_state_and_resume_exactly(tmp_path, method):
    extra, sequential = STATEFUL[method]
    settings = make_settings(n=6, batch=2, iterations=2, **extra)
    manifest = synthesize(tiny_teacher(), settings, tmp_path / "clean", CPU)
    assert manifest["sequential_shards"] == sequential and manifest["method"] == method
    assert len(list((tmp_path / "clean" / "shards").glob("state-*.safetensors"))) == sequential
    with pytest.raises(KeyboardInterrupt):
        synthesize(tiny_teacher(), settings, tmp_path / "crashed", CPU, progress=CrashingProgress(crash_at=3))
    synthesize(tiny_teacher(), settings, tmp_path / "crashed", CPU)  # a fresh process: state reloaded from shard 1
    assert files(tmp_path / "clean") == files(tmp_path / "crashed")


@pytest.mark.parametrize("method", ["cmi", "fast-ni"])
def test_stateful_methods_on_two_ranks_equal_one(tmp_path, method):
    """Rank 0 makes the sequential shards, then each rank its share of the rest from the saved state."""
    extra, _ = STATEFUL[method]
    settings = make_settings(n=8, batch=2, iterations=2, **extra)
    synthesize(tiny_teacher(), settings, tmp_path / "one", CPU)
    waited = []
    r0 = synthesize(tiny_teacher(), settings, tmp_path / "two", CPU, rank=0, world_size=2, barrier=lambda: waited.append(0))
    r1 = synthesize(tiny_teacher(), settings, tmp_path / "two", CPU, rank=1, world_size=2, barrier=lambda: waited.append(1))
    if method == "cmi":  # every shard sequential: rank 0 makes them all, nobody waits
        assert r0["shards"] == [0, 1, 2, 3] and r1["shards"] == [] and waited == []
    else:  # meta_shards=2: shards 0-1 on rank 0, then shard k on rank k % 2 from the frozen meta-state
        assert r0["shards"] == [0, 1, 2] and r1["shards"] == [3] and waited == [0, 1]
    finalize(tiny_teacher(), settings, tmp_path / "two")
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_cmi_memory_bank_spans_shards_and_feeds_the_loss(tmp_path):
    """Shard 0 starts with an empty bank in both runs; shard 1's contrastive loss sees shard 0's features only with a bank."""
    made = {}
    for bank in (64, 0):
        settings = make_settings(n=4, batch=2, iterations=2, method="cmi", latent_dim=16, cmi_bank_size=bank, cmi_head_dim=8)
        synthesize(tiny_teacher(), settings, tmp_path / str(bank), CPU)
        made[bank] = SyntheticSet(tmp_path / str(bank))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "64" / "shards" / "state-00001.safetensors"), framework="pt") as f:
        bank_rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.startswith("bank")]
    assert bank_rows == [4]  # both shards' images are in the bank after shard 1
    assert torch.equal(made[64].shard(0)[0], made[0].shard(0)[0])
    assert not torch.equal(made[64].shard(1)[0], made[0].shard(1)[0])


def test_naturalinversion_end_to_end(tmp_path):
    settings = make_settings(n=4, batch=2, iterations=3, method="naturalinversion", latent_dim=16)
    manifest = synthesize(tiny_teacher(), settings, tmp_path, CPU)
    assert manifest["method"] == "naturalinversion" and manifest["num_images"] == 4
    ds = SyntheticSet(tmp_path)
    img, label, logits = ds[3]
    assert img.shape == (3, 8, 8) and 0 <= img.min() and img.max() <= 1 and logits.shape == (4,)
    assert (tmp_path / "preview.png").is_file() and (tmp_path / "loss.png").is_file()


def test_projected_synthesis_time_is_said_up_front(tmp_path, capsys, monkeypatch):
    from dfcompress.inversion.runner import _Projection

    run(tmp_path / "short", make_settings(n=8, batch=4, iterations=5))
    assert "projected" not in capsys.readouterr().err  # a run of seconds needs no forecast
    monkeypatch.setattr(_Projection, "SAY_AFTER_S", 0.0)
    run(tmp_path / "long", make_settings(n=8, batch=4, iterations=5))
    err = capsys.readouterr().err
    assert "projected synthesis time" in err and "x 5 iterations x 2 batch(es) of 4" in err


def test_long_naturalinversion_runs_point_to_fast_ni():
    from dfcompress.inversion.runner import _Projection

    s = make_settings(n=1024, batch=64, iterations=2000, method="naturalinversion").synthesize
    text = _Projection(s, shards=16).message(per_iteration_s=1.5)
    assert "13.3 h" in text and "--method fast-ni" in text
    assert "fast-ni" not in _Projection(s, shards=16).message(per_iteration_s=0.001)  # short runs: no advice
