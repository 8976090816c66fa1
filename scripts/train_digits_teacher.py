"""Reproduce the embedded default teacher (dfcompress/assets/digits_cnn.safetensors).

Trains the zoo's ``digits_cnn`` on the fixed training split of scikit-learn's digits (real images that
ship with scikit-learn) and stores the weights plus preprocessing and held-out accuracy as metadata.
Deterministic on CPU: `python scripts/train_digits_teacher.py` writes the same file twice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfcompress.fileio import atomic_path  # noqa: E402
from dfcompress.models.embedded import ARCH, ASSET, digits_split  # noqa: E402
from dfcompress.models.zoo import create_model  # noqa: E402


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to one pixel with zero fill: cheap augmentation for 8x8 digits."""
    n = x.shape[0]
    padded = F.pad(x, [max_shift] * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    split = digits_split()
    x_tr = split.x_train.float() / 255.0
    mean = [round(float(x_tr.mean()), 4)]
    std = [round(float(x_tr.std()), 4)]
    norm = lambda x: (x.float() / 255.0 - mean[0]) / std[0]  # noqa: E731
    xtr, ytr = norm(split.x_train), split.y_train
    xte, yte = norm(split.x_test), split.y_test

    model = create_model(ARCH, num_classes=10, in_channels=1, input_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(xtr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(shift(xtr[idx], g)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item() * 100
        print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out top-1 {acc:.2f}%", file=sys.stderr)

    from safetensors.torch import save_file

    meta = {"arch": ARCH, "mean": mean, "std": std, "test_top1": round(acc, 2), "epochs": args.epochs,
            "seed": args.seed, "train_images": len(xtr), "test_images": len(xte),
            "data": "sklearn.datasets.load_digits, stratified 75/25 split random_state=0"}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp), metadata={"dfcompress": json.dumps(meta)})
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
