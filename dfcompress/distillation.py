"""The knowledge-distillation objective, one definition for every student dfcompress trains.

Used by the KD loop of ``distill``/``prune`` (compress/kd.py) and by the student ADI trains while it
synthesizes (inversion/synthesizers/deepinversion.py); it sits at the bottom layer so both can use it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015: KL(p_T || q_T) × T² (batch mean), computed in fp32 (log-space targets: no log 0)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)
