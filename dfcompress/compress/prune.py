"""Structured L1-norm channel pruning with torch-pruning, then KD fine-tuning on the synthetic set.

Channels are ranked by the L1 norm of their weights (``MagnitudeImportance(p=1)``) over each
dependency group, so coupled layers (residual streams, depthwise convs, BN) shrink together and the
result is a genuinely smaller dense model, not a masked one. The classifier keeps its classes. The
pruned widths no longer match the zoo definition, so the model folder holds ``.pt2`` (and ONNX).
See prune_ops.py for option-A shortcuts and the round_to guard.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UserError
from ..progress import log
from .prune_ops import CUSTOM_PRUNERS, SkipGuard, apply_guard, make_prunable

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
                 round_to: Optional[int] = None, ignored_layers: Optional[list[nn.Module]] = None,
                 verbose: bool = True) -> dict[str, Any]:
    """Prune ``model`` in place removing ``ratio`` of the channels (per layer, or globally ranked).

    Option-A shortcuts are made prunable first; groups that torch-pruning would silently skip are
    pruned to the smallest legal width by the guard. Returns {guard: [records], unchanged: [layers that
    kept every channel although local pruning should have shrunk them]}.
    """
    if not 0.0 < ratio < 1.0:
        raise UserError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    model.eval()
    make_prunable(model)
    ignored = [classifier_layer(model)] + list(ignored_layers or [])
    before = layer_widths(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tp warns about unwrapped parameters it does not need here
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            global_pruning=global_pruning, round_to=round_to, ignored_layers=ignored,
            customized_pruners=dict(CUSTOM_PRUNERS),
        )
        guard = SkipGuard(pruner).install()
        pruner.step()
        names = {m: n for n, m in model.named_modules()}
        records = apply_guard(guard, names, round_to)
    for r in records if verbose else []:
        log(f"prune: {r['layer']} ({r['channels']} channels): {r['reason']}; {r['action']}")
    after = layer_widths(model)
    unchanged = []
    if not global_pruning:
        ignored_names = {names[m] for m in ignored if m in names}
        step = round_to or 1
        for name, c in before.items():
            keep = int(c * (1 - ratio))
            keep -= keep % step
            guarded = any(r["layer"] == name for r in records)
            if name not in ignored_names and c > step and keep < c and after.get(name) == c and not guarded:
                unchanged.append(name)
        if unchanged and verbose:
            log(f"prune: warning: {len(unchanged)} layer(s) kept all channels: {', '.join(unchanged[:5])}")
    _check_forward(model, example)
    return {"guard": records, "unchanged": unchanged, "widths_before": before, "widths_after": after}


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"the pruned model no longer runs ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "this architecture has a layer torch-pruning cannot follow, prune with --ratio smaller or another model") from None
    if not torch.isfinite(out).all():
        raise UserError("the pruned model produces NaN/inf; try a smaller --ratio")


def search_ratio(model: nn.Module, example: torch.Tensor, measure: Callable[[nn.Module], float], target: float, *,
                 global_pruning: bool = False, round_to: Optional[int] = None,
                 tol: float = SEARCH_TOLERANCE) -> tuple[float, float]:
    """Bisection on the channel ratio (on deep copies) until ``1 - measure(pruned)/measure(model)`` is within ``tol`` of ``target``.

    Returns (channel ratio, fraction achieved). UserError when ``target`` is out of reach.
    """
    base = measure(model)

    def removed(r: float) -> float:
        m = copy.deepcopy(model)
        prune_module(m, example, r, global_pruning=global_pruning, round_to=round_to, verbose=False)
        return 1.0 - measure(m) / base

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


def prune(teacher: Any, synth_dir: str | Path, settings: Any, out_dir: str | Path, runtime: Any,
          eval_data: Any = None, *, progress: Any = None) -> dict[str, Any]:
    """Prune ``teacher``, fine-tune it by KD on ``synth_dir``, write the model folder; returns metrics."""
    from ..data.synthetic import SyntheticSet
    from ..evaluate import agreement, module_logits, to_input, top1
    from ..export import cpu_copy
    from ..models.introspect import count_macs, count_params
    from ..models.model_dir import save_model_dir
    from .distill import check_synthetic_set
    from .kd import KDConfig, split_holdout, stack_images, train_kd

    ps = settings.prune
    out = Path(out_dir)
    shape = tuple(teacher.input_shape)
    dataset = SyntheticSet(synth_dir)
    check_synthetic_set(dataset, teacher)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))

    model = cpu_copy(teacher.module)
    measures = {"params": lambda m: float(count_params(m)), "macs": lambda m: float(count_macs(m, shape))}
    ratio, searched = ps.ratio, None
    if ps.target != "channels":
        ratio, achieved = search_ratio(model, example, measures[ps.target], ps.ratio,
                                       global_pruning=ps.global_pruning, round_to=ps.round_to)
        searched = {"target": ps.target, "asked": ps.ratio, "achieved": achieved, "channel_ratio": ratio}
        log(f"prune: channel ratio {ratio:.3f} removes {achieved:.1%} of {ps.target} (asked {ps.ratio:.0%})")
    info = prune_module(model, example, ratio, global_pruning=ps.global_pruning, round_to=ps.round_to)
    pruned = model

    teacher_module = cpu_copy(teacher.module)
    metrics: dict[str, Any] = {
        "channel_ratio": ratio, "target": ps.target, "global_pruning": ps.global_pruning, "round_to": ps.round_to,
        "search": searched, "guard": info["guard"], "unchanged_layers": info["unchanged"],
        "params_before": int(count_params(teacher_module)), "params_after": int(count_params(pruned)),
        "macs_before": int(count_macs(teacher_module, shape)), "macs_after": int(count_macs(pruned, shape)),
    }
    metrics["params_removed"] = 1.0 - metrics["params_after"] / metrics["params_before"]
    metrics["macs_removed"] = 1.0 - metrics["macs_after"] / metrics["macs_before"]

    train_set, holdout = split_holdout(dataset, settings.distill.holdout, settings.seed)
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
    metrics["model_dir"] = save_model_dir(
        out, pruned, teacher, "prune", None, files, check, opset=settings.export.opset, atol=settings.export.parity_atol,
        extra={"base_arch": teacher.arch, "pruning": {k: metrics[k] for k in ("channel_ratio", "target", "global_pruning", "round_to")}},
    )
    return metrics
