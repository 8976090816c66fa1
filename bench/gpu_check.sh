#!/usr/bin/env bash
# One prepared GPU check for a bare machine with an NVIDIA GPU, in at most 8 minutes:
#   setup -> device tests on CUDA -> demo --device cuda -> speed --quick (fp32, AMP + channels_last, KD loop)
#   -> quality --budget tiny. Each step is time-boxed and the next runs even when one fails; logs and
#   results land in bench/results/gpu-check/ (and are copied to $OUT when that is set); a summary table ends it.
#
# Setup works offline when torch with CUDA is already installed system-wide: a venv with
# --system-site-packages, `pip install --no-deps -e .`, then only what is missing (pip may fail offline;
# the check goes on with what is there). Without a CUDA torch it falls back to scripts/setup.sh.
#
#   bash bench/gpu_check.sh            # run it
#   bash bench/gpu_check.sh --dry-run  # print the steps and their time limits, run nothing
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RES=bench/results/gpu-check
PY=${PYTHON:-python3}
VENV=.venv-gpu
NAMES=(); LIMITS=(); RCS=(); SECS=()

# name, seconds, command...
step() {
  local name=$1 limit=$2; shift 2
  if [ $DRY = 1 ]; then printf '%-10s %4ss  %s\n' "$name" "$limit" "$*"; return 0; fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  NAMES+=("$name"); LIMITS+=("$limit"); RCS+=("$rc"); SECS+=($((SECONDS - t0)))
  tail -n 5 "$RES/$name.log"
}

setup() {
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    [ -x $VENV/bin/python ] || "$PY" -m venv --system-site-packages $VENV || return 1
    $VENV/bin/python -m pip install -q --no-deps --no-build-isolation -e . || return 1
    missing=$($VENV/bin/python - <<'PY'
import importlib.util as u
need = {"typer": "typer", "rich": "rich", "safetensors": "safetensors", "torch_pruning": "torch-pruning", "onnx": "onnx",
        "onnxruntime": "onnxruntime-gpu", "yaml": "pyyaml", "PIL": "pillow", "numpy": "numpy", "pytest": "pytest",
        "sklearn": "scikit-learn", "onnxscript": "onnxscript"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))
PY
)
    if [ -n "$missing" ]; then
      echo "installing missing: $missing"
      $VENV/bin/python -m pip install -q $missing || echo "warning: could not install $missing (offline?); going on"
    fi
  else
    DFCOMPRESS_EXTRAS=test,gpu bash scripts/setup.sh || return 1
    ln -sfn .venv $VENV
  fi
  $VENV/bin/python -c "import torch, dfcompress; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
}

[ "${1:-}" = "--setup" ] && { setup; exit $?; }  # the setup step, run by `step` under timeout

[ $DRY = 1 ] || { mkdir -p "$RES"; nvidia-smi > "$RES/nvidia-smi.txt" 2>&1; }
export PYTHONUNBUFFERED=1
P=$VENV/bin/python
step setup    120 bash "$SELF" --setup
step tests     60 $P -m pytest -q -m device tests/ -p no:cacheprovider
step demo      90 $P -m dfcompress demo --device cuda -o "$RES/demo" --overwrite
step speed    120 $P bench/speed.py --device cuda --quick --out "$RES" --kd-images 4096 --timeout 100
step quality   90 $P bench/quality.py --budget tiny --device cuda --out "$RES"
[ $DRY = 1 ] && exit 0

{
  printf '| step | limit s | took s | exit | result |\n|---|---|---|---|---|\n'
  for i in "${!NAMES[@]}"; do
    case ${RCS[$i]} in 0) r=ok ;; 124|137) r="timed out" ;; *) r=failed ;; esac
    printf '| %s | %s | %s | %s | %s |\n' "${NAMES[$i]}" "${LIMITS[$i]}" "${SECS[$i]}" "${RCS[$i]}" "$r"
  done
} | tee "$RES/summary.md"
if [ -n "${OUT:-}" ]; then  # at most 8 files come back from the device machine: one archive plus the headlines
  tar czf "$OUT/gpu-check.tgz" -C bench/results gpu-check 2>/dev/null
  cp "$RES/summary.md" "$OUT/" 2>/dev/null
  cp "$RES"/speed-quick.md "$RES"/*.md "$OUT/" 2>/dev/null
fi
