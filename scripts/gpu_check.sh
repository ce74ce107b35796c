#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (device tool `run`), from the repo root:
#     bash scripts/gpu_check.sh            # logs and JSON under $OUT (default ./out/gpu_check)
# 1. installs the project offline, building only for this card's architecture;
# 2. runs the GPU-marked tests, compute-sanitizer passes and the benchmarks of each kernel
#    (sections in scripts/gpu_check_*.sh, sourced below);
# 3. writes env.json (card, torch, CUDA, cuDNN, build facts), status.txt (one line per step
#    with its exit code), summary.txt and one .log per step.
# Every step runs under `timeout`; the whole script stays under 8 minutes on an H100.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)

log() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME SECONDS CMD...: run CMD with a time limit, output to $OUT/NAME.log, record the code.
step() {
  local name=$1 limit=$2
  shift 2
  log "start $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end   $name rc=$rc"
  echo "$name $rc" >>"$OUT/status.txt"
  return 0
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" IDDPM_EXT_CUDA=1
log "card arch $ARCH"

step install 300 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
$PY - >"$OUT/env.json" 2>>"$OUT/summary.txt" <<'PYEOF'
import json, torch, iddpm_ext
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "build": iddpm_ext.build_info(),
}, indent=1))
PYEOF

step pytest_gpu_core 120 $PY -m pytest -m gpu -v tests/test_gather_op.py tests/test_build.py
step bench_gather 60 $PY -m iddpm_ext.bench gather --device cuda --json "$OUT/bench_gather.json"

for section in scripts/gpu_check_*.sh; do
  [ -f "$section" ] || continue
  log "section $section"
  # shellcheck disable=SC1090
  source "$section"
done

log "done in $(($(date +%s) - START))s"
cat "$OUT/status.txt"
