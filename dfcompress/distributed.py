"""torchrun integration: one process per rank, PyTorch's own process group, nothing home-made.

Under ``torchrun`` (WORLD_SIZE > 1 in the environment) commands join a process group — gloo on CPU,
NCCL on CUDA — and split work by rank; run plainly, the same code sees a world of one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .device import Runtime, resolve_runtime
from .errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def runtime(self, settings) -> Runtime:
        """Each rank drives its own GPU (cuda:LOCAL_RANK); CPU ranks share the host."""
        device = settings.device
        if self.world_size > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
            device = f"cuda:{self.local_rank}"
        return resolve_runtime(device, amp=settings.amp)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """Initialise the default process group when started by torchrun; tear it down afterwards."""
    if not launched_by_torchrun():
        yield DistContext()
        return
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60))
    try:
        yield DistContext(rank, world, local)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
