"""The embedded default teacher: a small BN CNN trained on scikit-learn's 8x8 digits.

It lets every command run with no files at all (``dfcompress prune --ratio 0.9``) and, because its
real held-out split ships with scikit-learn, lets the demo and the tests measure real accuracy.
The weights are reproduced by ``scripts/train_digits_teacher.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .teacher import Teacher

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_cnn.safetensors"
ARCH = "digits_cnn"
SPLIT_SEED = 0
TEST_FRACTION = 0.25
CLASS_NAMES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor  # uint8 [N, 1, 8, 8]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """The fixed stratified 75/25 split the teacher was trained/tested on (real data, no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # digits pixels are 0..16; map to 0..255 so they are ordinary uint8 images
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return DigitsSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te))


def _read_asset() -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(ASSET), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dfcompress", "{}"))
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def embedded_teacher() -> Teacher:
    from ..errors import UserError
    from ..fileio import sha256_file
    from .zoo import create_model

    if not ASSET.is_file():
        raise UserError(f"the embedded teacher weights are missing ({ASSET}); reinstall dfcompress or run scripts/train_digits_teacher.py")
    state, meta = _read_asset()
    module = create_model(ARCH, num_classes=10, in_channels=1, input_size=8)
    module.load_state_dict(state, strict=True)
    module.eval()
    return Teacher(
        module=module,
        input_shape=(1, 8, 8),
        num_classes=10,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        format="embedded",
        source="embedded:digits",
        sha256=sha256_file(ASSET),
        arch=ARCH,
        class_names=CLASS_NAMES,
        extra={"real_test_data": "digits:test", "trained_test_top1": meta.get("test_top1")},
    )
