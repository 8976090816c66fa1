"""Fixtures for the compression tests: a real trained digits teacher and real digits as a stand-in synthetic set.

The unit tests of distill/prune/quantize store *real* scikit-learn digits in the synthetic-set format
(with the teacher's own logits) because inverting a teacher takes minutes; that is fine for testing
the training, pruning and calibration machinery, but it is not data-free. The honest data-free
end-to-end test (synthesize -> distill) is the pipeline test's job.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dfcompress.data.real import LabelledImages
from dfcompress.data.synthetic import write_synthetic_set
from dfcompress.models.embedded import digits_split, embedded_teacher
from dfcompress.models.teacher import Teacher
from dfcompress.settings import resolve_settings


@lru_cache(maxsize=1)
def _embedded() -> Teacher:
    return embedded_teacher()


def digits_teacher() -> Teacher:
    """The embedded digits teacher (real, trained; ~99% held-out top-1) as a fresh object per call,
    because stages move the module between devices and formats."""
    import copy

    t = _embedded()
    return Teacher(**{**t.__dict__, "module": copy.deepcopy(t.module).eval()})


def digits_test_data(limit: int | None = None) -> LabelledImages:
    split = digits_split()
    x, y = split.x_test, split.y_test
    if limit:
        x, y = x[:limit], y[:limit]
    return LabelledImages(x=x, y=y, class_names=[str(i) for i in range(10)], source="digits:test")


def digits_as_synthetic_set(out_dir: Path, teacher: Teacher, n: int = 512, shard_size: int = 128) -> Path:
    """Write the first ``n`` real digits training images as a synthetic set (teacher labels and logits)."""
    from dfcompress.data.synthetic import teacher_logits

    images = digits_split().x_train[:n].contiguous()
    logits = teacher_logits(teacher, images)
    return write_synthetic_set(out_dir, images, logits.argmax(1), logits, teacher, method="real-digits",
                               shard_size=shard_size)


def fast_settings(**overrides):
    """ci-smoke profile plus the digits augmentation (1 px crops, no flips) and explicit overrides."""
    base = {"device": "cpu", "distill.crop_padding": 1, "distill.flip": False, "eval.latency_runs": 3}
    base.update(overrides)
    return resolve_settings("ci-smoke", base)
