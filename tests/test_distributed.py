"""Scale-out with torchrun: 2 CPU ranks (gloo) against 1 process, through the real CLI.

Each end-to-end test starts ``torchrun --nproc-per-node 2 -m dfcompress ...`` as a subprocess on a
free loopback port and compares with the same command run plainly:

* the synthetic set made by 2 ranks is byte-identical to the one made by 1 process;
* DDP distillation (one shard-window permutation per epoch split across ranks, per-rank batch B/2, synchronised BatchNorm) ends with the
  single-process weights up to floating-point reduction order;
* a torchrun job entering a folder with finished shards (what a restart after a crash finds) keeps
  them — not rewritten — and makes only the missing ones.

Every process runs with OMP_NUM_THREADS=1 (torchrun's own default per worker), because CPU kernels
are bit-reproducible only at a fixed intra-op thread count.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dfcompress.compress import kd
from dfcompress.compress.loader import KDLoader
from dfcompress.distributed import CpuSyncBatchNorm, DistContext, sync_batchnorm_view

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOLERANCE = 1e-4  # max |Δw| allowed between 2-rank DDP and 1-process weights (measured: ~1e-6)

needs_torchrun = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()
                                         and TORCHRUN.exists()), reason="needs torch.distributed with gloo and torchrun")


# ----------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RESTART_COUNT", "DFCOMPRESS_DEBUG")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def single(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dfcompress", *args], cwd)


def torchrun(cwd: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return _run([TORCHRUN, "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"localhost:{_free_port()}", "--max-restarts", "0",
                 "-m", "dfcompress", *args], cwd)


def _augmentation_is_rank_aware() -> bool:
    """kd.augment draws the global batch's random numbers and keeps this rank's part (``world_size``
    argument): only then do crops/flips match one process and can stay on in the DDP comparison."""
    return "world_size" in inspect.signature(kd.augment).parameters


def _profile(folder: Path) -> Path:
    """ci-smoke with 4 shards of 8 images and a distill batch of 8 (4 per rank)."""
    data = yaml.safe_load((REPO / "profiles" / "ci-smoke.yaml").read_text())
    data["synthesize"].update(num_images=32, batch_size=8, iterations=2)
    data["distill"].update(batch_size=8, epochs=2, export=False)  # ONNX parity is tested elsewhere
    if not _augmentation_is_rank_aware():
        data["distill"].update(crop_padding=0, flip=False)
    path = folder / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("shard-*.safetensors"))}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


COMMON = ("--profile", "ddp.yaml", "--iterations", "2", "-n", "32", "--epochs", "2", "--student", "digits_cnn",
          "--device", "cpu")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The same distill command (MODEL omitted: embedded digits teacher; no --data: it synthesizes its
    own set first) run by 1 process and by torchrun with 2 ranks."""
    work = tmp_path_factory.mktemp("ddp")
    _profile(work)
    one = single(work, "distill", *COMMON, "-o", "one")
    two = torchrun(work, "distill", *COMMON, "-o", "two")
    return work, one, two


# ----------------------------------------------------------------------------------------------
# end to end


@needs_torchrun
def test_two_ranks_make_the_byte_identical_synthetic_set(distilled):
    work, _, two = distilled
    a, b = work / "one" / "synthetic", work / "two" / "synthetic"
    shards = _files(a)
    assert len(shards) == 4 and shards == _files(b)
    assert _manifest(a)["shards"] == _manifest(b)["shards"]  # file, sha256, count, counts_per_class, retries
    assert _manifest(a) == _manifest(b)
    assert (a / "loss.csv").read_bytes() == (b / "loss.csv").read_bytes()
    assert (a / "preview.png").read_bytes() == (b / "preview.png").read_bytes()
    assert "on 2 ranks" in two.stderr


@needs_torchrun
def test_ddp_distillation_equals_one_process(distilled):
    work, one, two = distilled
    w1, w2 = _weights(work / "one"), _weights(work / "two")
    assert w1.keys() == w2.keys()
    diffs = {k: (w1[k].double() - w2[k].double()).abs().max().item() for k in w1 if w1[k].is_floating_point()}
    assert max(diffs.values()) < TOLERANCE, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    for k in w1:
        if not w1[k].is_floating_point():  # BatchNorm's num_batches_tracked: the same number of steps
            assert torch.equal(w1[k], w2[k]), k
    # it really ran as DDP over 2 ranks, with the per-rank batch making up the global batch of 8
    state = torch.load(work / "two" / "checkpoint" / kd.CHECKPOINT, map_location="cpu", weights_only=True)
    fingerprint = json.loads(state["fingerprint"])
    assert fingerprint["world_size"] == 2 and fingerprint["batch_size"] == 8
    assert json.loads(state["history"])[-1]["epoch"] == 2
    # rank 0 alone reports: one JSON document on stdout, one summary on stderr
    assert json.loads(two.stdout)["output"] == "two"
    assert two.stderr.count("distill: result in two") == 1
    assert (work / "two" / "report.json").is_file() and (work / "two" / "dfcompress.json").is_file()


@needs_torchrun
def test_torchrun_resumes_without_redoing_finished_shards(distilled):
    """A job that died after shards 0 (rank 0's) and 3 (rank 1's) were finished: the torchrun run
    that follows keeps both files as they are (same inode: not rewritten) and makes only 1 and 2."""
    work, _, _ = distilled
    done = work / "one" / "synthetic"
    out = work / "resumed"
    (out / "shards").mkdir(parents=True)
    shutil.copy2(done / "run.json", out / "run.json")
    for k in (0, 3):
        for suffix in (".safetensors", ".json", ".loss.json"):
            shutil.copy2(done / "shards" / f"shard-{k:05d}{suffix}", out / "shards" / f"shard-{k:05d}{suffix}")
    before = {k: os.stat(out / "shards" / f"shard-{k:05d}.safetensors") for k in (0, 3)}

    run = torchrun(work, "synthesize", "--profile", "ddp.yaml", "--iterations", "2", "-n", "32", "--batch-size", "8",
                   "--device", "cpu", "-o", "resumed")

    for k, st in before.items():
        now = os.stat(out / "shards" / f"shard-{k:05d}.safetensors")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"shard {k} was rewritten"
    assert "resuming resumed: 1 of 2 shards already finished" in run.stderr  # rank 0
    assert "[rank 1] resuming resumed: 1 of 2 shards already finished" in run.stderr
    assert _files(out) == _files(done)
    assert _manifest(out) == _manifest(done)
    assert json.loads(run.stdout)["synthetic_set"] == "resumed"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


@needs_torchrun
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFCOMPRESS_RESTART_TEST") != "1" or not Path("/proc").is_dir(),
                    reason="~45 s on 2 cores: set DFCOMPRESS_RESTART_TEST=1 (Linux)")
def test_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path):
    """SIGKILL one worker mid-run: torchrun (--max-restarts 1) restarts the group, which keeps the
    finished shards (same inode), does not apply --overwrite again, and completes the set."""
    import signal
    import time

    _profile(tmp_path)
    env = dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # pytorch/pytorch#135712, see docs/scaling.md
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}",
           "--max-restarts", "1", "-m", "dfcompress", "synthesize", "--profile", "ddp.yaml", "--iterations", "100",
           "-n", "64", "--batch-size", "8", "--device", "cpu", "--overwrite", "-o", "out"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "out" / "shards"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            finished = [p for p in shards.glob("shard-*.json") if not p.name.endswith(".loss.json")] if shards.is_dir() else []
            if finished:
                break
            time.sleep(0.05)
        if proc.poll() is not None or (tmp_path / "out" / "manifest.json").exists():
            pytest.skip("the run finished before a worker could be killed")
        before = {p.name: os.stat(p.with_suffix(".safetensors")).st_ino for p in finished}
        victim = _children(proc.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert "resuming out:" in err
    for name, ino in before.items():
        assert os.stat((shards / name).with_suffix(".safetensors")).st_ino == ino, f"{name} was made again"
    assert len(_manifest(tmp_path / "out")["shards"]) == 8
    assert json.loads(out)["synthetic_set"] == "out"


# ----------------------------------------------------------------------------------------------
# the pieces, in one process


@pytest.mark.parametrize("n", [5, 24, 29, 31, 64, 67])
@pytest.mark.parametrize("batch,world", [(8, 2), (8, 4), (12, 3), (32, 2)])
def test_per_rank_batches_make_up_the_single_process_batch(n, batch, world):
    """With per-rank batch B/W, step j on W ranks covers exactly the images of step j of one process,
    whenever one process takes full batches (n > B) or W divides n."""
    if n <= batch and n % world:
        pytest.skip("a single short batch that W does not divide cannot be split evenly")

    def batches(rank: int, w: int) -> list[list[int]]:
        items = [(torch.tensor([float(i)]), i, torch.zeros(1)) for i in range(n)]
        loader = KDLoader(items, kd.per_rank_batch(batch, rank, w), seed=3, rank=rank, world_size=w)
        return [labels.tolist() for _images, labels, _logits in loader.epoch(5)]

    reference = batches(0, 1)
    per_rank = [batches(r, world) for r in range(world)]
    assert all(len(p) == len(reference) for p in per_rank)
    for step, full in enumerate(reference):
        assert sorted(i for p in per_rank for i in p[step]) == sorted(full)
        assert len({len(p[step]) for p in per_rank}) == 1  # equal shares: DDP's mean is the batch mean
    assert sorted(i for p in per_rank for b in p for i in b) == sorted(set(i for p in per_rank for b in p for i in b))


@pytest.mark.parametrize("traced", [False, True], ids=["module", "fx-graphmodule"])
def test_sync_batchnorm_view_shares_tensors_and_leaves_the_model_alone(traced):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), nn.Flatten(), nn.Linear(144, 3))
    if traced:  # ONNX-imported teachers (and so pruned students) are torch.fx GraphModules
        net = torch.fx.symbolic_trace(net)
    reference = copy.deepcopy(net).train()
    view = sync_batchnorm_view(net)
    bn, view_bn = net.get_submodule("1.0"), view.get_submodule("1.0")
    assert type(bn) is nn.BatchNorm2d and isinstance(view_bn, CpuSyncBatchNorm)
    assert type(view) is type(net)
    assert list(view.parameters()) == list(net.parameters())  # the very same tensors, in order
    assert view_bn.running_var is bn.running_var
    x = torch.randn(6, 1, 8, 8)
    view.train()
    assert torch.allclose(view(x), reference(x), atol=1e-6)  # no process group: an ordinary BatchNorm
    assert torch.allclose(bn.running_mean, reference.get_submodule("1.0").running_mean)  # updated through the view
    assert int(bn.num_batches_tracked) == 1
    net.eval()  # the view has its own train/eval flags
    assert view.training and view_bn.training and not bn.training


def test_plain_run_is_a_world_of_one(monkeypatch):
    from dfcompress.distributed import distributed_context

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_context("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active, ctx.restarted) == (0, 1, True, False, False)
        assert ctx.broadcast("runs/x") == "runs/x"
        ctx.barrier()
    assert DistContext(restart_count=1).restarted


@needs_torchrun
def test_fast_ni_on_two_ranks_equals_one_process(tmp_path):
    """fast-ni: rank 0 meta-learns on the first 2 shards (the others wait), then every rank makes its share of the
    rest from the frozen meta-state saved with shard 1 -- byte for byte what one process makes."""
    data = yaml.safe_load((REPO / "profiles" / "ci-smoke.yaml").read_text())
    data["synthesize"].update(method="fast-ni", num_images=32, batch_size=8, iterations=2, meta_shards=2)
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(data))
    args = ("synthesize", "--profile", "fast.yaml", "--device", "cpu")
    single(tmp_path, *args, "-o", "one")
    two = torchrun(tmp_path, *args, "-o", "two")
    a, b = tmp_path / "one", tmp_path / "two"
    assert len(_files(a)) == 4 and _files(a) == _files(b)
    states = sorted(p.name for p in (b / "shards").glob("state-*.safetensors"))
    assert states == ["state-00000.safetensors", "state-00001.safetensors"]
    assert all((a / "shards" / s).read_bytes() == (b / "shards" / s).read_bytes() for s in states)
    assert _manifest(a) == _manifest(b) and _manifest(a)["sequential_shards"] == 2
    assert "waiting for rank 0 to make the first 2 shard(s)" in two.stderr
