"""FeatureStats: per-channel feature statistics of a teacher, the target of the inversion's BN/feature loss.

Two kinds exist: ``bn-running`` (read from BatchNorm running buffers, global) and ``collected``
(measured on real seed images, usually per class, the only option for BN-folded teachers). Both
are stored in one safetensors file whose JSON metadata names the layers, the teacher hash and the
preprocessing, so a stats file can never be silently applied to the wrong model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from ..errors import UserError
from ..fileio import atomic_path
from ..models.taps import StatLayer, stat_layers
from ..models.teacher import Teacher

FORMAT = "dfcompress-stats/1"
REGENERATE = "regenerate them with `dfcompress stats MODEL -o FILE` (add --seeds DIR or --data DIR for BN-free teachers)"


@dataclass
class FeatureStats:
    """Per-layer channel mean/var: ``[C]`` when global, ``[K, C]`` when per class (float64).

    ``var`` is the population (biased) variance over images and spatial positions for collected
    statistics, and BatchNorm's running_var for ``bn-running``.
    """

    layers: list[StatLayer]
    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    counts: torch.Tensor  # int64 [K] images per class, or [1] (0 = unknown, for bn-running)
    per_class: bool
    kind: Literal["bn-running", "collected"]
    teacher_sha256: str
    mean_pre: tuple[float, ...]
    std_pre: tuple[float, ...]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. labels_from_teacher, empty_classes
    path: Optional[str] = None  # where it was loaded from / saved to, for messages

    @property
    def num_classes(self) -> Optional[int]:
        return int(self.counts.shape[0]) if self.per_class else None

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    def lookup(self, name: str, labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of layer ``name``: rows for ``labels`` ([B, C]) when per class and labels given, else global [C]."""
        mean, var = self.mean[name], self.var[name]
        if not self.per_class:
            return mean, var
        if labels is None:
            return self.global_stats(name)
        idx = labels.to(torch.long).cpu()
        return mean[idx], var[idx]

    def global_stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool per-class statistics into global ones (count-weighted, law of total variance)."""
        mean, var = self.mean[name], self.var[name]
        if not self.per_class:
            return mean, var
        w = self.counts.to(torch.float64)
        if w.sum() <= 0:
            w = torch.ones_like(w)
        w = (w / w.sum()).unsqueeze(1)
        m = (w * mean.double()).sum(0)
        v = (w * (var.double() + (mean.double() - m) ** 2)).sum(0)
        return m.to(mean.dtype), v.to(var.dtype)

    # -- persistence ----------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "layers": [{"name": l.name, "side": l.side, "channels": l.channels} for l in self.layers],
            "classes": self.num_classes,
            "counts": self.counts.tolist(),
            "per_class": self.per_class,
            "kind": self.kind,
            "teacher_sha256": self.teacher_sha256,
            "preprocessing": {"mean": list(self.mean_pre), "std": list(self.std_pre)},
            "source": self.source,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Atomically write a safetensors file (tensors ``mean/<layer>``, ``var/<layer>``, ``counts``)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {"counts": self.counts.to(torch.int64).contiguous()}
        for l in self.layers:
            tensors[f"mean/{l.name}"] = self.mean[l.name].contiguous()
            tensors[f"var/{l.name}"] = self.var[l.name].contiguous()
        # a single metadata key keeps the file byte-deterministic (safetensors does not order several)
        meta = {"dfcompress": json.dumps({"format": FORMAT, **self._metadata()}, sort_keys=True)}
        target = Path(path)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.path = str(target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read a file written by ``save``; UserError for anything else."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise UserError(f"statistics file {p} not found; create it with `dfcompress stats MODEL -o {p}`")
        not_ours = UserError(f"{p} is not a dfcompress statistics file; create one with `dfcompress stats MODEL -o FILE`")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("dfcompress", "{}"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise not_ours
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError):
            raise not_ours from None
        try:
            layers = [StatLayer(d["name"], d["side"], int(d["channels"])) for d in meta["layers"]]
            mean = {l.name: tensors[f"mean/{l.name}"] for l in layers}
            var = {l.name: tensors[f"var/{l.name}"] for l in layers}
            pre = meta["preprocessing"]
            return cls(layers=layers, mean=mean, var=var, counts=tensors["counts"], per_class=bool(meta["per_class"]),
                       kind=meta["kind"], teacher_sha256=meta["teacher_sha256"], mean_pre=tuple(pre["mean"]),
                       std_pre=tuple(pre["std"]), source=meta.get("source", ""), extra=meta.get("extra", {}), path=str(p))
        except (KeyError, TypeError, ValueError):
            raise not_ours from None

    # -- checks ---------------------------------------------------------------------------------
    def check_matches(self, teacher: Teacher) -> None:
        """Refuse statistics made for another model (hash, layer names/channels or preprocessing differ)."""
        where = self.path or "the statistics"
        if self.teacher_sha256 != teacher.sha256:
            raise UserError(f"{where} was made for another teacher (sha256 {self.teacher_sha256[:12]}…, this one is {teacher.sha256[:12]}…); {REGENERATE}")
        expected = stat_layers(teacher.module, teacher.input_shape)
        if [(l.name, l.channels) for l in expected] != [(l.name, l.channels) for l in self.layers]:
            raise UserError(f"{where} describes different layers than {teacher.source} ({len(self.layers)} vs {len(expected)}); {REGENERATE}")
        if self.per_class and self.num_classes != teacher.num_classes:
            raise UserError(f"{where} has {self.num_classes} classes but the teacher has {teacher.num_classes}; {REGENERATE}")
        if self.kind == "collected" and (_differs(self.mean_pre, teacher.mean) or _differs(self.std_pre, teacher.std)):
            raise UserError(f"{where} was collected with preprocessing mean={list(self.mean_pre)} std={list(self.std_pre)}, "
                            f"but the teacher uses mean={list(teacher.mean)} std={list(teacher.std)}; {REGENERATE} or pass the matching --mean/--std")


def _differs(a, b, tol: float = 1e-6) -> bool:
    return len(a) != len(b) or any(abs(float(x) - float(y)) > tol for x, y in zip(a, b))
