# scripts/gpu_check_attention.sh — the fused QKV attention's part of scripts/gpu_check.sh, which
# sources it (uses its `step` and `log` helpers, $PY and $OUT). About 3 minutes on an H100:
#  1. the GPU tests of the attention op (tests/test_attention_gpu.py): forward and backward of
#     fp32/fp16/bf16, head dims 32/64/128, T in {1, 63, 64, 257, 1000, 4096}, against a float64
#     reference with the 2x-of-eager-error rule; lse; unaligned storage (guarded loads);
#     determinism of the forward and of dk/dv; CUDA-graph capture; errors; torch.compile;
#  2. compute-sanitizer memcheck (caching allocator off, so out-of-bounds accesses reach the
#     sanitizer) and racecheck (shared-memory hazards) over the small `sanitizer_subset` cases:
#     both load paths (cp.async and guarded), partial tiles, both backward tilings;
#  3. `iddpm bench attention` on the card, JSON in $OUT/bench_attention.json.
step pytest_gpu_attention 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_attention_gpu.py

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  step memcheck_attention 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 1 --target-processes all \
    $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/test_attention_gpu.py -k sanitizer_subset
  step racecheck_attention 180 "$SANITIZER" --tool racecheck \
    --error-exitcode 1 --target-processes all \
    $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/test_attention_gpu.py \
    -k "sanitizer_subset and not bfloat16"
else
  log "compute-sanitizer not found: memcheck_attention and racecheck_attention skipped"
  echo "memcheck_attention skipped" >>"$OUT/status.txt"
  echo "racecheck_attention skipped" >>"$OUT/status.txt"
fi

step bench_attention 240 $PY -m iddpm_ext.bench attention --device cuda --json "$OUT/bench_attention.json"
