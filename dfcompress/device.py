"""Device selection and mixed precision policy.

One place decides CPU vs CUDA, the autocast dtype (bf16 where the GPU supports it, fp16 + loss scaling
otherwise, fp32 on CPU) and memory format, so every stage behaves the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_grad_scaler)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` (in place, as ``nn.Module.to`` does) to this device, channels_last on CUDA:
        the one way a module is placed, so weights and the inputs ``tensor`` makes always meet."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on this device (non-blocking from pinned memory), channels_last on CUDA."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s tensors live (its first parameter, else buffer; CPU for a module with neither)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def place(module: torch.nn.Module, runtime: Optional[Runtime]) -> torch.device:
    """The device ``module`` will run on: ``runtime``'s (the module is moved there with ``prepare``), or,
    without a runtime, wherever the module already is. Every stage that feeds a module data asks this."""
    if runtime is None:
        return module_device(module)
    runtime.prepare(module)
    return runtime.device


@torch.no_grad()
def run_batched(module: torch.nn.Module, images: torch.Tensor, to_input: Callable[[torch.Tensor, torch.device], torch.Tensor],
                runtime: Optional[Runtime] = None, batch_size: int = 256, autocast: bool = False) -> list[torch.Tensor]:
    """float32 CPU outputs of ``module`` in eval mode on ``images``, batch by batch, module and inputs on one device.

    ``to_input(batch, device)`` turns stored images into the module's input on ``device`` (normalising);
    ``autocast`` runs under the runtime's mixed precision (evaluation), off for logits that are stored.
    The caller's train/eval mode is restored afterwards.
    """
    was_training = module.training
    module.eval()
    device = place(module, runtime)
    outs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = to_input(images[start:start + batch_size], device)
            if runtime is not None:
                x = runtime.tensor(x)
            with (runtime.autocast() if runtime is not None and autocast else contextlib.nullcontext()):
                outs.append(module(x).float().cpu())
    finally:
        module.train(was_training)
    return outs


def resolve_runtime(device: str = "auto", amp: bool = True) -> Runtime:
    """Turn ``--device auto|cpu|cuda[:N]`` into a Runtime, failing with a clear message."""
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu or --device auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        dtype = None
        if amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, dtype, channels_last=True)
    if name != "cpu":
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return Runtime(torch.device("cpu"), None, channels_last=False)
