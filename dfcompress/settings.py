"""Typed settings, YAML profiles and their precedence: defaults < profile < explicit CLI flags.

Each pipeline stage owns one section dataclass. Field metadata carries the validation rules
(``choices``, ``min``, ``max``) so a profile typo or a wrong type gives one line naming the key and what
is allowed, instead of a crash twenty minutes into a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError

# the YAML files live in the repository's top-level profiles/ (users read and copy them there); dfcompress/profiles
# links to it, and the wheel ships them as package data (tests/test_packaging.py builds one to check)
PROFILE_DIR = (Path(__file__).parent / "profiles").resolve()


def _f(default: Any, help: str = "", **rules: Any) -> Any:
    """A dataclass field with validation rules; mutable defaults are copied."""
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PreprocessSettings:
    mean: Optional[list[float]] = _f(None, "per-channel mean of the teacher's input normalisation; default from the model's metadata")
    std: Optional[list[float]] = _f(None, "per-channel std; default from the model's metadata")


@dataclass
class SynthesizeSettings:
    method: str = _f("naturalinversion", "inversion method (fast-ni: NaturalInversion with a meta-learned generator, few iterations per batch)",
                     choices=["naturalinversion", "fast-ni", "deepinversion", "adi", "cmi"])
    num_images: int = _f(1024, "images to synthesize (-n)", min=1)
    batch_size: int = _f(64, "images optimised together; NaturalInversion re-initialises its generator per batch", min=1)
    iterations: int = _f(2000, "optimisation steps per batch", min=1)
    shard_size: Optional[int] = _f(None, "images per shard file (default: batch size)", min=1)
    lr_generator: float = _f(1e-3, "Adam lr of the generator (NaturalInversion, CMI)", min=0.0)
    lr_pyramid: float = _f(5e-4, "Adam lr of the Feature Transfer Pyramid", min=0.0)
    lr_scaling: float = _f(5e-2, "Adam lr of Adaptive Channel Scaling", min=0.0)
    lr_pixels: float = _f(0.05, "Adam lr on pixels (DeepInversion/ADI)", min=0.0)
    lr_latent: float = _f(1e-3, "Adam lr of the latent codes (CMI, fast-ni)", min=0.0)
    meta_update: str = _f("reptile", "fast-ni: how the meta-generator learns from each batch's adaptation", choices=["reptile", "fomaml"])
    meta_lr: Optional[float] = _f(None, "fast-ni: Adam lr of the meta-generator (default: lr_generator x iterations, as Fast-DFKD)", min=0.0)
    meta_shards: Optional[int] = _f(None, "fast-ni: leading shards that keep meta-learning, made in order; later shards start from the frozen meta-generator and run in parallel under torchrun (null: every shard learns)", min=0)
    meta_pyramid: bool = _f(True, "fast-ni: meta-learn the Feature Transfer Pyramid too (off: a fresh pyramid per batch)")
    latent_dim: int = _f(1024, "generator latent size (NaturalInversion table 6: 1024)", min=1)
    generator_width: int = _f(128, "widest generator conv (table 6: 128); narrower for tiny teachers, where the generator would cost more than the teacher", min=4)
    alpha_mean: float = _f(5.0, "Adaptive Channel Scaling init mean (paper: N(5,1))")
    alpha_std: float = _f(1.0, "Adaptive Channel Scaling init std", min=0.0)
    use_pyramid: bool = _f(True, "NaturalInversion: use the Feature Transfer Pyramid (ablation switch)")
    use_scaling: bool = _f(True, "NaturalInversion: use Adaptive Channel Scaling (ablation switch)")
    pixel_clamp: bool = _f(False, "NaturalInversion: clamp images to the valid pixel range inside the loop (straight-through gradient) so the teacher judges exactly the stored images; default off = the paper's unclamped optimisation")
    lambda_ce: float = _f(1.0, "weight of the cross-entropy term", min=0.0)
    lambda_bn: float = _f(10.0, "weight of the feature-statistics term (BN or class-conditional)", min=0.0)
    first_bn_multiplier: float = _f(1.0, "extra weight on the first statistics layer (DeepInversion uses 10)", min=0.0)
    lambda_tv: float = _f(6e-3, "weight of total variation", min=0.0)
    lambda_l2: float = _f(1.5e-5, "weight of the l2 image prior", min=0.0)
    lambda_adi: float = _f(1.0, "weight of the ADI competition term (used when method=adi; 0 switches it off)", min=0.0)
    lambda_cmi: float = _f(0.8, "weight of the contrastive term (CMI)", min=0.0)
    cmi_temperature: float = _f(0.1, "temperature of the contrastive loss (CMI)", min=0.0, min_exclusive=True)
    cmi_bank_size: int = _f(4096, "memory bank size in embeddings (CMI)", min=0)
    cmi_head_dim: int = _f(128, "projection head output size (CMI)", min=1)
    adi_student: Optional[str] = _f(None, "student architecture that ADI competes against (default: resnet20 for inputs up to 64 px, resnet18 above)")
    jitter: int = _f(2, "random translation in pixels applied before each teacher pass", min=0)
    flip: bool = _f(True, "random horizontal flip before each teacher pass")
    stats: Optional[str] = _f(None, "class-conditional statistics file (from `dfcompress stats`); required for BN-free teachers")
    max_retries: int = _f(3, "re-tries of a batch whose loss becomes NaN/inf, each with a new seed", min=0)
    preview_per_class: int = _f(4, "images per class in preview.png", min=1)


@dataclass
class DistillSettings:
    student: str = _f("resnet18", "student architecture from the model zoo")
    epochs: int = _f(30, "passes over the synthetic set", min=1)
    batch_size: int = _f(128, "training batch size", min=1)
    optimizer: str = _f("sgd", "optimiser", choices=["sgd", "adam"])
    lr: float = _f(0.1, "peak learning rate", min=0.0, min_exclusive=True)
    momentum: float = _f(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = _f(5e-4, "weight decay", min=0.0)
    schedule: str = _f("cosine", "learning-rate schedule", choices=["cosine", "constant"])
    temperature: float = _f(4.0, "KD softmax temperature", min=0.0, min_exclusive=True)
    crop_padding: int = _f(4, "random-crop padding in pixels (0 disables)", min=0)
    flip: bool = _f(True, "random horizontal flip during training")
    export: bool = _f(True, "export the result to ONNX (checked with onnxruntime)")
    mix: str = _f("none", "KD augmentation: mix each batch with a shuffled copy of itself (the teacher labels the mix); under torchrun the pairs stay within each rank's share", choices=["none", "mixup", "cutmix"])
    holdout: float = _f(0.1, "fraction of the synthetic set kept out of training to measure agreement with the teacher (distill and prune)", min=0.0, max=0.5)


@dataclass
class PruneSettings:
    ratio: float = _f(0.5, "fraction removed: of channels per layer (target=channels) or of params/MACs", min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    target: str = _f("channels", "what --ratio measures", choices=["channels", "params", "macs"])
    global_pruning: bool = _f(False, "rank channels across layers instead of per layer")
    round_to: Optional[int] = _f(None, "keep channel counts a multiple of N (edge hardware)", min=1)
    importance: str = _f("l1", "channel ranking: weight magnitude (l1, l2) or gradients on the training set (taylor, hessian)", choices=["l1", "l2", "taylor", "hessian"])
    importance_images: int = _f(256, "training images whose gradients rank channels for taylor/hessian", min=1)
    recalibrate_bn: int = _f(256, "training images to re-estimate BatchNorm statistics on after pruning (0: keep the teacher's)", min=0)
    epochs: int = _f(10, "KD fine-tuning epochs on the synthetic set after pruning", min=0)
    batch_size: int = _f(128, "fine-tuning batch size", min=1)
    lr: float = _f(0.01, "fine-tuning learning rate", min=0.0, min_exclusive=True)
    temperature: float = _f(4.0, "KD temperature during fine-tuning", min=0.0, min_exclusive=True)
    export: bool = _f(True, "export the result to ONNX (checked with onnxruntime)")


@dataclass
class QuantizeSettings:
    calibration_images: int = _f(256, "synthetic images used to calibrate activation ranges", min=1)
    per_channel: bool = _f(True, "per-channel weight quantization")
    calibrate_method: str = _f("minmax", "activation range estimator", choices=["minmax", "entropy", "percentile"])
    symmetric_activations: bool = _f(False, "symmetric activation ranges (zero point 0) instead of asymmetric min/max")


@dataclass
class ExportSettings:
    format: str = _f("onnx", "export format", choices=["onnx", "torchscript", "pt2"])
    opset: int = _f(17, "ONNX opset", min=13, max=21)
    parity_images: int = _f(64, "synthetic or random images used for the parity check", min=1)
    parity_atol: float = _f(1e-3, "largest allowed |logit difference| in the parity check", min=0.0)


@dataclass
class EvalSettings:
    batch_size: int = _f(256, "evaluation batch size", min=1)
    latency_runs: int = _f(20, "timed onnxruntime runs per batch size", min=1)


SECTIONS = {
    "preprocess": PreprocessSettings,
    "synthesize": SynthesizeSettings,
    "distill": DistillSettings,
    "prune": PruneSettings,
    "quantize": QuantizeSettings,
    "export": ExportSettings,
    "eval": EvalSettings,
}


@dataclass
class Settings:
    description: str = _f("", "what this profile is for")
    seed: int = _f(0, "global seed: same seed + same command -> same result on CPU", min=0)
    device: str = _f("auto", "auto, cpu or cuda[:N]")
    amp: bool = _f(True, "mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)")
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    synthesize: SynthesizeSettings = field(default_factory=SynthesizeSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# validation


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(options))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(where: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(where, inner, value)
    bad = UserError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{where}[{i}]", typing.get_args(tp)[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # NaN slips through every min/max comparison; inf is never meant
            raise UserError(f"{where}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _check_rules(where: str, meta: dict, value: Any) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{where}: {value!r} is not allowed{_suggest(str(value), meta['choices'])}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        op = ">" if meta.get("min_exclusive") else ">="
        raise UserError(f"{where}: must be {op} {lo}, got {value}")
    if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
        op = "<" if meta.get("max_exclusive") else "<="
        raise UserError(f"{where}: must be {op} {hi}, got {value}")


def _apply(obj: Any, data: dict, origin: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{origin}: {prefix}{key}"
        if key not in fields:
            raise UserError(f"{origin}: unknown key '{prefix}{key}'{_suggest(str(key), list(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a mapping of {key} settings, got {type(value).__name__}")
            _apply(getattr(obj, key), value, origin, f"{prefix}{key}.")
            continue
        coerced = _coerce(where, tp, value)
        _check_rules(where, dict(fields[key].metadata), coerced)
        setattr(obj, key, coerced)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """A shipped profile name (``cifar10``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not candidate.is_file():
            raise UserError(f"profile file {candidate} not found")
        return candidate
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(f"unknown profile {name_or_path!r}{_suggest(name_or_path, list_profiles())}")
    return shipped


def read_profile(name_or_path: str) -> dict:
    path = profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"profile {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read profile {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"profile {path} must be a YAML mapping of settings, got {type(data).__name__}")
    return data


def resolve_settings(profile: str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """defaults < profile < overrides; ``overrides`` maps ``"section.key"`` (or ``"seed"``) to values.

    ``None`` values in overrides mean "flag not given" and are skipped.
    """
    settings = Settings()
    if profile:
        _apply(settings, read_profile(profile), f"profile {profile}")
    nested: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        parts = dotted.split(".")
        cursor = nested
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = value
    if nested:
        _apply(settings, nested, "option")
    return settings


def describe_profile(name: str) -> str:
    return resolve_settings(name).to_yaml()
