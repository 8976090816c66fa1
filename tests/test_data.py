"""Real-image loaders, the on-disk synthetic set (streaming, checksums, determinism) and the PNG writers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dfcompress.data.images import save_curves_png, save_image_grid
from dfcompress.data.real import load_images
from dfcompress.data.synthetic import SyntheticSet, read_manifest, teacher_logits, to_uint8, write_synthetic_set
from dfcompress.errors import UserError
from dfcompress.models.teacher import Teacher


def tiny_teacher(channels: int = 3, size: int = 8, classes: int = 4) -> Teacher:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes)).eval()
    return Teacher(m, (channels, size, size), classes, (0.5,) * channels, (0.25,) * channels, "state_dict", "tiny", "ab" * 32)


# -- real images ---------------------------------------------------------------------------------

def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder_sorted_classes_resize_and_per_class(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ["cat", "airplane", "dog"]:
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    exact = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _png(tmp_path / "airplane" / "-exact.png", exact)  # sorts first in its class and needs no resize
    data = load_images(tmp_path, (3, 8, 8), num_classes=3)
    assert data.class_names == ["airplane", "cat", "dog"]
    assert data.x.dtype == torch.uint8 and data.x.shape == (10, 3, 8, 8)
    assert data.y.tolist() == [0] * 4 + [1] * 3 + [2] * 3
    assert torch.equal(data.x[0], torch.from_numpy(exact).permute(2, 0, 1))
    seeds = load_images(tmp_path, (3, 8, 8), per_class=1)
    assert seeds.y.tolist() == [0, 1, 2] and torch.equal(seeds.x[0], data.x[0])
    sub = load_images(tmp_path, (3, 8, 8), limit=4, seed=3)
    assert len(sub) == 4 and torch.equal(sub.x, load_images(tmp_path, (3, 8, 8), limit=4, seed=3).x)


def test_imagefolder_int_names_and_errors(tmp_path):
    g = np.zeros((8, 8), dtype=np.uint8)
    _png(tmp_path / "ints" / "2" / "a.png", g)
    _png(tmp_path / "ints" / "7" / "a.png", g + 9)
    data = load_images(tmp_path / "ints", (1, 8, 8))
    assert data.y.tolist() == [2, 7] and data.class_names is None
    with pytest.raises(UserError, match=r"labels must lie in \[0, 5\)"):
        load_images(tmp_path / "ints", (1, 8, 8), num_classes=5)
    with pytest.raises(UserError, match="takes 3-channel input but .* holds 1-channel"):
        load_images(tmp_path / "ints", (3, 8, 8))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        load_images(tmp_path / "empty", (1, 8, 8))
    _png(tmp_path / "bad" / "0" / "ok.png", g)
    (tmp_path / "bad" / "0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_images(tmp_path / "bad", (1, 8, 8))
    with pytest.raises(UserError, match="not found"):
        load_images(tmp_path / "nope", (1, 8, 8))


def test_npz_nhwc_nhw_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), label_names=np.array(["a", "b", "c"]))
    data = load_images(tmp_path / "a.npz", (3, 8, 8), num_classes=3)
    assert torch.equal(data.x, torch.from_numpy(x).permute(0, 3, 1, 2)) and data.class_names == ["a", "b", "c"]
    big = load_images(tmp_path / "a.npz", (3, 16, 16), per_class=1)
    assert big.x.shape == (3, 3, 16, 16) and big.y.tolist() == [0, 1, 2]
    np.savez(tmp_path / "g.npz", x=x[..., 0], y=np.zeros(6, dtype=np.int64))
    assert load_images(tmp_path / "g.npz", (1, 8, 8)).x.shape == (6, 1, 8, 8)
    np.savez(tmp_path / "nox.npz", images=x, y=np.zeros(6))
    with pytest.raises(UserError, match="'x'"):
        load_images(tmp_path / "nox.npz", (3, 8, 8))
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(UserError, match="'y'"):
        load_images(tmp_path / "noy.npz", (3, 8, 8))
    with pytest.raises(UserError, match=r"\[0, 2\)"):
        load_images(tmp_path / "a.npz", (3, 8, 8), num_classes=2)
    with pytest.raises(UserError, match="1-channel input"):
        load_images(tmp_path / "a.npz", (1, 8, 8))


def test_shared_cifar_npz(shared_dir):
    data = load_images(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz", (3, 32, 32), num_classes=10, per_class=10)
    assert data.x.shape == (100, 3, 32, 32)
    assert torch.bincount(data.y, minlength=10).tolist() == [10] * 10
    assert data.class_names[0] == "airplane"


def test_digits_source():
    pytest.importorskip("sklearn")
    data = load_images("digits:test", (1, 8, 8), num_classes=10, per_class=2)
    assert data.x.shape == (20, 1, 8, 8) and data.x.dtype == torch.uint8
    with pytest.raises(UserError, match="digits:train or digits:test"):
        load_images("digits:val", (1, 8, 8))


# -- synthetic set -------------------------------------------------------------------------------

def _make_set(path, n=10, shard_size=4, teacher=None):
    teacher = teacher or tiny_teacher()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *teacher.input_shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % teacher.num_classes
    write_synthetic_set(path, x, y, None, teacher, shard_size=shard_size, settings={"note": "test"})
    return teacher, x, y


def test_synthetic_set_roundtrip_and_manifest(tmp_path):
    teacher, x, y = _make_set(tmp_path / "s")
    ds = SyntheticSet(tmp_path / "s")
    m = ds.manifest
    assert m["format"] == "dfcompress-synthetic/1" and m["num_images"] == 10 and len(m["shards"]) == 3
    assert [s["count"] for s in m["shards"]] == [4, 4, 2] and m["counts_per_class"] == [3, 3, 2, 2]
    assert m["teacher"]["sha256"] == teacher.sha256 and ds.num_classes == 4 and ds.input_shape == (3, 8, 8)
    assert len(ds) == 10 and torch.equal(ds.labels, y)
    logits = teacher_logits(teacher, x)
    for i in (0, 5, 9, -1):
        img, lab, lg = ds[i]
        j = i % 10
        assert img.dtype == torch.float32 and lab.dtype == torch.int64 and lg.dtype == torch.float32
        assert torch.equal(to_uint8(img), x[j]) and int(lab) == int(y[j])
        assert torch.equal(lg, logits[j])
    with pytest.raises(IndexError):
        ds[10]
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert sum(b[0].shape[0] for b in loader) == 10


def test_serialisation_is_byte_deterministic(tmp_path):
    _make_set(tmp_path / "a")
    _make_set(tmp_path / "b")
    for f in ["manifest.json", "shards/shard-00000.safetensors", "shards/shard-00002.safetensors"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_pixel_conversion_is_fixed_not_minmax():
    x = torch.tensor([[[[0.1, 0.2], [0.3, 1.7]]]])
    assert to_uint8(x).flatten().tolist() == [26, 51, 76, 255]


def test_checksum_failure_names_shard(tmp_path):
    _make_set(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = SyntheticSet(tmp_path / "s")
    ds[0]  # shard 0 is intact
    with pytest.raises(UserError, match="shard-00001.*corrupted.*re-run"):
        ds[5]


def test_missing_or_foreign_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a finished synthetic set"):
        SyntheticSet(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a dfcompress synthetic-set"):
        read_manifest(tmp_path / "x")


def _rss() -> int:
    import re

    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _rss_growth_while_iterating(ds) -> int:
    ds[0]
    before = _rss()
    for i in range(len(ds)):
        ds[i]
        assert ds.open_shards <= ds.max_open
    return _rss() - before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_streaming_memory_stays_bounded(tmp_path):
    teacher = tiny_teacher(channels=3, size=64, classes=10)
    n = 2560  # 40 shards, 31 MB of pixels
    x = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    write_synthetic_set(tmp_path / "big", x, torch.arange(n) % 10, torch.zeros(n, 10), teacher, shard_size=64)
    total = x.numel()
    del x
    bounded = _rss_growth_while_iterating(SyntheticSet(tmp_path / "big"))
    assert bounded < total / 4, (bounded, total)
    # control: keeping every shard mapped does grow with N, so the measurement above can see growth
    unbounded = _rss_growth_while_iterating(SyntheticSet(tmp_path / "big", max_open=1000))
    assert unbounded > total / 2 > bounded, (unbounded, bounded)


# -- the KD loader over a synthetic set ------------------------------------------------------------

def test_kd_loader_reads_whole_shards_in_one_exact_permutation(tmp_path, monkeypatch):
    """Each epoch is one seeded permutation of the training positions, read one whole shard at a time
    (never row by row), and every batch holds exactly what ``ds[i]`` holds for its positions."""
    from torch.utils.data import Subset

    from dfcompress.compress.loader import KDLoader

    teacher, x, y = _make_set(tmp_path / "s", n=50, shard_size=4)  # 13 shards: several windows
    ds = SyntheticSet(tmp_path / "s")
    train = Subset(ds, [i for i in range(50) if i % 7])  # a held-out part removed, as split_holdout does
    expected = {p: train[p] for p in range(len(train))}
    reads = []
    real_shard = SyntheticSet.shard
    monkeypatch.setattr(SyntheticSet, "shard", lambda self, k: reads.append(k) or real_shard(self, k))
    monkeypatch.setattr(SyntheticSet, "__getitem__", lambda self, i: pytest.fail("read row by row"))

    loader = KDLoader(train, batch_size=8, seed=3)
    seen = []
    for images, labels, logits in loader.epoch(0):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 8)
        seen.append((images, labels, logits))
    assert len(seen) == len(loader) == len(train) // 8
    assert sorted(reads) == sorted(set(reads)) == list(range(13))  # each shard read once, whole
    order = loader.positions(0)
    assert sorted(order) == list(range(len(train)))
    flat = [p for p in order[:len(seen) * 8]]
    images = torch.cat([b[0] for b in seen]).float().div_(255.0)
    for j, p in enumerate(flat):
        img, label, lg = expected[p]
        assert torch.equal(images[j], img) and int(torch.cat([b[1] for b in seen])[j]) == int(label)
        assert torch.equal(torch.cat([b[2] for b in seen])[j], lg)
    assert loader.positions(0) == KDLoader(train, 8, seed=3).positions(0)  # deterministic
    assert loader.positions(1) != order and KDLoader(train, 8, seed=4).positions(0) != order


def test_kd_loader_thread_hands_errors_over_and_stops_early(tmp_path):
    from dfcompress.compress.loader import prefetched

    def boom():
        yield 1
        raise ValueError("shard gone")

    with pytest.raises(ValueError, match="shard gone"):
        list(prefetched(boom(), 2))
    made = []
    it = prefetched((made.append(i) or i for i in range(1000)), 2)
    assert next(it) == 0
    it.close()  # what an exception in the training step does
    assert len(made) < 10


def test_write_synthetic_set_validates(tmp_path):
    teacher = tiny_teacher()
    with pytest.raises(UserError, match="do not match the teacher's input"):
        write_synthetic_set(tmp_path / "s", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2), None, teacher)
    with pytest.raises(UserError, match="labels must lie"):
        write_synthetic_set(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 9]), None, teacher)


# -- pictures ------------------------------------------------------------------------------------

def test_image_grid_nearest_upscale(tmp_path):
    imgs = torch.arange(2 * 64, dtype=torch.uint8).view(2, 1, 8, 8)
    save_image_grid(imgs, tmp_path / "g.png", nrow=2, upscale_to=64, pad=2)
    arr = np.asarray(Image.open(tmp_path / "g.png"))
    assert arr.shape == (2 + 64 + 2, 2 + 2 * (64 + 2))
    assert (arr[2:10, 2:10] == 0).all() and arr[2 + 63, 2 + 63] == 63  # 8x nearest-neighbour blocks


def test_curves_png(tmp_path):
    series = {"total": [10 * math.exp(-i / 10) for i in range(50)], "ce": [float("nan")] + [1.0] * 49}
    save_curves_png(series, tmp_path / "c.png", "loss")
    save_curves_png({"x": [0.0, -1.0, 2.0]}, tmp_path / "d.png", "linear fallback")
    a = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert a.shape == (420, 720, 3) and (a != 255).any()
    save_curves_png(series, tmp_path / "c2.png", "loss")
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "c2.png").read_bytes()
