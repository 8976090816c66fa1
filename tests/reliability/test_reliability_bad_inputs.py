"""Guarantee 2: bad input never crashes. Every case below goes through the real CLI and must end with
exit code 2, exactly ONE stderr line that names the problem and what to do, no traceback, and nothing
half-written left behind (the working folder and the inputs are byte-for-byte as before)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from reliability_helpers import (TINY_SYNTH, assert_one_line_error, diff_snapshots, invoke, run_cli, snapshot)


@dataclass
class Ctx:
    m: Path            # read-only materials
    tmp: Path          # the working folder (cwd)
    tiny_set: Path
    corrupted_set: Path


def _foreign(ctx: Ctx, name: str = "busy") -> Path:
    d = ctx.tmp / name
    d.mkdir()
    (d / "notes.txt").write_text("someone else's work")
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _existing_file(ctx: Ctx, name: str) -> Path:
    f = ctx.tmp / name
    f.write_text("precious")
    return f


# id -> ctx -> (argv, needles that the one error line must contain)
CASES: dict[str, Callable[[Ctx], tuple[list, list[str]]]] = {
    # -- the model file itself
    "missing-file": lambda c: (["inspect", c.tmp / "nope.pt"], ["does not exist", "check the path"]),
    "directory-instead-of-file": lambda c: (["inspect", c.m / "not_a_set"], ["folder without dfcompress.json"]),
    "empty-file": lambda c: (["inspect", c.m / "empty.pt"], ["empty (0 bytes)", "re-download"]),
    "truncated-pt": lambda c: (["synthesize", c.m / "truncated.pt", "--arch", "digits_cnn", "-o", "out", *TINY_SYNTH],
                               ["truncated or corrupted", "re-download"]),
    "truncated-onnx": lambda c: (["inspect", c.m / "truncated.onnx"], ["truncated or corrupted"]),
    "random-bytes.pt": lambda c: (["inspect", c.m / "random.pt"], ["not a recognised model file"]),
    "random-bytes.pth": lambda c: (["inspect", c.m / "random.pth", "--arch", "digits_cnn"], ["not a recognised model file"]),
    "random-bytes.onnx": lambda c: (["inspect", c.m / "random.onnx"], ["not a recognised model file"]),
    "random-bytes.pt2": lambda c: (["inspect", c.m / "random.pt2"], ["not a recognised model file"]),
    "random-bytes.safetensors": lambda c: (["inspect", c.m / "random.safetensors"], ["not a recognised model file"]),
    "random-bytes.bin": lambda c: (["synthesize", c.m / "random.bin", "-o", "out", *TINY_SYNTH], ["not a recognised model file"]),
    "onnx-unsupported-op-topk": lambda c: (["inspect", c.m / "topk.onnx"], ["'TopK'", "not supported"]),
    "onnx-unsupported-op-nms": lambda c: (["synthesize", c.m / "nms.onnx", "-o", "out", *TINY_SYNTH], ["NonMaxSuppression"]),
    "onnx-two-inputs": lambda c: (["inspect", c.m / "two_inputs.onnx"], ["2 inputs", "exactly one image input"]),
    "onnx-external-data-outside-folder": lambda c: (["inspect", c.m / "traversal.onnx"], ["should be file inside"]),
    "folder-descriptor-escapes": lambda c: (["inspect", c.m / "escape"], ["points outside its folder", "refusing"]),
    "not-a-classifier-torchscript": lambda c: (["inspect", c.m / "conv_only.torchscript.pt", "--input-shape", "3x8x8"],
                                               ["not a classifier", "[2, 4, 8, 8]"]),
    "not-a-classifier-onnx": lambda c: (["synthesize", c.m / "conv_only.onnx", "-o", "out", *TINY_SYNTH],
                                        ["not a classifier", "expected logits [N, num_classes]"]),
    "state-dict-without-arch": lambda c: (["inspect", c.m / "digits_sd.pt"], ["pass --arch"]),
    "state-dict-wrong-arch": lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "resnet20"],
                                        ["does not fit architecture 'resnet20'", "missing key", "unexpected key", "check --arch"]),
    "unknown-arch": lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "digits_cnnn"], ["did you mean 'digits_cnn'"]),
    "nan-weights-state-dict": lambda c: (["synthesize", c.m / "nan_weights.pt", "--arch", "digits_cnn", "-o", "out", *TINY_SYNTH],
                                         ["NaN/inf values in its weights", "fc.weight"]),
    "nan-weights-onnx": lambda c: (["synthesize", c.m / "nan_weight.onnx", "-o", "out", *TINY_SYNTH], ["NaN/inf"]),
    "inf-logits-finite-weights": lambda c: (["inspect", c.m / "inf_logits.pt", "--arch", "digits_cnn"], ["NaN/inf logits"]),
    # -- preprocessing and shapes
    "mean-std-wrong-length": lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "digits_cnn", "--mean", "0.4,0.4,0.4",
                                         "--std", "0.2,0.2,0.2"], ["need 1 value(s) each", "one per input channel"]),
    "mean-wrong-length-embedded": lambda c: (["synthesize", "--mean", "0.485,0.456,0.406", "-o", "out", *TINY_SYNTH],
                                             ["need 1 value(s) each"]),
    "std-zero": lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "digits_cnn", "--mean", "0.5", "--std", "0"],
                           ["--std values must be positive"]),
    "mean-not-a-number": lambda c: (["inspect", "--mean", "zero"], ["comma-separated numbers"]),
    "mean-nan": lambda c: (["inspect", "--mean", "nan"], ["finite numbers"]),
    "input-shape-malformed": lambda c: (["inspect", "--input-shape", "3x32"], ["CxHxW such as 3x32x32"]),
    "input-shape-zero": lambda c: (["inspect", "--input-shape", "0x8x8"], ["CxHxW"]),
    "input-shape-wrong-channels": lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "digits_cnn", "--input-shape", "3x8x8"],
                                             ["first convolution", "takes 1", "fix --input-shape"]),
    "input-shape-vs-embedded": lambda c: (["synthesize", "--input-shape", "3x32x32", "-o", "out", *TINY_SYNTH],
                                          ["does not match the embedded digits teacher"]),
    # -- real image inputs
    "rgb-eval-data-for-1ch-teacher": lambda c: (["distill", "--data", c.tiny_set, "--eval-data", c.m / "rgb.npz", "-o", "out",
                                                 "--profile", "ci-smoke", "--student", "wrn_16_1"],
                                                ["takes 1-channel input", "3-channel images"]),
    "rgb-seeds-for-1ch-teacher": lambda c: (["stats", "--seeds", c.m / "rgb.npz", "-o", "cc.safetensors"], ["1-channel"]),
    "npz-without-x-y": lambda c: (["stats", "--seeds", c.m / "no_xy.npz", "-o", "cc.safetensors"], ["'x'", "'y'", "found ['images']"]),
    "npz-float-pixels": lambda c: (["eval", "--data", c.m / "float_x.npz", "--no-latency"], ["must be uint8"]),
    "labels-outside-classes": lambda c: (["eval", "--data", c.m / "labels_20.npz", "--no-latency"],
                                         ["labels 0..19", "10 classes"]),
    "seeds-folder-without-images": lambda c: (["stats", "--seeds", c.m / "no_images", "-o", "cc.safetensors"], ["holds no images"]),
    "seeds-folder-broken-image": lambda c: (["stats", "--data", c.m / "bad_image", "-o", "cc.safetensors"],
                                            ["cannot read image", "broken.png"]),
    "seeds-and-data-together": lambda c: (["stats", "--seeds", c.m / "rgb.npz", "--data", c.m / "rgb.npz", "-o", "x.safetensors"],
                                          ["either --data or --seeds"]),
    # -- numbers and names
    "unknown-student": lambda c: (["distill", "--student", "resnt18", "--data", c.tiny_set, "-o", "out"], ["did you mean 'resnet18'"]),
    "ratio-zero": lambda c: (["prune", "--ratio", "0", "--data", c.tiny_set, "-o", "out"], ["prune.ratio", "must be > 0.0"]),
    "ratio-one": lambda c: (["prune", "--ratio", "1", "--data", c.tiny_set, "-o", "out"], ["must be < 1.0"]),
    "ratio-negative": lambda c: (["prune", "--ratio", "-0.5", "--data", c.tiny_set, "-o", "out"], ["must be > 0.0"]),
    "num-images-zero": lambda c: (["synthesize", *TINY_SYNTH, "-n", "0", "-o", "out"], ["num_images", "must be >= 1"]),
    "num-images-negative": lambda c: (["synthesize", *TINY_SYNTH, "-n", "-4", "-o", "out"], ["must be >= 1"]),
    "batch-larger-than-n": lambda c: (["synthesize", "--profile", "ci-smoke", "-n", "8", "--batch-size", "16", "-o", "out"],
                                      ["--batch-size 16 is larger than -n 8"]),
    "epochs-zero": lambda c: (["distill", "--epochs", "0", "--data", c.tiny_set, "-o", "out"], ["distill.epochs", ">= 1"]),
    "max-drop-negative": lambda c: (["distill", "--max-drop", "-1", "--data", c.tiny_set, "-o", "out", "--profile", "ci-smoke",
                                     "--student", "wrn_16_1"], ["--max-drop must be a non-negative"]),
    "limit-zero": lambda c: (["eval", "--limit", "0"], ["--limit must be >= 1"]),
    "unknown-method": lambda c: (["synthesize", *TINY_SYNTH, "--method", "deepinverson", "-o", "out"], ["did you mean 'deepinversion'"]),
    # -- profiles
    "unknown-profile-name": lambda c: (["synthesize", "--profile", "cifar-10", "-o", "out"], ["did you mean 'cifar10'"]),
    "profile-file-missing": lambda c: (["synthesize", "--profile", c.tmp / "mine.yaml", "-o", "out"], ["not found"]),
    "profile-unknown-key": lambda c: (["synthesize", "--profile", c.m / "bad_key.yaml", "-o", "out"],
                                      ["unknown key 'synthesize.iteratons'", "did you mean 'iterations'"]),
    "profile-wrong-type-list": lambda c: (["synthesize", "--profile", c.m / "bad_type.yaml", "-o", "out"], ["expected int, got list"]),
    "profile-wrong-type-float": lambda c: (["distill", "--profile", c.m / "bad_float.yaml", "--data", c.tiny_set, "-o", "out"],
                                           ["distill.epochs: expected int, got float 1.5"]),
    "profile-malformed-yaml": lambda c: (["synthesize", "--profile", c.m / "malformed.yaml", "-o", "out"], ["not valid YAML", "line 2"]),
    "profile-not-a-mapping": lambda c: (["synthesize", "--profile", c.m / "list.yaml", "-o", "out"], ["must be a YAML mapping"]),
    # -- synthetic sets and statistics
    # --data takes synthetic sets, image folders and .npz files (issue 14): a folder of neither says what it wants
    "data-not-a-synthetic-set": lambda c: (["distill", "--data", c.m / "not_a_set", "-o", "out"], ["holds no images", "one sub-folder of images per class"]),
    "data-missing": lambda c: (["prune", "--data", c.tmp / "nowhere", "-o", "out"], ["not found", "synthetic set folder, an image folder or an .npz"]),
    "data-corrupted-shard": lambda c: (["distill", "--data", c.corrupted_set, "-o", "out", "--profile", "ci-smoke",
                                        "--student", "wrn_16_1"], ["shard-00001.safetensors is corrupted", "re-run"]),
    "stats-file-missing": lambda c: (["synthesize", "--stats", c.tmp / "cc.safetensors", "-o", "out", *TINY_SYNTH],
                                     ["statistics file", "not found"]),
    # -- outputs
    "output-under-a-file": lambda c: (["synthesize", "-o", c.m / "somefile.txt" / "out", *TINY_SYNTH],
                                      ["somefile.txt is a file, not a folder", "-o"]),
    "output-in-proc": lambda c: (["synthesize", "-o", "/proc/dfcompress-reliability/out", *TINY_SYNTH], ["cannot write"]),
    "export-under-a-file": lambda c: (["export", "-o", c.m / "somefile.txt" / "model.onnx"], ["is a file, not a folder"]),
    "output-is-a-file": lambda c: (["synthesize", "-o", _existing_file(c, "taken"), *TINY_SYNTH], ["exists and is a file"]),
    "synthesize-into-foreign-folder": lambda c: (["synthesize", "-o", _foreign(c), *TINY_SYNTH], ["not empty", "--overwrite"]),
    "distill-into-foreign-folder": lambda c: (["distill", "--data", c.tiny_set, "-o", _foreign(c)], ["--overwrite"]),
    "distill-into-a-synthetic-set": lambda c: (["distill", "--data", c.tiny_set, "-o", _copy(c.tiny_set, c.tmp / "set")],
                                               ["holds files this command did not write", "--overwrite"]),
    "prune-into-foreign-folder": lambda c: (["prune", "--data", c.tiny_set, "-o", _foreign(c)], ["--overwrite"]),
    "quantize-output-exists": lambda c: (["quantize", "--data", c.tiny_set, "-o", _foreign(c)], ["not empty", "--overwrite"]),
    "stats-output-exists": lambda c: (["stats", "-o", _existing_file(c, "bn.safetensors")], ["exists", "--overwrite"]),
    "export-output-exists": lambda c: (["export", "-o", _existing_file(c, "model.onnx")], ["exists", "--overwrite"]),
    "export-output-is-folder": lambda c: (["export", "-o", _foreign(c)], ["is a folder", "give a file name"]),
    # -- devices
    "device-unknown": lambda c: (["synthesize", "--device", "tpu", "-o", "out", *TINY_SYNTH], ["use auto, cpu or cuda"]),
    "device-cuda-without-gpu": lambda c: (["synthesize", "--device", "cuda", "-o", "out", *TINY_SYNTH],
                                          ["--device cuda", "no CUDA GPU", "--device cpu"]),
}

NEEDS_NO_GPU = {"device-cuda-without-gpu"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case: str, materials, tiny_set, corrupted_set, in_tmp) -> None:
    if case in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    ctx = Ctx(m=materials, tmp=in_tmp, tiny_set=tiny_set, corrupted_set=corrupted_set)
    args, needles = CASES[case](ctx)
    watched = (in_tmp, materials, tiny_set, corrupted_set)
    before = snapshot(*watched)
    res = invoke(args)
    assert_one_line_error(args, res, needles)
    assert diff_snapshots(before, snapshot(*watched)) == [], f"{case} left files behind or changed inputs"


def test_the_matrix_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_failed_command_removes_only_what_it_created(materials, tiny_set, in_tmp) -> None:
    """-o a/b/c with bad input: a, b and c go again; a folder that existed before stays."""
    (in_tmp / "keep").mkdir()
    args = ["distill", "--data", tiny_set, "--eval-data", materials / "rgb.npz", "-o", "keep/a/b/c"]
    res = invoke(args)
    assert_one_line_error(args, res, ["1-channel"])
    assert (in_tmp / "keep").is_dir() and list((in_tmp / "keep").iterdir()) == []


def test_resumable_commands_re_enter_their_own_folder(tiny_set, in_tmp) -> None:
    """The refusal above is not blanket: synthesize re-entering its own finished folder resumes (exit 0)."""
    args = ["synthesize", "-o", "set", *TINY_SYNTH]
    assert invoke(args).exit_code == 0
    again = invoke(args)
    assert again.exit_code == 0, again.stderr
    assert "resuming" in again.stderr and "2 of 2 shards already finished" in again.stderr
    # --overwrite replaces a foreign folder instead of refusing
    (in_tmp / "busy").mkdir()
    (in_tmp / "busy" / "notes.txt").write_text("x")
    res = invoke(["synthesize", "-o", "busy", "--overwrite", *TINY_SYNTH])
    assert res.exit_code == 0 and not (in_tmp / "busy" / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------
# the same contract seen from a shell: a real process, its exact exit status and stderr

SUBPROCESS_CASES = {
    "missing-file": (lambda m, t: ["inspect", t / "nope.onnx"], "error: model file {t}/nope.onnx does not exist; check the path"),
    "wrong-arch": (lambda m, t: ["inspect", m / "digits_sd.pt", "--arch", "resnet20"], None),
    "profile-unknown-key": (lambda m, t: ["synthesize", "--profile", m / "bad_key.yaml", "-o", "out"],
                            "error: profile {m}/bad_key.yaml: unknown key 'synthesize.iteratons'; did you mean 'iterations'?"),
    "output-under-a-file": (lambda m, t: ["synthesize", "-o", m / "somefile.txt" / "out", *TINY_SYNTH],
                            "error: cannot write {m}/somefile.txt/out: {m}/somefile.txt is a file, not a folder; "
                            "choose another output path with -o"),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_in_a_real_process(case: str, materials, tmp_path) -> None:
    build, expected = SUBPROCESS_CASES[case]
    args = build(materials, tmp_path)
    before = snapshot(tmp_path, materials)
    res = run_cli(args, cwd=tmp_path)
    line = assert_one_line_error(args, res)
    assert res.stderr == line + "\n", "stderr must be exactly one line"
    assert res.stdout == ""
    if expected is not None:
        assert line == expected.format(m=materials, t=tmp_path)
    assert diff_snapshots(before, snapshot(tmp_path, materials)) == []


def test_usage_errors_are_exit_2_too(tmp_path) -> None:
    """typer's own parsing errors (a non-number for -n) keep exit code 2, name the option, print no traceback
    and create nothing (their text is typer's usage panel, not our one-line format)."""
    res = run_cli(["synthesize", "-n", "many", "-o", "out"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--num-images" in res.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# cases that were open gaps when this suite was written (each fixed since; kept as regular cases)

FIXED_ISSUES = {
    # dfcompress/models/loading.py logs "no input normalisation recorded" before checking --mean/--std
    "loading-logs-before-mean-error": (
        lambda c: (["inspect", c.m / "digits_sd.pt", "--arch", "digits_cnn", "--mean", "0.1,0.2"], ["one per input channel"]),
        "models/loading.py: _preprocessing logs the 'no input normalisation recorded' line before check_preprocessing fails"),
    # dfcompress/compress/quantize.py logs its calibration split before the synthetic set is verified
    "quantize-logs-before-corrupted-set-error": (
        lambda c: (["quantize", "--data", c.corrupted_set, "-o", "q"], ["is corrupted"]),
        "compress/quantize.py logs 'calibrating on N of M synthetic images' before reading the (corrupted) set"),
    # dfcompress/models/formats/probe.py: a feature-map model without --input-shape is blamed on the input size
    "conv-only-torchscript-without-input-shape": (
        lambda c: (["inspect", c.m / "conv_only.torchscript.pt"], ["not a classifier"]),
        "models/formats/probe.py: resolve_input_shape says 'accepted none of the probed input sizes' for a non-classifier"),
    # dfcompress/models/formats/onnx_file.py: external data outside the model folder is reported as file damage
    "onnx-external-data-reported-as-damage": (
        lambda c: (["inspect", c.m / "traversal.onnx"], ["outside"]),
        "models/formats/onnx_file.py: read_onnx wraps onnx's path-traversal refusal in 'truncated or corrupted; re-download'"),
}


@pytest.mark.parametrize("case", sorted(FIXED_ISSUES))
def test_formerly_known_issue(case: str, materials, tiny_set, corrupted_set, in_tmp) -> None:
    build, _reason = FIXED_ISSUES[case]
    ctx = Ctx(m=materials, tmp=in_tmp, tiny_set=tiny_set, corrupted_set=corrupted_set)
    args, needles = build(ctx)
    res = invoke(args)
    line = assert_one_line_error(args, res, needles)
    assert "truncated or corrupted" not in line
