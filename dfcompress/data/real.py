"""Real images from disk: seed images for statistics and labelled test sets for evaluation.

Accepted sources: an ImageFolder directory (one sub-folder per class), a flat folder of unlabelled
images, an ``.npz`` with ``x`` (uint8 NHWC or NHW) and ``y``, or ``digits:train`` / ``digits:test``
(the embedded teacher's own split). Images come back as uint8 NCHW resized to the teacher's H x W,
so every consumer gets pixels in one format; channel mismatches are the user's to fix, not ours to
guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class LabelledImages:
    x: torch.Tensor                 # uint8 [N, C, H, W]
    y: Optional[torch.Tensor]       # int64 [N], or None for unlabelled images
    class_names: Optional[list[str]]
    source: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_images(path: str | Path, input_shape: tuple[int, int, int], num_classes: Optional[int] = None,
                limit: Optional[int] = None, per_class: Optional[int] = None, seed: int = 0,
                labels_optional: bool = False) -> LabelledImages:
    """Load images for a teacher taking ``input_shape`` (C, H, W).

    ``per_class`` keeps the first k images of each class (seed images); ``limit`` then keeps a random
    (``seed``) subset of that many, in original order. Selection happens before decoding.
    ``labels_optional`` accepts an .npz without ``y`` (training sets label by the teacher's logits;
    evaluation needs labels, so it stays strict by default).
    """
    c, h, w = (int(v) for v in input_shape)
    text = str(path)
    if text.startswith("digits:"):
        return _digits(text, (c, h, w), num_classes, limit, per_class, seed)
    p = Path(path)
    if not p.exists():
        raise UserError(f"image source {p} not found; pass an ImageFolder directory, an .npz file or digits:test")
    if p.is_dir():
        return _folder(p, (c, h, w), num_classes, limit, per_class, seed)
    if p.suffix.lower() == ".npz":
        return _npz(p, (c, h, w), num_classes, limit, per_class, seed, labels_optional)
    raise UserError(f"cannot read images from {p}: use an ImageFolder directory (one sub-folder per class) or an .npz with x and y")


# -- selection -------------------------------------------------------------------------------------

def _select(labels: Optional[Sequence[int]], n: int, limit: Optional[int], per_class: Optional[int], seed: int) -> list[int]:
    """Indices to keep: first ``per_class`` per class, then a seeded random ``limit`` subset in order."""
    idx = list(range(n))
    if per_class is not None:
        if per_class < 1:
            raise UserError(f"images per class must be >= 1, got {per_class}")
        if labels is None:
            raise UserError("keeping k images per class needs labelled images (class sub-folders or y in the .npz)")
        seen: dict[int, int] = {}
        kept = []
        for i in idx:
            c = int(labels[i])
            if seen.get(c, 0) < per_class:
                seen[c] = seen.get(c, 0) + 1
                kept.append(i)
        idx = kept
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        if limit < len(idx):
            g = torch.Generator().manual_seed(int(seed))
            pick = torch.randperm(len(idx), generator=g)[:limit].sort().values.tolist()
            idx = [idx[i] for i in pick]
    return idx


def _check_labels(y: torch.Tensor, num_classes: Optional[int], source: str) -> None:
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"{source} has labels {int(y.min())}..{int(y.max())} but the teacher has {num_classes} classes (labels must lie in [0, {num_classes}))")


# -- pixel conversion ------------------------------------------------------------------------------

def _fit(img, path: str, c: int, h: int, w: int) -> np.ndarray:
    """A Pillow image -> uint8 array [C, H, W] at the teacher's size (bilinear), refusing channel mismatches."""
    from PIL import Image

    channels = 1 if img.mode in _GRAY_MODES else 3
    if channels != c:
        raise UserError(f"the teacher takes {c}-channel input but {path} holds {channels}-channel images")
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_file(path: Path, c: int, h: int, w: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return _fit(img, str(path), c, h, w)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc.__class__.__name__}; remove or replace the file") from None


# -- sources ---------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _folder(root: Path, shape, num_classes, limit, per_class, seed) -> LabelledImages:
    c, h, w = shape
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    # every sub-folder is a class (an empty one keeps its index so labels do not shift)
    class_dirs = subdirs if any(_image_files(d) for d in subdirs) else []
    if class_dirs:
        names = [d.name for d in class_dirs]
        if all(n.isdigit() for n in names):
            index = {n: int(n) for n in names}
            class_names = None
        else:
            index = {n: i for i, n in enumerate(names)}
            class_names = names
        files, labels = [], []
        for d in class_dirs:
            for f in _image_files(d):
                files.append(f)
                labels.append(index[d.name])
        y_all = torch.tensor(labels, dtype=torch.int64)
        _check_labels(y_all, num_classes, str(root))
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        labels, class_names, y_all = None, None, None
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTS))}); use one sub-folder of images per class")
    keep = _select(labels, len(files), limit, per_class, seed)
    x = np.stack([_read_file(files[i], c, h, w) for i in keep])
    y = y_all[keep] if y_all is not None else None
    return LabelledImages(torch.from_numpy(x), y, class_names, str(root))


def _npz(path: Path, shape, num_classes, limit, per_class, seed, labels_optional: bool = False) -> LabelledImages:
    c, h, w = shape
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as .npz: {exc}") from None
    if "x" not in keys or ("y" not in keys and not labels_optional):
        raise UserError(f"{path} must hold arrays 'x' (uint8 images, NHWC or NHW) and 'y' (labels); found {sorted(keys)}")
    x, y = data["x"], (data["y"] if "y" in keys else None)
    if x.dtype != np.uint8:
        raise UserError(f"{path}: 'x' must be uint8 pixels 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise UserError(f"{path}: 'x' must be NHWC or NHW, got shape {x.shape}")
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3):  # tolerate NCHW
        x = x.transpose(0, 2, 3, 1)
    if y is not None and (y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer)):
        raise UserError(f"{path}: 'y' must be {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    if x.shape[-1] != c:
        raise UserError(f"the teacher takes {c}-channel input but {path} holds {x.shape[-1]}-channel images")
    if x.shape[0] == 0:
        raise UserError(f"{path} holds no images ('x' is empty)")
    y_all = torch.from_numpy(y.astype(np.int64)) if y is not None else None
    if y_all is not None:
        _check_labels(y_all, num_classes, str(path))
    keep = _select(y_all.tolist() if y_all is not None else None, x.shape[0], limit, per_class, seed)
    x = x[keep]
    if x.shape[1:3] != (h, w):
        from PIL import Image

        x = np.stack([_fit(Image.fromarray(im[..., 0] if c == 1 else im), str(path), c, h, w).transpose(1, 2, 0) for im in x])
    names = None
    for key in ("label_names", "class_names"):
        if key in keys:
            names = [str(s) for s in data[key].tolist()]
    y_kept = y_all[keep] if y_all is not None else None
    return LabelledImages(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), y_kept, names, str(path))


def _digits(name: str, shape, num_classes, limit, per_class, seed) -> LabelledImages:
    if name not in ("digits:train", "digits:test"):
        raise UserError(f"unknown image source {name!r}; use digits:train or digits:test")
    from ..models.embedded import digits_split

    split = digits_split()
    x, y = (split.x_train, split.y_train) if name == "digits:train" else (split.x_test, split.y_test)
    if tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"{name} holds {tuple(x.shape[1:])} images but the teacher takes {tuple(shape)}; use it with the embedded digits teacher")
    y = y.to(torch.int64)
    _check_labels(y, num_classes, name)
    keep = _select(y.tolist(), x.shape[0], limit, per_class, seed)
    keep_t = torch.tensor(keep, dtype=torch.long)
    return LabelledImages(x[keep_t].contiguous(), y[keep_t], [str(i) for i in range(10)], name)
