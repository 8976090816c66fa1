"""Fixtures for the compression tests: a real trained digits teacher and real digits as a stand-in synthetic set.

The unit tests of distill/prune/quantize store *real* scikit-learn digits in the synthetic-set format
(with the teacher's own logits) because inverting a teacher takes minutes; that is fine for testing
the training, pruning and calibration machinery, but it is not data-free. The honest data-free
end-to-end test (synthesize -> distill) is the pipeline test's job.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from dfcompress.data.real import LabelledImages
from dfcompress.data.synthetic import write_synthetic_set
from dfcompress.models.embedded import ASSET, digits_split, embedded_teacher
from dfcompress.models.teacher import Teacher
from dfcompress.settings import resolve_settings


@lru_cache(maxsize=1)
def _trained_digits_teacher() -> Teacher:
    """The embedded teacher when its weights ship, else the same architecture trained here for a few seconds."""
    if ASSET.is_file():
        return embedded_teacher()
    from dfcompress.models.zoo import create_model

    split = digits_split()
    mean, std = 0.3, 0.4
    x = (split.x_train.float() / 255.0 - mean) / std
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("digits_cnn", num_classes=10, in_channels=1, input_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), split.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return Teacher(module=model, input_shape=(1, 8, 8), num_classes=10, mean=(mean,), std=(std,), format="state_dict",
                   source="tests:digits", sha256="0" * 64, arch="digits_cnn", class_names=[str(i) for i in range(10)])


def digits_teacher() -> Teacher:
    """A fresh Teacher object (stages move modules between devices) around the cached trained module."""
    import copy

    t = _trained_digits_teacher()
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
