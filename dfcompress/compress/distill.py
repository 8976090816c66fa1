"""Distil the teacher into a smaller zoo student on the synthetic set (no real images involved).

The student inherits the teacher's classes, channels, input size and preprocessing, so the model
folder it lands in is a drop-in replacement that the next command (quantize, eval) can take as MODEL.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..data.real import LabelledImages
from ..data.synthetic import SyntheticSet
from ..device import Runtime
from ..errors import UserError
from ..models.teacher import Teacher
from ..progress import log
from ..seeds import STUDENT_INIT, seeded_build, stream_seed
from ..settings import Settings
from .kd import dist_info, split_holdout, stack_images, train_kd


def check_synthetic_set(dataset: SyntheticSet, teacher: Teacher) -> None:
    """The set must have been made for this teacher's input and classes (UserError otherwise)."""
    if tuple(dataset.input_shape) != tuple(teacher.input_shape):
        raise UserError(f"the synthetic set holds {tuple(dataset.input_shape)} images but the teacher takes {tuple(teacher.input_shape)}; synthesize a set from this teacher")
    if dataset.num_classes != teacher.num_classes:
        raise UserError(f"the synthetic set has {dataset.num_classes} classes but the teacher {teacher.num_classes}; synthesize a set from this teacher")
    made_by = (dataset.manifest.get("teacher") or {}).get("sha256")
    if made_by and teacher.sha256 and made_by != teacher.sha256:
        log(f"warning: the synthetic set was made by another teacher (sha256 {made_by[:12]}…, this one {teacher.sha256[:12]}…)")


def build_student(name: str, teacher: Teacher, seed: int) -> tuple[str, nn.Module]:
    """(canonical name, freshly initialised zoo model) shaped for the teacher; init depends only on ``seed``."""
    from ..models.zoo import create_model, resolve_model_name

    canonical = resolve_model_name(name)
    c, h, w = (int(v) for v in teacher.input_shape)
    student = seeded_build(stream_seed(seed, STUDENT_INIT),
                           lambda: create_model(canonical, num_classes=int(teacher.num_classes), in_channels=c, input_size=h))
    return canonical, student


def distill(teacher: Teacher, student_name: Optional[str], synth_dir: str | Path, settings: Settings, out_dir: str | Path,
            runtime: Runtime, eval_data: Optional[LabelledImages] = None, *, progress: Any = None) -> dict[str, Any]:
    """Train ``student_name`` (default ``settings.distill.student``) by KD and write the model folder.

    Returns metrics: student/teacher params and MACs, agreement with the teacher on the held-out part
    of the synthetic set, top-1 and agreement on ``eval_data`` (LabelledImages) when given, history.
    """
    from ..data.synthetic import SyntheticSet
    from ..data.training_set import describe_sources
    from ..evaluate import agreement, module_logits, to_input, top1
    from ..models.introspect import count_macs, count_params
    from ..export import save_model_dir

    ds_settings = settings.distill
    shape = tuple(teacher.input_shape)
    out = Path(out_dir)
    dataset = SyntheticSet(synth_dir)
    check_synthetic_set(dataset, teacher)
    name, student = build_student(student_name or ds_settings.student, teacher, settings.seed)
    train_set, holdout = split_holdout(dataset, ds_settings.holdout, settings.seed)
    hold_images = stack_images(holdout) if holdout is not None else None
    teacher_hold = module_logits(teacher.module, hold_images, teacher, runtime) if hold_images is not None else None

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"holdout_agreement": agreement(module_logits(m, hold_images, teacher, runtime), teacher_hold)}

    train = train_kd(student, teacher, train_set, ds_settings, runtime, out / "checkpoint", ds_settings.epochs,
                     eval_fn=eval_fn if hold_images is not None else None, seed=settings.seed, progress=progress,
                     desc=f"distill {name}")
    metrics: dict[str, Any] = {
        "student": name,
        "student_params": int(count_params(student)), "student_macs": int(count_macs(student, shape)),
        "teacher_params": int(count_params(teacher.module)), "teacher_macs": int(count_macs(teacher.module, shape)),
        "train_images": len(train_set), "holdout_images": 0 if hold_images is None else int(len(hold_images)),
        "holdout_agreement": eval_fn(student)["holdout_agreement"] if hold_images is not None else None,
        "top1": None, "teacher_top1": None, "agreement": None,
    }
    metrics["data_sources"] = describe_sources(dataset.manifest, synth_dir)
    metrics["compression"] = metrics["teacher_params"] / max(1, metrics["student_params"])
    if eval_data is not None and len(eval_data):
        s_logits = module_logits(student, eval_data.x, teacher, runtime)
        t_logits = module_logits(teacher.module, eval_data.x, teacher, runtime)
        metrics["agreement"] = agreement(s_logits, t_logits)
        metrics["eval_images"] = int(len(eval_data))
        if eval_data.y is not None:
            metrics["top1"], metrics["teacher_top1"] = top1(s_logits, eval_data.y), top1(t_logits, eval_data.y)
    metrics["history"] = train["history"]
    metrics["train"] = {k: v for k, v in train.items() if k != "history"}

    n_check = settings.export.parity_images
    check_src = hold_images if hold_images is not None else stack_images(train_set, limit=n_check)
    files = ("state_dict", "onnx") if ds_settings.export else ("state_dict",)
    if dist_info()[0] == 0:  # under torchrun only rank 0 writes the model folder
        metrics["model_dir"] = save_model_dir(
            out, student, teacher, "distill", name, files, to_input(check_src[:n_check], teacher),
            opset=settings.export.opset, atol=settings.export.parity_atol, extra={"student": name},
        )
    return metrics
