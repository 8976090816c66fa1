#!/usr/bin/env bash
# Set up .venv with dfcompress and its dependencies, without pulling CUDA builds of torch on a CPU machine.
#
# torch is installed first and then pinned with a pip constraint while everything else installs:
# packages that depend on torch (torch-pruning, ...) would otherwise let pip pick the newest torch,
# which on Linux means GBs of CUDA wheels. On a machine with an NVIDIA driver the default (CUDA)
# torch is installed instead, and `DFCOMPRESS_EXTRAS=test,gpu` adds onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${DFCOMPRESS_EXTRAS:-test}
TORCH_SPEC=${DFCOMPRESS_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install torch                              # GPU machine: the regular CUDA build
  else
    pip install "$TORCH_SPEC" || pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/python -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > .venv/torch-constraint.txt
pip install -c .venv/torch-constraint.txt -e ".[${EXTRAS}]"
.venv/bin/python - <<'PY'
import importlib.metadata as md
names = {d.metadata["Name"].lower() for d in md.distributions()}
if {"onnxruntime", "onnxruntime-gpu"} <= names:
    print("warning: both onnxruntime and onnxruntime-gpu are installed; they share the import name 'onnxruntime' "
          "and the last one installed wins. Keep one: pip uninstall onnxruntime (GPU) or onnxruntime-gpu (CPU).")
PY
echo "dfcompress ready: .venv/bin/dfcompress ($(cat .venv/torch-constraint.txt))"
