#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (device tool `run`), from the repo root:
#     bash scripts/gpu_check.sh          # logs and JSON under $OUT (default ./out/gpu_check)
#
# 1. installs the project offline, building only for this card's architecture;
# 2. runs every GPU-marked test (kernels first: gather, step, attention; then engine, UNet,
#    trainer), the benchmarks (step, attention, sample, then unet, train) and the
#    compute-sanitizer passes (memcheck over the step and attention subsets, racecheck over
#    the attention subset);
# 3. writes env.json (card, torch, CUDA, cuDNN, build facts), status.txt (one line per step:
#    name and exit code, or "skipped"), summary.txt and one .log per step.
#
# The whole script has a deadline (GPU_CHECK_BUDGET seconds, default 450 = 7.5 minutes, so a
# rerun still fits in a task's device time): each step runs under `timeout` with what is left,
# and steps that no longer fit are recorded as skipped. Steps run in the order below (most
# important first). GPU_CHECK_ONLY="name name ..." runs only those steps (install and env
# always run), e.g. to finish what a first run skipped:
#     GPU_CHECK_ONLY="memcheck_step memcheck_attention racecheck_attention bench_unet bench_train" \
#         bash scripts/gpu_check.sh
# All steps add up to far more than one lease (15 minutes of device time per task, all calls
# together): GPU_CHECK_PLAN names the steps an open issue needs, most important first. Their
# limits add up to more than the default budget, so a run does the first ones and records the
# rest as skipped; a second run with GPU_CHECK_ONLY (status.txt lists them) finishes them:
#     GPU_CHECK_PLAN=issue13  attention: its GPU tests and op-safety fuzz (the head-dim crash),
#                             the sm_90a tests, the attention benchmarks, the sanitizers on attention
#     GPU_CHECK_PLAN=issue12  the UNet: model tests, bench sample, the fused GroupNorm's bench and
#                             its tests under memcheck, bench unet / train, then the
#                             compiled-reference comparisons (these two may need a run of their own)
# The reference model for the benchmarks' side-by-side rows: IDDPM_REF_PATH, else .ref/ in the
# tree when it holds improved_diffusion/ (ignored by git; device tool: carry [".ref"]), e.g.
#     git -C <mirror of openai/improved-diffusion> archive HEAD improved_diffusion | tar -x -C .ref
# Through the device tool (a few files come back: tar the logs), e.g.
#     OUT=/tmp/gc GPU_CHECK_PLAN=issue13 bash scripts/gpu_check.sh; tar -czf $OUT/gpu_check.tgz -C /tmp/gc .;
#     cp /tmp/gc/status.txt /tmp/gc/summary.txt /tmp/gc/*.json $OUT/
set -u
cd "$(dirname "$0")/.."
case "${GPU_CHECK_PLAN:-}" in
  "") ;;
  issue12 | issue13)
    if [ -n "${GPU_CHECK_ONLY:-}" ]; then
      echo "GPU_CHECK_PLAN and GPU_CHECK_ONLY: expected one of them, got both" >&2
      exit 2
    fi ;;&
  issue13) GPU_CHECK_ONLY="tests_kernels tests_sm90 bench_attention bench_attention_fp32 bench_attention_sm90
    memcheck_attention racecheck_attention memcheck_sm90 racecheck_sm90" ;;
  issue12) GPU_CHECK_ONLY="tests_models bench_sample bench_group_norm memcheck_group_norm bench_unet
    bench_train bench_unet_compiled bench_train_compiled" ;;
  *) echo "GPU_CHECK_PLAN: expected issue12 or issue13, got ${GPU_CHECK_PLAN}" >&2; exit 2 ;;
esac
# The step names, one space around each ("  ": every step); split without globbing.
read -r -a ONLY_STEPS <<<"$(printf '%s' "${GPU_CHECK_ONLY:-}" | tr '\n\t' '  ')"
ONLY=" ${ONLY_STEPS[*]:-} "
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-450}"
DEADLINE=$((START + BUDGET))
if [ -z "${IDDPM_REF_PATH:-}" ] && [ -d .ref/improved_diffusion ]; then
  export IDDPM_REF_PATH="$PWD/.ref"
fi

log() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME SECONDS CMD...: run CMD with min(SECONDS, time left) as its limit, output to
# $OUT/NAME.log, and record the exit code in status.txt (124/137: timed out).
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$ONLY" != "  " ] && [ "$name" != install ] && [[ "$ONLY" != *" $name "* ]]; then
    return 0
  fi
  local left=$((DEADLINE - $(date +%s) - 5))
  if [ "$left" -lt 20 ]; then
    log "skip  $name (deadline)"
    echo "$name skipped" >>"$OUT/status.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end   $name rc=$rc"
  echo "$name $rc" >>"$OUT/status.txt"
  return 0
}

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# Under the sanitizers torch's caching allocator is off, so out-of-bounds accesses reach them.
SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --error-exitcode 1 --target-processes all)
PYTEST=($PY -m pytest -m gpu -p no:cacheprovider -rfEs)

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" IDDPM_EXT_CUDA=1
log "card arch $ARCH, budget ${BUDGET}s"

step install 240 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
$PY - >"$OUT/env.json" 2>>"$OUT/summary.txt" <<'PYEOF'
import json, torch, iddpm_ext
from iddpm_ext.ops.attention import cuda_device_support
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "build": iddpm_ext.build_info(),
    "fused_attention": cuda_device_support(0),
}, indent=1))
PYEOF

# -- GPU tests: the kernels (parity with eager / float64 references, the 2x-of-eager-error rule
#    for fp16/bf16, in-kernel Philox noise statistics, CUDA-graph capture, one launch per step,
#    odd T and T = 4096 attention, errors; the op-safety fuzz and head-dim crash regression), then the engine, the UNet and the trainer.
step tests_kernels 240 "${PYTEST[@]}" -v tests/ops/test_build.py tests/ops/test_gather_coefs.py \
  tests/ops/test_step_gpu.py tests/ops/test_attention_gpu.py tests/ops/test_op_safety_gpu.py \
  tests/ops/test_group_norm_act_gpu.py
step tests_models 150 "${PYTEST[@]}" -v tests/engine/test_engine_gpu.py tests/model/test_unet_gpu.py \
  tests/training/test_train_gpu.py tests/model/test_unet_export.py

# -- benchmarks of the kernels and the sampling loop (JSON under $OUT, rewritten after every case,
#    so a step cut by its limit keeps what it measured; each case is also a line in its .log).
#    bench step: per-call rows (host us, kernels per call; against improved-diffusion's own
#    p_sample when IDDPM_REF_PATH names a checkout on the machine) and the kernel rows.
#    bench sample --quick: 10 steps, B 1 and 16, reference / eager / graph (about 12 runs; with a
#    checkout also reference-code: the reference's own p_sample_loop, 4 more runs).
step bench_step 90 $PY -m iddpm_ext.bench step --device cuda --json "$OUT/bench_step.json"
step bench_attention 90 $PY -m iddpm_ext.bench attention --device cuda --dtype float16,bfloat16 \
  --json "$OUT/bench_attention.json"
#    bench attention in fp32: TF32 off (ours: split-TF32; einsum: cuBLAS fp32) and on (both on
#    TF32 tensor cores), at the CIFAR-10 model's 16×16 map, the issue's 32×4×64×1024 and the
#    FlashAttention paper's point (issue 13's target: fp32 with TF32 >= 2x einsum with TF32).
step bench_attention_fp32 60 $PY -m iddpm_ext.bench attention --device cuda --dtype float32,float32+tf32 \
  --cases 64x4x64x256,32x4x64x1024,16x32x64x1024 --json "$OUT/bench_attention_fp32.json"
#    the Hopper (sm_90a) attention forward and backward (issue 13 item 4; never run on a card
#    before): their GPU tests (against float64 and the sm_80 kernels, that they run only when
#    asked; the forward's plain and pipelined consumers, the backward's atomic and bulk dq), then
#    bench rows at the issue's shapes, "iddpm (fused, sm90)", "iddpm (fused, sm90 pipelined)" and
#    (fwd+bwd) "iddpm (fused, sm90 bulk dq)" beside "iddpm (fused)" and SDPA / cuDNN, forward and
#    forward+backward (the issue's >= 300 and >= 200 TFLOP/s).
step tests_sm90 120 "${PYTEST[@]}" -v tests/ops/test_attention_sm90_gpu.py
step bench_attention_sm90 90 $PY -m iddpm_ext.bench attention --device cuda --dtype float16 \
  --passes fwd,fwd+bwd --cases 16x32x64x1024,16x32x64x4096,16x16x128x1024,16x16x128x4096 \
  --json "$OUT/bench_attention_sm90.json"
step bench_sample 60 $PY -m iddpm_ext.bench sample --device cuda --quick --json "$OUT/bench_sample.json"
#    the fused GroupNorm + scale-shift + SiLU on CUDA (never timed on a card; "auto" picks it only
#    on the CPU until this shows it beats torch's group_norm + scale-shift + SiLU there).
step bench_group_norm 45 $PY -m iddpm_ext.bench group_norm --device cuda --warmup 3 --iters 20 \
  --json "$OUT/bench_group_norm.json"

# -- sanitizers over small subsets (the kernels' paths: both step kernels in fp32/fp16, every
#    rule and variance type, in-kernel noise, bad arguments, out-of-range t; attention's two
#    load paths, partial tiles, both backward tilings and a head dim below its tile width on the
#    Cp = 256 kernels, C = 192; fp32 in split-TF32 and, sanitizer_subset_tf32, in TF32; the sm_90a
#    forward's and backward's guarded, TMA and unaligned cp.async paths (never run on a card before: racecheck sees
#    shared-memory hazards of the mbarrier protocol, not of the TMA/wgmma async proxy); the
#    group-norm kernels forward and backward).
if [ -x "$SANITIZER" ]; then
  step memcheck_step 60 "${SANITIZE[@]}" --tool memcheck "${PYTEST[@]}" -q -x tests/ops/test_step_gpu.py \
    -k "(kernel_paths and (float32-float32 or float16-float16)) or (matches_eager_and_cpu and EPSILON) or philox or argument_errors or out_of_range"
  step memcheck_attention 90 "${SANITIZE[@]}" --tool memcheck "${PYTEST[@]}" -q -x tests/ops/test_attention_gpu.py \
    -k sanitizer_subset
  step racecheck_attention 90 "${SANITIZE[@]}" --tool racecheck "${PYTEST[@]}" -q -x tests/ops/test_attention_gpu.py \
    -k "sanitizer_subset and not bfloat16"
  step memcheck_sm90 45 "${SANITIZE[@]}" --tool memcheck "${PYTEST[@]}" -q -x \
    tests/ops/test_attention_sm90_gpu.py -k sanitizer_subset
  step racecheck_sm90 60 "${SANITIZE[@]}" --tool racecheck "${PYTEST[@]}" -q -x \
    tests/ops/test_attention_sm90_gpu.py -k sanitizer_subset
  step memcheck_group_norm 45 "${SANITIZE[@]}" --tool memcheck "${PYTEST[@]}" -q -x \
    tests/ops/test_group_norm_act_gpu.py -k "backward_f32 or low_precision"
  step racecheck_group_norm 45 "${SANITIZE[@]}" --tool racecheck "${PYTEST[@]}" -q -x \
    tests/ops/test_group_norm_act_gpu.py -k "backward_f32"
else
  log "compute-sanitizer not found: sanitizer steps skipped"
  echo "sanitizers skipped" >>"$OUT/status.txt"
fi

# -- model-level benchmarks (unet: the CIFAR-10 model at batch 128, 1 warm-up and 5 timed runs
#    per case; its default 5 + 20 did not finish in 55 s on an H100).
step bench_unet 60 $PY -m iddpm_ext.bench unet --device cuda --warmup 1 --iters 5 --json "$OUT/bench_unet.json"
# train: the CIFAR-10 model at batch 128, our 10 cases and the reference model eager (fp32, bf16),
#    each with its time per kind of work (--breakdown: one more, profiled step per case).
step bench_train 90 $PY -m iddpm_ext.bench train --device cuda --breakdown --json "$OUT/bench_train.json"
# -- issue 12's sampling comparison: the forward at B = 1 and 64 with the reference also under
#    torch.compile(mode="max-autotune") (minutes of autotuning: last, and alone if it must be:
#    GPU_CHECK_ONLY=bench_unet_compiled GPU_CHECK_BUDGET=420).
step bench_unet_compiled 240 $PY -m iddpm_ext.bench unet --device cuda --forward-only --batch-sizes 1,64 \
  --warmup 2 --iters 10 --compile-reference max-autotune --json "$OUT/bench_unet_compiled.json"
# -- issue 12's training comparison: TrainLoop(compile="default") for ours and the reference model
#    (IDDPM_REF_PATH) eager and compiled, fp32 and bf16 at B = 128 (after the 12 plain cases;
#    alone: GPU_CHECK_ONLY=bench_train_compiled GPU_CHECK_BUDGET=420).
step bench_train_compiled 240 $PY -m iddpm_ext.bench train --device cuda --warmup 2 --iters 5 \
  --compile default --json "$OUT/bench_train_compiled.json"

log "done in $(($(date +%s) - START))s"
cat "$OUT/status.txt"
