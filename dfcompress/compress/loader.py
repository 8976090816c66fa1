"""The KD input pipeline: whole shards, one exact permutation per epoch, batches prefetched on a thread.

Reading a synthetic set image by image (three safetensors slices each) costs about what a GPU spends
on a whole KD step per image at CIFAR sizes. Here each epoch's order is built from shards instead: a
seeded shuffle of the shard order, cut into windows of ``MIX`` shards, then a seeded shuffle of each
window's images, so a batch mixes several shards. Shards are read whole (one read per tensor) into a
small cache (two windows), batches are gathered from memory on a background thread, pinned when the
model is on CUDA, and copied to the device without blocking.

The order is still one permutation of the training set per epoch, a pure function of (seed, epoch):
rank r of W takes positions r, r+W, ... (trimmed to a multiple of W), so the W per-rank batches of step
j are exactly the single-process batch j, and a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..seeds import EPOCH_ORDER, seeded_generator, stream_seed

MIX = 4  # shards shuffled together
PREFETCH = 2  # batches made ahead of the training step
LOADER = "shard-windows/1"  # recorded in KD checkpoints: another order would break bit-exact resume


def epoch_order(groups: list[list[int]], seed: int, epoch: int, mix: int = MIX) -> list[int]:
    """One permutation of all positions in ``groups`` (one group per shard): shuffled shard order,
    windows of ``mix`` shards, each window's positions shuffled. Depends only on (seed, epoch)."""

    g = seeded_generator(stream_seed(seed, epoch, EPOCH_ORDER))
    shards = torch.randperm(len(groups), generator=g).tolist()
    order: list[int] = []
    for w in range(0, len(shards), mix):
        members = [p for k in shards[w:w + mix] for p in groups[k]]
        order += [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
    return order


def rank_positions(order: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share: positions rank, rank+W, ... of ``order`` trimmed to a multiple of W (no repeats)."""
    return order[rank:len(order) - len(order) % world_size:world_size]


def _synthetic_layout(dataset: Dataset) -> Optional[tuple[Any, list[int]]]:
    """(SyntheticSet, its index for each position of ``dataset``) when whole-shard reads apply."""
    from ..data.synthetic import SyntheticSet

    if isinstance(dataset, SyntheticSet):
        base, index = dataset, list(range(len(dataset)))
    elif isinstance(dataset, Subset) and isinstance(dataset.dataset, SyntheticSet):
        base, index = dataset.dataset, [int(i) for i in dataset.indices]
    else:
        return None
    return (base, index) if base.transform is None else None


class KDLoader:
    """Batches ``(images, labels, logits)`` of one rank for each epoch; images are uint8 from a synthetic
    set (see ``unit_images``), float [0,1] from any other dataset of ``(image01, label, logits)`` items."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 pin_memory: bool = False, prefetch: int = PREFETCH, mix: int = MIX):
        self.dataset, self.batch, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world, self.pin, self.prefetch, self.mix = rank, world_size, pin_memory, prefetch, mix
        self.n = len(dataset)
        layout = _synthetic_layout(dataset)
        self._base = layout[0] if layout else None
        if layout:
            self._where = [layout[0].locate(i) for i in layout[1]]  # (shard, row) per position
            by_shard: dict[int, list[int]] = {}
            for p, (k, _row) in enumerate(self._where):
                by_shard.setdefault(k, []).append(p)
            self.groups = [by_shard[k] for k in sorted(by_shard)]
        else:
            self.groups = [list(range(self.n))]
        self._cache: "OrderedDict[int, tuple[Tensor, Tensor, Tensor]]" = OrderedDict()
        per_rank = self.n // world_size
        self.drop_last = per_rank > self.batch  # a last batch of 1 breaks BatchNorm in train mode
        self.per_rank = per_rank

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.per_rank // self.batch if self.drop_last else -(-self.per_rank // self.batch)

    def positions(self, epoch: int) -> list[int]:
        """This rank's dataset positions for ``epoch``, in order."""
        return rank_positions(epoch_order(self.groups, self.seed, epoch, self.mix), self.rank, self.world)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        pos = self.positions(epoch)
        batches = [pos[i:i + self.batch] for i in range(0, len(pos), self.batch)][:len(self)]
        return prefetched((self._gather(b) for b in batches), self.prefetch)

    # -- internals ------------------------------------------------------------------------------
    def _gather(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        if self._base is None:
            items = [self.dataset[p] for p in positions]
            out = (torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items]),
                   torch.stack([torch.as_tensor(it[2]) for it in items]))
        else:
            where = torch.tensor([self._where[p] for p in positions], dtype=torch.long)
            out = None
            for k in where[:, 0].unique().tolist():
                sel = (where[:, 0] == k).nonzero().flatten()
                parts = self._shard(k)
                if out is None:
                    out = tuple(torch.empty((len(positions), *t.shape[1:]), dtype=t.dtype) for t in parts)
                for dst, src in zip(out, parts):
                    dst[sel] = src[where[sel, 1]]
        return tuple(t.pin_memory() for t in out) if self.pin else out  # type: ignore[return-value]

    def _shard(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        self._cache[k] = self._base.shard(k)
        while len(self._cache) > 2 * self.mix:  # a batch can straddle two windows
            self._cache.popitem(last=False)
        return self._cache[k]


def unit_images(images: Tensor) -> Tensor:
    """uint8 pixels -> float [0,1] (after the copy to the device: a quarter of the bytes cross the bus);
    the same ``float().div_(255)`` as ``SyntheticSet.__getitem__``, so values are identical."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def prefetched(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` produced ``depth`` ahead on a background thread; its errors re-raise here, and
    leaving the loop early (an exception in the training step) stops the thread."""
    q: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(exc))

    thread = threading.Thread(target=work, name="dfcompress-kd-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
