"""torchrun integration: one process per rank, PyTorch's own process group and DDP (plus the CPU SyncBatchNorm it lacks).

Under ``torchrun`` (WORLD_SIZE > 1 in the environment) commands join the default process group — gloo
on CPU, NCCL on CUDA — and split the work by rank; run plainly, the same code sees a world of one:

* synthesis: rank r makes shards k with ``k % world_size == r`` (``inversion/runner.py``); rank 0
  writes the manifest after a barrier once every shard exists;
* KD training (distill, prune fine-tuning): one permutation per epoch split across ranks
  (``compress/loader.py``: ``KDLoader``, ``rank_positions``) + ``DistributedDataParallel`` with
  synchronised BatchNorm (``ddp_model``) and per-rank batch ``batch_size // world_size``
  (``compress/kd.py``: ``per_rank_batch``, ``wrap_model``), so a step sees the same
  global batch as one process would;
* every file outside the shards is written by rank 0 only; ``distributed_context`` ends with a
  barrier so no rank tears the group down while rank 0 is still writing.

See docs/scaling.md for the exact guarantees.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .device import Runtime, resolve_runtime
from .errors import GateFailed, UserError, first_line
from .progress import log

STORE_OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
STORE_BUG = "pytorch/pytorch#135712"
TIMEOUT_ENV = "DFCOMPRESS_DIST_TIMEOUT_MIN"  # collective timeout (minutes); ranks wait at barriers for slower ones
DEFAULT_TIMEOUT_MIN = 60


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: > 0 when torchrun restarted the worker group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def restarted(self) -> bool:
        return self.restart_count > 0

    def barrier(self) -> None:
        if self.active:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a default output path that contains the time)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def runtime(self, settings) -> Runtime:
        """Each rank drives its own GPU (cuda:LOCAL_RANK, whatever cuda:N was asked); CPU ranks share the host."""
        device = settings.device
        if self.world_size > 1 and torch.cuda.is_available() and (device or "auto").startswith(("auto", "cuda")):
            device = f"cuda:{self.local_rank}"
        return resolve_runtime(device, amp=settings.amp)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    return _dt.timedelta(minutes=minutes)


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """Initialise the default process group when started by torchrun; tear it down afterwards.

    On normal exit (and after a failed ``--max-drop`` gate, which only rank 0 raises) every rank meets
    at a final barrier first, so rank 0 finishes its reports while the others wait. On any other error
    the group is destroyed at once: torchrun notices the failed worker, stops the others and, with
    ``--max-restarts``, starts the group again (which resumes).
    """
    if not launched_by_torchrun():
        yield DistContext()
        return
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    env = os.environ
    rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                            "use --nproc-per-node <= the number of GPUs per node")
        torch.cuda.set_device(local)
    shared_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if rank == 0 and restarts == 0 and shared_store and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        log(f"note: with --max-restarts and torchrun's shared rendezvous store a restarted group may fail to reconnect "
            f"({STORE_BUG}); launch with {STORE_OPT_OUT}=1 (or the default static rendezvous, --master-addr/--master-port)")
    owns_group = not dist.is_initialized()
    if owns_group:
        try:
            dist.init_process_group(backend=backend, timeout=_timeout())
        except RuntimeError as exc:
            if restarts > 0 and shared_store:
                raise UserError(f"the restarted workers could not reconnect ({first_line(exc, 120)}): torchrun's "
                                f"shared rendezvous store kept the previous attempt's addresses ({STORE_BUG}); re-run the same "
                                f"command with {STORE_OPT_OUT}=1 set for torchrun: finished work is kept") from None
            raise
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, restarts)
    try:
        yield ctx
    except GateFailed:
        ctx.barrier()
        raise
    else:
        ctx.barrier()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# DDP with synchronised BatchNorm


def _tree_view(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (same tensors) with ``module``.

    Only the containers are new (own ``_modules`` dicts, own ``training`` flags), so swapping layers
    in the view leaves ``module`` untouched while optimiser steps and running-statistics updates made
    through the view land in ``module``'s tensors.
    """
    # object.__new__, not copy.copy / cls.__new__: GraphModule makes a new class (without forward) in both
    view = object.__new__(module.__class__)
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = {name: (None if child is None else _tree_view(child))
                                 for name, child in module._modules.items()}
    return view


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm for CPU ranks (gloo): ``nn.SyncBatchNorm`` refuses CPU tensors and DDP
    refuses ``nn.SyncBatchNorm`` layers in CPU modules.

    Global mean and (biased) variance over all ranks' batches via the functional collective
    ``all_reduce`` (differentiable: its backward all-reduces the gradients), so forward, backward and
    running statistics are those of one BatchNorm over the concatenated global batch. Eval mode and a
    world of one use the ordinary BatchNorm forward.
    """

    process_group: Optional[Any] = None

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - nn.Module signature
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Module signature
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        from torch.distributed._functional_collectives import all_reduce  # differentiable (backward: all_reduce)

        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_full((1,), input.numel() // max(1, input.size(1)))])
        total = all_reduce(local, "sum", group)
        count = total[-1].detach()
        mean = total[:-1] / count
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), "sum", group) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(1.0, n - 1)), alpha=m)
        return out


def sync_batchnorm_view(module: nn.Module, cuda: bool = False) -> nn.Module:
    """``module`` with every BatchNorm synchronised across ranks, sharing all tensors with ``module``.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does the conversion (sharing weights and running
    statistics) on a tree view, so the caller's model keeps its plain BatchNorm layers and exports
    exactly as before. On CPU the converted layers become ``CpuSyncBatchNorm``.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    view = nn.SyncBatchNorm.convert_sync_batchnorm(_tree_view(module))
    if not cuda:
        for m in view.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = CpuSyncBatchNorm
    return view


def ddp_model(module: nn.Module, runtime: Any, sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel`` over ``module`` (BatchNorm synchronised across ranks by default).

    Parameters and buffers stay ``module``'s own tensors: train through the returned wrapper, then use,
    checkpoint and export ``module`` itself.
    """
    ids = [runtime.device.index] if runtime.device.type == "cuda" and runtime.device.index is not None else None
    net = sync_batchnorm_view(module, cuda=runtime.device.type == "cuda") if sync_bn else module
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)
