"""Structured L1-norm channel pruning with torch-pruning, then KD fine-tuning on the synthetic set.

Channels are ranked by the L1 norm of their weights (``MagnitudeImportance(p=1)``) over each
dependency group, so coupled layers (residual streams, depthwise convs, BN) shrink together and the
result is a genuinely smaller dense model, not a masked one. The classifier keeps its classes. The
pruned widths no longer match the zoo definition, so the model folder holds ``.pt2`` (and ONNX).
See prune_ops.py for option-A shortcuts and the round_to guard.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch_pruning as tp
from torch import nn

from ..data.real import LabelledImages
from ..device import Runtime
from ..errors import UserError, describe_exception
from ..models.teacher import Teacher
from ..settings import Settings
from ..progress import log
from ..models.zoo import customized_pruners
from .bn_recalibration import recalibrate_batchnorm
from .importance import DATA_DRIVEN, Batches, importance_batches, make_importance
from .prune_ops import SkipGuard, apply_guard

SEARCH_TOLERANCE = 0.01  # the params/MACs target is met within 1 percentage point
SEARCH_MAX_ITER = 16
MAX_CHANNEL_RATIO = 0.99


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last nn.Linear in module order: its outputs are the classes, never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("pruning needs a classifier ending in nn.Linear (a Gemm/MatMul head for ONNX models)")
    return linears[-1]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv / features of every linear layer, by module name."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_module(model: nn.Module, example: torch.Tensor, ratio: float, *, global_pruning: bool = False,
                 round_to: Optional[int] = None, ignored_layers: Optional[list[str]] = None,
                 verbose: bool = True, importance: str = "l1",
                 batches: Optional[Batches] = None) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` with ``ratio`` of the channels removed (per layer, or globally ranked).

    Option-A shortcuts get their own pruner; groups that torch-pruning would silently skip are pruned
    to the smallest legal width by the guard. When the pruned copy does not run (an imported graph with
    a channel-changing functional op torch-pruning cannot follow), the groups that break it are found
    one by one and left unpruned. ``importance`` ranks channels (importance.py; taylor/hessian take
    gradients on ``batches``). Returns (pruned, {guard, unchanged, skipped_groups, widths_*}).
    """
    if not 0.0 < ratio < 1.0:
        raise UserError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    model = model.eval()
    skipped: list[str] = list(ignored_layers or [])
    try:
        pruned, info = _prune_once(copy.deepcopy(model), example, ratio, global_pruning, round_to, skipped, importance, batches)
    except _Broken as first:
        unsafe = find_unsafe_groups(model, example)
        if not unsafe:
            raise UserError(f"the pruned model no longer runs ({first}); prune another model or a smaller --ratio") from None
        if verbose:
            log(f"prune: torch-pruning cannot follow {len(unsafe)} channel group(s) of this graph; leaving them unpruned: {', '.join(unsafe[:5])}")
        skipped += unsafe
        try:
            pruned, info = _prune_once(copy.deepcopy(model), example, ratio, global_pruning, round_to, skipped, importance, batches)
        except _Broken as again:
            raise UserError(f"the pruned model no longer runs ({again}); prune another model or a smaller --ratio") from None
    info["skipped_groups"] = skipped
    if verbose:
        for r in info["guard"]:
            log(f"prune: {r['layer']} ({r['channels']} channels): {r['reason']}; {r['action']}")
        if info["unchanged"]:
            log(f"prune: warning: {len(info['unchanged'])} layer(s) kept all channels: {', '.join(info['unchanged'][:5])}")
    return pruned, info


class _Broken(Exception):
    """A pruning attempt produced a model that does not run (internal: triggers the fallback)."""

    @classmethod
    def of(cls, exc: BaseException) -> "_Broken":
        """The failure in one short line: exception type and the first line of its message."""
        return cls(describe_exception(exc))


def _make_pruner(model: nn.Module, example: torch.Tensor, ratio: float, global_pruning: bool,
                 round_to: Optional[int], ignored: list[nn.Module], importance: str = "l1",
                 batches: Optional[Batches] = None) -> Any:
    return tp.pruner.MetaPruner(
        model, example, importance=make_importance(importance, model, batches), pruning_ratio=ratio,
        global_pruning=global_pruning, round_to=round_to, ignored_layers=ignored, customized_pruners=customized_pruners(),
    )


def _prune_once(model: nn.Module, example: torch.Tensor, ratio: float, global_pruning: bool,
                round_to: Optional[int], skipped: list[str], importance: str = "l1",
                batches: Optional[Batches] = None) -> tuple[nn.Module, dict[str, Any]]:
    ignored = [classifier_layer(model)] + [model.get_submodule(n) for n in skipped]
    names = {m: n for n, m in model.named_modules()}
    before = layer_widths(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tp's notes on unwrapped parameters it does not need here
            pruner = _make_pruner(model, example, ratio, global_pruning, round_to, ignored, importance, batches)
            guard = SkipGuard(pruner).install()
            pruner.step()
            records = apply_guard(guard, names, round_to)
    except (IndexError, RuntimeError, ValueError, AssertionError) as exc:
        raise _Broken.of(exc) from None
    _check_forward(model, example)
    after = layer_widths(model)
    unchanged = []
    if not global_pruning:  # every layer outside the ignored groups must have shrunk as local pruning promises
        skip = _group_members(pruner.DG, ignored, names)
        step = round_to or 1
        guarded = {r["layer"] for r in records}
        for name, c in before.items():
            keep = int(c * (1 - ratio))
            keep -= keep % step
            if name not in skip and name not in guarded and c > step and keep < c and after.get(name) == c:
                unchanged.append(name)
    return model, {"guard": records, "unchanged": unchanged, "widths_before": before, "widths_after": after}


def _group_members(dg: Any, roots: list[nn.Module], names: dict[nn.Module, str]) -> set[str]:
    """Names of every layer whose output channels are coupled with one of ``roots``."""
    members = set()
    for root in roots:
        pruner = dg.get_pruner_of_module(root)
        if pruner is None or root not in dg.module2node:
            continue
        for dep, _ in dg.get_pruning_group(root, pruner.prune_out_channels, [0]):
            if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                members.add(names[dep.target.module])
    return members


def find_unsafe_groups(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Root layers of the dependency groups whose pruning breaks the forward pass, found by pruning one
    channel of each group on a copy (a fresh copy after every failure)."""
    bad: list[str] = []
    with torch.no_grad():
        expected = model(example).shape
    while True:
        trial = copy.deepcopy(model)
        names = {m: n for n, m in trial.named_modules()}
        ignored = [classifier_layer(trial)] + [trial.get_submodule(n) for n in bad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(trial, example_inputs=example, customized_pruners=customized_pruners())
            culprit = None
            for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
                dep = group[0][0]
                channels = dg.get_out_channels(dep.target.module)
                if not channels or channels < 2:
                    continue
                one = dg.get_pruning_group(dep.target.module, dep.handler, [channels - 1])
                try:
                    if dg.check_pruning_group(one):
                        one.prune()
                        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints failing code
                            ok = trial(example).shape == expected
                    else:
                        ok = True
                except (IndexError, RuntimeError, ValueError, AssertionError):
                    ok = False
                if not ok:
                    culprit = names[dep.target.module]
                    break
        if culprit is None or culprit in bad:
            return bad
        bad.append(culprit)


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx GraphModules print failing code
            out = model(example)
    except Exception as exc:  # noqa: BLE001 - any failure means the graph was cut wrongly
        raise _Broken.of(exc) from None
    if not torch.isfinite(out).all():
        raise UserError("the pruned model produces NaN/inf; try a smaller --ratio")


def search_ratio(model: nn.Module, example: torch.Tensor, measure: Callable[[nn.Module], float], target: float, *,
                 global_pruning: bool = False, round_to: Optional[int] = None,
                 tol: float = SEARCH_TOLERANCE, importance: str = "l1",
                 batches: Optional[Batches] = None) -> tuple[float, float]:
    """Bisection on the channel ratio (on deep copies) until ``1 - measure(pruned)/measure(model)`` is within ``tol`` of ``target``.

    Returns (channel ratio, fraction achieved). UserError when ``target`` is out of reach.
    """
    base = measure(model)

    def removed(r: float) -> float:
        pruned, _ = prune_module(model, example, r, global_pruning=global_pruning, round_to=round_to, verbose=False,
                                 importance=importance, batches=batches)
        return 1.0 - measure(pruned) / base

    top = removed(MAX_CHANNEL_RATIO)
    if target > top + tol:
        raise UserError(f"cannot remove {target:.0%} of this model: at most {top:.1%} is reachable with the classifier kept; lower --ratio")
    lo, hi = 0.0, MAX_CHANNEL_RATIO
    best = (MAX_CHANNEL_RATIO, top)
    for _ in range(SEARCH_MAX_ITER):
        mid = (lo + hi) / 2
        got = removed(mid)
        if abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        if abs(got - target) <= tol:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    if abs(best[1] - target) > tol:
        log(f"prune: closest reachable is {best[1]:.1%} removed (asked {target:.0%}); channel granularity limits the search")
    return best


# ----------------------------------------------------------------------------------------------
# the stage


def prune(teacher: Teacher, synth_dir: str | Path, settings: Settings, out_dir: str | Path, runtime: Runtime,
          eval_data: Optional[LabelledImages] = None, *, progress: Any = None) -> dict[str, Any]:
    """Prune ``teacher``, fine-tune it by KD on ``synth_dir``, write the model folder; returns metrics."""
    from ..data.synthetic import SyntheticSet
    from ..data.training_set import describe_sources
    from ..evaluate import agreement, module_logits, to_input, top1
    from ..export import cpu_copy
    from ..models.introspect import count_macs, count_params
    from ..export import save_model_dir
    from .distill import check_synthetic_set
    from .kd import KDConfig, dist_info, split_holdout, stack_images, train_kd

    ps = settings.prune
    out = Path(out_dir)
    shape = tuple(teacher.input_shape)
    dataset = SyntheticSet(synth_dir)
    check_synthetic_set(dataset, teacher)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))

    model = cpu_copy(teacher.module)
    measures = {"params": lambda m: float(count_params(m)), "macs": lambda m: float(count_macs(m, shape))}
    batches = None
    if ps.importance in DATA_DRIVEN:
        n = min(len(dataset), ps.importance_images)
        batches = importance_batches(stack_images(dataset, limit=n), dataset.labels[:n], teacher)
        log(f"prune: {ps.importance} importance from gradients on {n} training images")
    ratio, searched = ps.ratio, None
    if ps.target != "channels":
        ratio, achieved = search_ratio(model, example, measures[ps.target], ps.ratio,
                                       global_pruning=ps.global_pruning, round_to=ps.round_to,
                                       importance=ps.importance, batches=batches)
        searched = {"target": ps.target, "asked": ps.ratio, "achieved": achieved, "channel_ratio": ratio}
        log(f"prune: channel ratio {ratio:.3f} removes {achieved:.1%} of {ps.target} (asked {ps.ratio:.0%})")
    pruned, info = prune_module(model, example, ratio, global_pruning=ps.global_pruning, round_to=ps.round_to,
                                importance=ps.importance, batches=batches)

    metrics: dict[str, Any] = {
        "channel_ratio": ratio, "importance": ps.importance, "target": ps.target, "global_pruning": ps.global_pruning, "round_to": ps.round_to,
        "search": searched, "guard": info["guard"], "unchanged_layers": info["unchanged"],
        "skipped_groups": info["skipped_groups"],
        "params_before": int(count_params(model)), "params_after": int(count_params(pruned)),
        "macs_before": int(count_macs(model, shape)), "macs_after": int(count_macs(pruned, shape)),
    }
    metrics["data_sources"] = describe_sources(dataset.manifest, synth_dir)
    metrics["params_removed"] = 1.0 - metrics["params_after"] / metrics["params_before"]
    metrics["macs_removed"] = 1.0 - metrics["macs_after"] / metrics["macs_before"]

    train_set, holdout = split_holdout(dataset, settings.distill.holdout, settings.seed)
    bn_images = min(len(train_set), ps.recalibrate_bn)  # never the held-out images the agreement is judged on
    if bn_images:
        layers = recalibrate_batchnorm(pruned, stack_images(train_set, limit=bn_images), teacher, runtime)
        log(f"prune: BatchNorm statistics of {layers} layers re-estimated on {bn_images} training images")
    metrics["bn_recalibration_images"] = bn_images
    hold_images = stack_images(holdout) if holdout is not None else None
    teacher_hold = module_logits(teacher.module, hold_images, teacher, runtime) if hold_images is not None else None

    def hold_agreement(m: nn.Module) -> Optional[float]:
        return agreement(module_logits(m, hold_images, teacher, runtime), teacher_hold) if hold_images is not None else None

    def eval_scores(m: nn.Module) -> dict[str, Optional[float]]:
        if eval_data is None:
            return {"top1": None, "agreement": None}
        logits = module_logits(m, eval_data.x, teacher, runtime)
        return {"top1": top1(logits, eval_data.y) if eval_data.y is not None else None,
                "agreement": agreement(logits, teacher_eval)}

    teacher_eval = module_logits(teacher.module, eval_data.x, teacher, runtime) if eval_data is not None else None
    if eval_data is not None and eval_data.y is not None:
        metrics["teacher_top1"] = top1(teacher_eval, eval_data.y)
    metrics["before_finetune"] = {"holdout_agreement": hold_agreement(pruned), **eval_scores(pruned)}

    train = None
    if ps.epochs > 0:
        cfg = KDConfig.from_section(ps, settings.distill)
        eval_fn = (lambda m: {"holdout_agreement": hold_agreement(m)}) if hold_images is not None else None
        train = train_kd(pruned, teacher, train_set, cfg, runtime, out / "checkpoint", ps.epochs, eval_fn=eval_fn,
                         seed=settings.seed, progress=progress, desc="prune fine-tune")
    metrics["history"] = train["history"] if train else []
    metrics["train"] = {k: v for k, v in (train or {}).items() if k != "history"}
    final = {"holdout_agreement": hold_agreement(pruned), **eval_scores(pruned)}
    metrics.update(final)
    metrics["holdout_images"] = 0 if hold_images is None else int(len(hold_images))

    check_src = hold_images if hold_images is not None else stack_images(train_set, limit=settings.export.parity_images)
    check = to_input(check_src[: settings.export.parity_images], teacher)
    files = ("pt2", "onnx") if ps.export else ("pt2",)
    if dist_info()[0] == 0:  # under torchrun only rank 0 writes the model folder
        metrics["model_dir"] = save_model_dir(
            out, pruned, teacher, "prune", None, files, check, opset=settings.export.opset, atol=settings.export.parity_atol,
            extra={"base_arch": teacher.arch, "pruning": {k: metrics[k] for k in ("channel_ratio", "target", "global_pruning", "round_to")}},
        )
    return metrics
