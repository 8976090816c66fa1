"""Speed of inversion: NaturalInversion and DeepInversion ms/iteration against the teacher's own cost.

For each teacher (CIFAR ResNet-56 with its real weights; ResNet-34-CIFAR from the zoo, random init with
randomised BN statistics) × batch size × method, one child process (so ``ru_maxrss`` is that run's own):

1. builds the real synthesizer (``build_synthesizer(teacher, settings.synthesize, runtime)``, profile
   ``cifar10`` settings) and runs ``synthesize_batch`` for W + K iterations; ms/iteration is the median
   time from leaving one ``on_step`` callback to entering the next (setup excluded; the callback follows
   a host sync, so CUDA times are real);
2. inside the callback, between iterations, times the *irreducible teacher cost* on a batch of the same
   size: one forward (no grad) and one forward+backward w.r.t. the input, on a frozen copy of the
   teacher. Interleaving puts method and reference under the same machine load;
3. for NaturalInversion also times its parts there (feature pass, loss pass with the statistics term,
   generator, pyramid, Adam step), so the gap between NI and the teacher can be attributed;
4. reports peak RSS and, on CUDA, peak allocated memory.

NaturalInversion needs one no-grad teacher pass (pyramid features of G(z|y)) and one forward/backward
(the loss), so its ratio is NI / (fwd + fwd/bwd); DeepInversion needs only the forward/backward, so its
ratio is DI / fwd/bwd. A ratio of 1 means "as fast as the teacher allows".

``--profile`` runs torch.profiler over a few NaturalInversion iterations and prints the top ops by self
CPU time (and CUDA time on a GPU), grouped into categories.

    .venv/bin/python bench/speed.py                    # full: both teachers, batch 64 and 256
    .venv/bin/python bench/speed.py --quick --profile  # smoke run + profile
    .venv/bin/python bench/speed.py --device cuda      # on a GPU: fp32 and AMP + channels_last variants
    .venv/bin/python bench/speed.py --kd only --quick  # only the KD loop against the bare teacher fwd + student step

Writes ``bench/results/speed.json`` and ``.md`` (``speed-quick.*`` with ``--quick``). Not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py; works as `python bench/speed.py` and `python -m bench.speed`)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEACHERS = ("resnet56", "resnet34_cifar")
METHODS = ("naturalinversion", "deepinversion")
CHILD_FLAG = "--_child"


# ----------------------------------------------------------------------------------------------
# teachers and runtimes


def build_teacher(name: str):
    """The real CIFAR ResNet-56, or a randomly initialised zoo model with randomised BN statistics."""
    from dfcompress.models.loading import load_teacher
    from dfcompress.models.teacher import Teacher
    from dfcompress.models.zoo import create_model

    if name == "resnet56":
        common.require(common.RESNET56_TH)
        return load_teacher(str(common.shared(common.RESNET56_TH)), arch="resnet56", mean=common.IMAGENET_MEAN,
                            std=common.IMAGENET_STD)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = create_model(name, num_classes=10, in_channels=3, input_size=32)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                # random but plausible statistics, so the BN term has something non-trivial to match
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return Teacher(module=module.eval(), input_shape=(3, 32, 32), num_classes=10, mean=common.IMAGENET_MEAN,
                   std=common.IMAGENET_STD, format="zoo", source=f"zoo:{name} (random init, randomised BN stats)",
                   sha256=f"random:{name}:seed0", arch=name)


def make_runtime(device: str, amp: bool, channels_last: Optional[bool]):
    from dfcompress.device import resolve_runtime

    rt = resolve_runtime(device, amp=amp)
    if channels_last is not None and channels_last != rt.channels_last:
        rt = dataclasses.replace(rt, channels_last=channels_last)
    return rt


def variants(args) -> list[dict[str, Any]]:
    """fp32 (and, on CUDA unless pinned by flags, AMP + channels_last as a second variant)."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not cuda:
        cl = bool(args.channels_last) if args.channels_last is not None else False
        return [{"name": "fp32" + ("+channels_last" if cl else ""), "amp": False, "channels_last": cl}]
    if args.amp is None and args.channels_last is None:
        return [{"name": "fp32", "amp": False, "channels_last": False},
                {"name": "amp+channels_last", "amp": True, "channels_last": True}]
    amp = True if args.amp is None else args.amp
    cl = True if args.channels_last is None else args.channels_last
    return [{"name": ("amp" if amp else "fp32") + ("+channels_last" if cl else ""), "amp": amp, "channels_last": cl}]


# ----------------------------------------------------------------------------------------------
# measurements (child process)


def _labels(batch: int, k: int = 10) -> torch.Tensor:
    return torch.arange(batch) % k


class Probes:
    """Reference costs timed *between* the synthesizer's iterations (from its on_step callback).

    Interleaving puts the method and its references under the same machine load, which matters on a
    shared machine. They run on a deep copy of the teacher (no synthesizer hooks on it, same weights),
    in eval mode without parameter gradients, on a fixed batch of the same size.

    * ``teacher_fwd`` / ``teacher_fwdbwd``: one no-grad forward / one forward+backward to the input;
    * with ``parts`` (NaturalInversion): its pieces on their own, built with the synthesizer's own
      builders — no-grad stage-feature pass (``StageTaps.capture``), loss pass with the statistics
      term (CE + λ_bn R, hooks), generator forward/backward, pyramid forward/backward, Adam step.
    """

    def __init__(self, teacher, rt, synth, batch: int, parts: bool):
        self.rt, self.dev = rt, rt.device
        self._frozen: list = []
        self.model = self._frozen_copy(teacher)
        g = torch.Generator().manual_seed(1)
        self.x = rt.tensor(torch.randn(batch, *teacher.input_shape, generator=g))
        self.y = _labels(batch, teacher.num_classes).to(self.dev)
        self.samples: dict[str, list[float]] = {}
        self.fns = {"teacher_fwd": self.teacher_fwd, "teacher_fwdbwd": self.teacher_fwdbwd}
        self._cleanup: list = []
        if parts:
            self._build_parts(teacher, synth, batch)

    def _frozen_copy(self, teacher) -> torch.nn.Module:
        """A private eval-mode copy without parameter gradients (the synthesizer's hooks are not on it)."""
        import copy

        from dfcompress.inversion.synthesizers.common import frozen

        ctx = frozen(self.rt.prepare(copy.deepcopy(teacher.module)).eval())
        self._frozen.append(ctx)
        return ctx.__enter__()

    def teacher_fwd(self) -> None:
        with torch.no_grad(), self.rt.autocast():
            self.model(self.x)

    def teacher_fwdbwd(self) -> None:
        xi = self.x.detach().clone().requires_grad_(True)
        with self.rt.autocast():
            logits = self.model(xi)
        F.cross_entropy(logits.float(), self.y).backward()

    def _build_parts(self, teacher, synth, batch: int) -> None:
        from dfcompress.inversion import losses
        from dfcompress.inversion.pyramid import StageTaps
        from dfcompress.inversion.scaling import ChannelScaling
        from dfcompress.inversion.synthesizers import common as synth_common
        from dfcompress.inversion.synthesizers.common import StatsTerm

        s, rt = synth.settings, self.rt
        rng = torch.Generator().manual_seed(5)
        labels = _labels(batch, teacher.num_classes)
        gen = rt.prepare(synth.build_generator(1))
        ftp = rt.prepare(synth.build_pyramid(2))
        acs = ChannelScaling(batch, teacher.input_shape[0], s.alpha_mean, s.alpha_std, rng).to(self.dev)
        zy = gen.latent(torch.randn(batch, s.latent_dim, generator=rng), labels).to(self.dev)
        make_opt = getattr(synth_common, "adam", None) or (lambda ps, lr: torch.optim.Adam(ps, lr=lr))  # the synthesizers' choice
        opts = [make_opt(gen.parameters(), lr=s.lr_generator), make_opt(ftp.parameters(), lr=s.lr_pyramid),
                make_opt(acs.parameters(), lr=s.lr_scaling)]
        # the parts' hooks go on a second copy, so the reference passes above run on a hook-free teacher
        model = self._frozen_copy(teacher)
        taps = StageTaps(model, synth.stages)
        stats_term = StatsTerm(model, synth.targets, self.dev, s.first_bn_multiplier)
        self._cleanup += [taps.remove, stats_term.close]
        index = losses.ClassIndex(self.y)
        with torch.no_grad(), rt.autocast():
            g0 = gen(zy)
        feats = taps.capture(model, g0)
        y = self.y

        def generator_fwdbwd():
            with rt.autocast():
                out = gen(zy)
            out.float().square().mean().backward()

        def pyramid_fwdbwd():
            g = g0.detach().clone().requires_grad_(True)
            with rt.autocast():
                x = ftp(g, feats)
            x.float().square().mean().backward()

        def feature_pass():
            taps.capture(model, g0)

        def loss_pass_with_stats():
            xi = self.x.detach().clone().requires_grad_(True)
            with rt.autocast():
                logits = model(xi)
            (F.cross_entropy(logits.float(), y) + s.lambda_bn * stats_term(index)).backward()

        params = [p for o in opts for group in o.param_groups for p in group["params"]]

        def adam_step():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for o in opts:
                o.step()

        self.fns.update({"feature_pass": feature_pass, "loss_pass_with_stats": loss_pass_with_stats,
                         "generator_fwdbwd": generator_fwdbwd, "pyramid_fwdbwd": pyramid_fwdbwd, "adam_step": adam_step})
        self.param_counts = {"generator_params": sum(p.numel() for p in gen.parameters()),
                             "pyramid_params": sum(p.numel() for p in ftp.parameters())}

    def run(self, record: bool = True) -> None:
        for name, fn in self.fns.items():
            common.sync(self.dev)
            t0 = time.perf_counter()
            fn()
            common.sync(self.dev)
            if record:
                self.samples.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

    def medians(self) -> dict[str, float]:
        return {k: round(common.median(v), 2) for k, v in self.samples.items()}

    def close(self) -> None:
        for fn in self._cleanup:
            fn()
        for ctx in reversed(self._frozen):
            ctx.__exit__(None, None, None)


def measure_method(teacher, rt, method: str, batch: int, iters: int, warmup: int, parts: bool = False,
                   profile: int = 0) -> dict[str, Any]:
    """ms per iteration of the real synthesizer from its on_step timestamps (setup and probes excluded)."""
    from dfcompress.inversion.synthesizers import build_synthesizer
    from dfcompress.settings import resolve_settings

    settings = resolve_settings("cifar10", {"synthesize.method": method, "synthesize.batch_size": batch,
                                            "synthesize.iterations": warmup + max(iters, profile) + 1})
    t0 = time.perf_counter()
    synth = build_synthesizer(teacher, settings.synthesize, rt)
    build_s = time.perf_counter() - t0
    probes = None if profile else Probes(teacher, rt, synth, batch, parts and method == "naturalinversion")
    if probes is not None:
        probes.run(record=False)  # warm the probes' allocations once
    enter: list[float] = []
    leave: list[float] = []
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.is_cuda else [])
        prof = torch_profile(activities=acts, record_shapes=True)

    def on_step(it: int, _comp: dict) -> None:
        enter.append(time.perf_counter())
        if prof is not None:
            if it == warmup:
                prof.start()
            elif it == warmup + profile:
                prof.stop()
        if probes is not None and warmup <= it < warmup + iters:
            probes.run()
        leave.append(time.perf_counter())

    t1 = time.perf_counter()
    try:
        synth.synthesize_batch(_labels(batch, teacher.num_classes), seed=1234, on_step=on_step)
    finally:
        if probes is not None:
            probes.close()
    call_s = time.perf_counter() - t1
    # iteration i runs from leaving callback i-1 to entering callback i
    gaps = [(enter[i] - leave[i - 1]) * 1e3 for i in range(1, len(enter))][warmup:warmup + iters]
    res: dict[str, Any] = {
        "iterations_ms": [round(v, 2) for v in gaps], "build_s": round(build_s, 3), "call_s": round(call_s, 3),
        "settings": {k: getattr(settings.synthesize, k) for k in ("latent_dim", "lambda_bn", "use_pyramid", "use_scaling",
                                                                   "pixel_clamp", "jitter", "flip")}}
    if probes is not None:
        res["probes_ms"] = probes.medians()
        res["probe_samples_ms"] = {k: [round(v, 1) for v in vals] for k, vals in probes.samples.items()}
        res.update(getattr(probes, "param_counts", {}))
    if prof is not None:
        res["profile"] = summarise_profile(prof, rt, profile)
    return res


CATEGORIES = (
    ("conv backward", ("convolution_backward", "conv_depthwise", "_backward_input", "_backward_weight", "mkldnn_convolution_backward")),
    ("conv forward", ("mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d", "cudnn_convolution", "_convolution", "conv2d")),
    ("batch norm", ("batch_norm",)),
    ("linear / matmul", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
    ("statistics (var_mean etc.)", ("var_mean", "aten::var", "aten::std")),
    ("upsample / pooling", ("upsample", "pool", "interpolate")),
    ("optimizer (Adam)", ("_foreach", "adam", "addcdiv", "lerp")),
    ("copies / layout", ("copy_", "clone", "contiguous", "to_copy", "empty", "zero_", "fill_", "cat", "roll", "flip", "where")),
    ("elementwise", ("add", "mul", "sub", "div", "relu", "leaky", "tanh", "threshold", "sqrt", "pow", "neg", "clamp", "maximum",
                     "minimum", "sum", "mean", "norm", "exp", "log", "softmax", "nll", "index", "scatter", "gather")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def summarise_profile(prof, rt, iters: int, top: int = 25) -> dict[str, Any]:
    """Top ops by self CPU time (and self CUDA time) plus totals per category, per iteration."""
    events = prof.key_averages()
    cpu_key = "self_cpu_time_total"
    table = events.table(sort_by=cpu_key, row_limit=top, max_name_column_width=48)
    rows = []
    cats: dict[str, float] = {}
    total = 0.0
    for e in events:
        self_us = float(e.self_cpu_time_total)
        total += self_us
        cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + self_us
        rows.append({"op": e.key, "calls": int(e.count), "self_cpu_ms": round(self_us / 1e3, 2),
                     "cpu_total_ms": round(float(e.cpu_time_total) / 1e3, 2)})
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    # the synthesizer's named ranges (``ni/...``), inclusive CPU time: where the forward-side time goes
    ranges = {e.key: round(float(e.cpu_time_total) / 1e3 / iters, 2) for e in events if e.key.startswith("ni/")}
    res: dict[str, Any] = {
        "iterations": iters,
        "ranges_ms_per_iteration": ranges,
        "self_cpu_ms_per_iteration": round(total / 1e3 / iters, 2),
        "top_ops": rows[:top],
        "categories_ms_per_iteration": {k: round(v / 1e3 / iters, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "table": table,
    }
    if rt.is_cuda:
        res["cuda_table"] = events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=48)
    return res


def use_literal_generator() -> None:
    """Table 6's generator as written (nn.Upsample x2 then Conv 3x3): the "before" of the fused resize-conv."""
    import torch.nn.functional as F

    from dfcompress.inversion import generator

    generator.upsample2_conv3x3 = lambda x, conv: conv(F.interpolate(x, scale_factor=2, mode="nearest"))



# ----------------------------------------------------------------------------------------------
# KD loop: images/s of train_kd against the bare teacher-forward + student-step on one resident batch


class _LegacyLoader:
    """The KD input pipeline before compress/loader.py (per-image safetensors slices, DistributedSampler,
    num_workers=0), kept here only to measure what the new one changed."""

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1, pin_memory=False, **_):
        from torch.utils.data import DistributedSampler

        self.dataset, self.batch = dataset, batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.drop_last = len(self.sampler) > batch_size

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def epoch(self, epoch: int):
        from torch.utils.data import DataLoader

        self.sampler.set_epoch(epoch)
        return iter(DataLoader(self.dataset, batch_size=self.batch, sampler=self.sampler, drop_last=self.drop_last, num_workers=0))


def measure_kd(cfg: dict[str, Any]) -> dict[str, Any]:
    """KD loop images/s (new and legacy loader), loader-only images/s, and the bare step's images/s."""
    import tempfile

    from dfcompress.compress import kd
    from dfcompress.distillation import kd_loss
    from dfcompress.compress.loader import KDLoader
    from dfcompress.data.synthetic import SyntheticSet, write_synthetic_set

    rt = make_runtime(cfg["device"], cfg["amp"], cfg["channels_last"])
    if rt.is_cuda:
        torch.backends.cudnn.benchmark = True
    teacher = build_teacher(cfg["kd_teacher"])
    b, n = cfg["batch"], cfg["kd_images"]

    def student():
        from dfcompress.compress.distill import build_student

        return build_student(cfg["kd_student"], teacher, seed=0)[1]

    conf = kd.KDConfig(batch_size=b, lr=0.01, temperature=4.0, crop_padding=4, flip=True)
    res: dict[str, Any] = {"kind": "kd", "teacher": cfg["kd_teacher"], "student": cfg["kd_student"], "batch": b,
                           "images": n, "variant": cfg["variant"], "device": str(rt.device),
                           "amp_dtype": str(rt.amp_dtype) if rt.amp_dtype else None, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="dfcompress-kdbench-") as tmp:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, *teacher.input_shape), generator=g, dtype=torch.uint8)
        y = torch.arange(n) % teacher.num_classes
        write_synthetic_set(tmp, x, y, torch.zeros(n, teacher.num_classes), teacher, shard_size=cfg["kd_shard"])
        ds = SyntheticSet(tmp)

        def bare() -> float:
            """The same work on one batch already on the device (no loading, augmentation or checkpoint)."""
            s = rt.prepare(student()).train()
            t_mod = rt.prepare(teacher.module).eval()
            opt = kd.make_optimizer(s, conf)
            scaler = rt.grad_scaler()
            xb = rt.tensor(teacher.normalize(x[:b].float().div(255.0).to(rt.device)))

            def step() -> None:
                with rt.autocast():
                    with torch.no_grad():
                        t_logits = t_mod(xb)
                    loss = kd_loss(s(xb), t_logits, conf.temperature)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

            for _ in range(cfg["warmup"]):
                step()
            common.sync(rt.device)
            t0 = time.perf_counter()
            for _ in range(cfg["iters"]):
                step()
            common.sync(rt.device)
            return cfg["iters"] * b / (time.perf_counter() - t0)

        bares = [bare()]  # before and after the KD epochs: the machine's load can drift between them
        for name, loader_cls in (("new", KDLoader), ("legacy", _LegacyLoader)):
            loader = loader_cls(ds, b, 0, pin_memory=rt.is_cuda)
            t0 = time.perf_counter()
            count = sum(len(batch[0]) for batch in loader.epoch(0))
            res[f"loader_{name}_images_per_s"] = round(count / (time.perf_counter() - t0), 1)
            kd.KDLoader = loader_cls  # what train_kd builds
            try:
                kd.train_kd(student(), teacher, ds, conf, rt, Path(tmp) / f"warm-{name}", 1, seed=0)  # warm-up epoch
                out = kd.train_kd(student(), teacher, ds, conf, rt, Path(tmp) / f"ckpt-{name}", 1, seed=1)
            finally:
                kd.KDLoader = KDLoader
            res[f"kd_{name}_images_per_s"] = round(out["steps_per_epoch"] * b / out["seconds"], 1)
        bares.append(bare())
    res["bare_step_images_per_s"] = round(max(bares), 1)  # the faster one: KD / bare errs low, never flatters
    res["bare_runs_images_per_s"] = [round(v, 1) for v in bares]
    res["kd_over_bare"] = round(res["kd_new_images_per_s"] / res["bare_step_images_per_s"], 3)
    res["kd_legacy_over_bare"] = round(res["kd_legacy_images_per_s"] / res["bare_step_images_per_s"], 3)
    res["peak_rss_mib"] = common.peak_rss_mib()
    return res


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(cfg.get("threads"))
    if cfg.get("kind") == "kd":
        return measure_kd(cfg)
    if cfg.get("literal_generator"):
        use_literal_generator()
    rt = make_runtime(cfg["device"], cfg["amp"], cfg["channels_last"])
    if rt.is_cuda:
        torch.backends.cudnn.benchmark = True
    teacher = build_teacher(cfg["teacher"])
    b, k, w = cfg["batch"], cfg["iters"], cfg["warmup"]
    res: dict[str, Any] = {"teacher": cfg["teacher"], "batch": b, "method": cfg["method"], "variant": cfg["variant"],
                           "device": str(rt.device), "amp_dtype": str(rt.amp_dtype) if rt.amp_dtype else None,
                           "channels_last": rt.channels_last, "threads": torch.get_num_threads()}
    m = measure_method(teacher, rt, cfg["method"], b, k, w, parts=bool(cfg.get("breakdown")), profile=cfg.get("profile", 0))
    res.update(m)
    if not cfg.get("profile"):
        it_ms = common.median(m["iterations_ms"])
        pr = m["probes_ms"]
        fwd, fwdbwd = pr["teacher_fwd"], pr["teacher_fwdbwd"]
        irreducible = fwd + fwdbwd if cfg["method"] == "naturalinversion" else fwdbwd
        res.update({"method_ms": round(it_ms, 2), "teacher_fwd_ms": fwd, "teacher_fwdbwd_ms": fwdbwd,
                    "irreducible_ms": round(irreducible, 2), "ratio": round(it_ms / irreducible, 3),
                    "image_iterations_per_s": round(b / (it_ms / 1e3), 1),
                    "images_per_s_at_2k_iterations": round(b / (it_ms / 1e3) / 2000, 4)})
    res["peak_rss_mib"] = common.peak_rss_mib()
    if rt.is_cuda:
        res["peak_cuda_alloc_mib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**20, 1)
    return res


def spawn(cfg: dict[str, Any], timeout: Optional[float]) -> dict[str, Any]:
    """One configuration in a fresh process (its own ru_maxrss), result as the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(cfg)]
    env = dict(os.environ)
    if cfg.get("threads"):
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**cfg, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------
# report


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    lines = [f"# Inversion speed ({data['mode']})", "", f"Machine: {common.machine_line(info)}", "",
             f"Command: `{data['command']}`", ""]
    note = common.load_note(info)
    if note:
        lines += [f"**Note:** {note}.", ""]
    rows = []
    for r in data["runs"]:
        if "error" in r:
            rows.append([r["teacher"], r["batch"], r["method"], r.get("variant"), "error: " + r["error"][:80]] + [None] * 7)
            continue
        rows.append([r["teacher"], r["batch"], r["method"], r["variant"], r.get("method_ms"), r["teacher_fwd_ms"],
                     r["teacher_fwdbwd_ms"], r.get("irreducible_ms"), r.get("ratio"), r.get("image_iterations_per_s"),
                     r.get("images_per_s_at_2k_iterations"), r.get("peak_rss_mib")])
    lines.append(common.md_table(["teacher", "batch", "method", "variant", "ms/iter", "teacher fwd ms", "teacher fwd+bwd ms",
                                  "irreducible ms", "ratio", "image-iter/s", "images/s @2k it", "peak RSS MiB"], rows))
    lines += ["", "irreducible = teacher fwd + fwd/bwd (NaturalInversion: pyramid pass + loss pass) or fwd/bwd (DeepInversion); "
              "ratio = ms/iter ÷ irreducible. Medians over the timed iterations.", ""]
    bd = [r for r in data["runs"] if "generator_fwdbwd" in (r.get("probes_ms") or {})]
    if bd:
        lines += ["## NaturalInversion's parts, each timed on its own between NI iterations (median ms)", ""]
        rows = []
        for r in bd:
            p = r["probes_ms"]
            parts = p["feature_pass"] + p["loss_pass_with_stats"] + p["generator_fwdbwd"] + p["pyramid_fwdbwd"] + p["adam_step"]
            rows.append([r["teacher"], r["batch"], r["variant"], r["method_ms"], p["teacher_fwd"], p["feature_pass"],
                         p["teacher_fwdbwd"], p["loss_pass_with_stats"], p["generator_fwdbwd"], p["pyramid_fwdbwd"],
                         p["adam_step"], round(parts, 1), round(r["method_ms"] - parts, 1)])
        lines.append(common.md_table(["teacher", "batch", "variant", "NI ms/iter", "teacher fwd", "feature pass (fwd + stage hooks)",
                                      "teacher fwd/bwd", "loss pass (fwd/bwd + stats term)", "generator fwd/bwd",
                                      "pyramid fwd/bwd", "Adam step", "sum of parts", "rest (glue)"], rows))
        lines += ["", "rest = NI ms/iter − sum of parts: jitter/flip, clamp, TV/l2, record(), best-image keeping, "
                  "per-iteration allocations.", ""]
    if data.get("kd"):
        lines += ["## KD loop (distill / prune fine-tuning): images/s", ""]
        rows = [[r.get("teacher"), r.get("student"), r.get("batch"), r.get("variant"), r.get("kd_new_images_per_s"),
                 r.get("kd_legacy_images_per_s"), r.get("bare_step_images_per_s"), r.get("kd_over_bare"),
                 r.get("loader_new_images_per_s"), r.get("loader_legacy_images_per_s"), r.get("error")] for r in data["kd"]]
        lines.append(common.md_table(["teacher", "student", "batch", "variant", "KD loop (shard loader)", "KD loop (legacy loader)",
                                      "bare teacher fwd + student step", "KD / bare", "shard loader alone",
                                      "legacy loader alone", "error"], rows))
        lines += ["", "One epoch of train_kd (crop+flip, checkpoint included) after a warm-up epoch; bare = the same "
                  "teacher forward + student step on one batch resident on the device.", ""]
    prof = data.get("profile")
    if prof and "error" not in prof:
        p = prof["profile"]
        lines += [f"## torch.profiler: NaturalInversion, {prof['teacher']} batch {prof['batch']}, {p['iterations']} iterations", "",
                  f"Self CPU time per iteration: {p['self_cpu_ms_per_iteration']} ms.", "",
                  common.md_table(["category", "self CPU ms / iteration"], list(p["categories_ms_per_iteration"].items())), "",
                  *([common.md_table(["named range (inclusive)", "CPU ms / iteration"], list(p["ranges_ms_per_iteration"].items())), ""]
                    if p.get("ranges_ms_per_iteration") else []),
                  "```", p["table"].rstrip(), "```", ""]
        if p.get("cuda_table"):
            lines += ["```", p["cuda_table"].rstrip(), "```", ""]
    elif prof:
        lines += ["## profile", "", f"error: {prof['error']}", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(run_child(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 32, 3 timed iterations, 1 warm-up")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--amp", dest="amp", action="store_true", default=None, help="CUDA autocast (bf16/fp16)")
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--teachers", default=",".join(TEACHERS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; --quick: 32)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per method (default: 5 CPU / 20 CUDA; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 1 CPU / 3 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice = cores)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip timing NaturalInversion's parts")
    ap.add_argument("--profile", action="store_true", help="also profile NaturalInversion with torch.profiler")
    ap.add_argument("--profile-teacher", default="resnet56")
    ap.add_argument("--profile-batch", type=int, default=None, help="default: the first batch size")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--before", action="store_true",
                    help="also time NaturalInversion with table 6's literal Upsample+Conv generator (the state before "
                         "the fused resize-conv), in the same run")
    ap.add_argument("--kd", choices=["on", "off", "only"], default="on",
                    help="also measure the KD loop's images/s against the bare step (only: nothing else)")
    ap.add_argument("--kd-teacher", default="resnet32")
    ap.add_argument("--kd-student", default="resnet20")
    ap.add_argument("--kd-images", type=int, default=None, help="synthetic images in the KD epoch (default 2048; --quick 512)")
    ap.add_argument("--kd-shard", type=int, default=256, help="images per shard of the KD bench set")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per configuration")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--stem", default=None, help="output file stem (default speed, or speed-quick with --quick)")
    args = ap.parse_args(argv)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    batches = [int(v) for v in (args.batches or ("32" if args.quick else "64,256")).split(",")]
    iters = args.iters or (3 if args.quick else (20 if cuda else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 3)
    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    common.set_threads(args.threads)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    info = common.machine_info(device)
    data: dict[str, Any] = {"mode": "quick smoke" if args.quick else "full", "command": " ".join(["bench/speed.py"] + argv),
                            "machine": info, "iters": iters, "warmup": warmup, "runs": []}
    print(f"machine: {common.machine_line(info)}", file=sys.stderr)
    if args.kd == "only":
        teachers = []
    for var in variants(args):
        if args.kd != "off":
            cfg = {"kind": "kd", "kd_teacher": args.kd_teacher, "kd_student": args.kd_student, "batch": batches[0],
                   "kd_images": args.kd_images or (512 if args.quick else 2048), "kd_shard": args.kd_shard,
                   "variant": var["name"], "amp": var["amp"], "channels_last": var["channels_last"],
                   "device": "cuda" if cuda else "cpu", "iters": iters, "warmup": warmup, "threads": args.threads}
            print(f"… KD loop {args.kd_teacher} -> {args.kd_student} batch {batches[0]} [{var['name']}]", file=sys.stderr, flush=True)
            res = spawn(cfg, args.timeout)
            data.setdefault("kd", []).append(res)
            print(f"   {res}", file=sys.stderr, flush=True)
        for teacher in teachers:
            for batch in batches:
                runs = [(m, False) for m in methods]
                if args.before and "naturalinversion" in methods:
                    runs.append(("naturalinversion", True))
                for method, literal in runs:
                    name = var["name"] + (", literal Upsample+Conv generator (before)" if literal else "")
                    cfg = {"teacher": teacher, "batch": batch, "method": method, "variant": name, "amp": var["amp"],
                           "channels_last": var["channels_last"], "device": "cuda" if cuda else "cpu", "iters": iters,
                           "warmup": warmup, "threads": args.threads, "breakdown": args.breakdown,
                           "literal_generator": literal}
                    print(f"… {teacher} batch {batch} {method} [{name}]", file=sys.stderr, flush=True)
                    res = spawn(cfg, args.timeout)
                    data["runs"].append(res)
                    if "error" in res:
                        print(f"   error: {res['error']}", file=sys.stderr)
                    else:
                        print(f"   {res['method_ms']:.1f} ms/iter, teacher fwd {res['teacher_fwd_ms']:.1f} + fwd/bwd "
                              f"{res['teacher_fwdbwd_ms']:.1f} ms, ratio {res['ratio']:.2f}, peak RSS {res['peak_rss_mib']} MiB",
                              file=sys.stderr, flush=True)
    if args.profile:
        var = variants(args)[-1]
        pb = args.profile_batch or batches[0]
        cfg = {"teacher": args.profile_teacher, "batch": pb, "method": "naturalinversion", "variant": var["name"],
               "amp": var["amp"], "channels_last": var["channels_last"], "device": "cuda" if cuda else "cpu",
               "iters": args.profile_iters, "warmup": 1, "threads": args.threads, "profile": args.profile_iters}
        print(f"… profiling NaturalInversion on {args.profile_teacher} batch {pb} [{var['name']}]", file=sys.stderr, flush=True)
        data["profile"] = spawn(cfg, args.timeout)
    data["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    md = markdown(data)
    stem = args.stem or ("speed-quick" if args.quick else "speed")
    jpath, mpath = common.write_results(stem, data, md, args.out)
    print(md)
    print(f"\nwrote {jpath} and {mpath}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
