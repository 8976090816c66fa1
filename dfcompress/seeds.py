"""Every random stream in dfcompress is a pure function of the user's ``--seed`` and a named purpose.

Results are reproducible bit for bit on CPU (resumed runs included) because no stream depends on
global RNG state or on what ran before: each is seeded from a stable hash of (seed, purpose, index…).
The purpose numbers below are part of the output: changing one changes every result that uses it,
so they are fixed forever (add new ones, never renumber).

Two hash spellings exist for history (both sha256, both kept so results stay identical):
``synthesis_seed`` (the synthesis runner: any parts, text-joined) and ``stream_seed`` (everything
else: integers only).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

# -- purposes of stream_seed(seed, ..., PURPOSE, ...) -------------------------------------------
KD_AUGMENT = 0  # stream_seed(seed, epoch, 0, KD_AUGMENT): crop/flip picks of one KD epoch (one stream for all ranks)
KD_GLOBAL_RNG = 1  # stream_seed(seed, epoch, rank, KD_GLOBAL_RNG): global RNG (dropout…) of one KD epoch on one rank
EPOCH_ORDER = 3  # stream_seed(seed, epoch, EPOCH_ORDER): the KD loader's permutation of one epoch
HOLDOUT = 7  # stream_seed(seed, HOLDOUT): which synthetic images are held out of KD training
STUDENT_INIT = 11  # stream_seed(seed, STUDENT_INIT): the distilled student's initial weights
CALIBRATION_SPLIT = 13  # stream_seed(seed, CALIBRATION_SPLIT): INT8 calibration vs check images
MIX_DRAW = 17  # stream_seed(seed, MIX_DRAW, source): which images a mixed --data source contributes
MIX_SHUFFLE = 18  # stream_seed(seed, MIX_SHUFFLE): the order of a mixed training set

# -- purposes of synthesis_seed(seed, ...) ------------------------------------------------------
SHARD_LABELS = "labels"  # synthesis_seed(seed, SHARD_LABELS, shard): the label shuffle of one shard
# a batch's seed is synthesis_seed(seed, shard, batch, attempt): no purpose word (it predates them)

# -- fixed seeds (not derived from --seed) ------------------------------------------------------
ADI_STUDENT_SEED = 0  # the student ADI trains while synthesizing starts from the same weights for every --seed


def _sha63(text: str, byteorder: str) -> int:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], byteorder) & ((1 << 63) - 1)  # type: ignore[arg-type]


def synthesis_seed(*parts: Any) -> int:
    """A 63-bit seed from a stable hash of ``parts`` (Python's ``hash()`` is salted per process)."""
    return _sha63("/".join(str(p) for p in ("dfcompress",) + parts), "big")


def stream_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, e.g. (seed, epoch, rank, purpose)."""
    return _sha63(",".join(str(int(p)) for p in parts), "little")


def seeded_generator(seed: int) -> torch.Generator:
    """A private CPU generator seeded with ``seed`` (never the global one)."""
    return torch.Generator().manual_seed(int(seed))


def child_seed(parent: torch.Generator) -> int:
    """A seed drawn from ``parent`` (one draw per child: a synthesizer's generator, pyramid, head…)."""
    return int(torch.randint(0, 2**62, (1,), generator=parent).item())


def seeded_build(seed: int, build: Callable[[], T]) -> T:
    """``build()`` (e.g. a module whose init draws from the global RNG) under ``seed``, leaving the
    caller's global CPU RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
