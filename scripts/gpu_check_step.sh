# scripts/gpu_check_step.sh — the fused reverse-diffusion step's part of scripts/gpu_check.sh,
# which sources it (uses its `step` and `log` helpers, $PY and $OUT). About 2–3 minutes on an H100:
#  1. the GPU tests of the step ops (parity with eager CUDA and the CPU kernel, both CUDA kernels,
#     Philox noise from the CUDA generator, graph capture, noise statistics, one launch per step);
#  2. compute-sanitizer memcheck over a subset (both kernels in fp32 and fp16, every rule and
#     variance type, in-kernel noise, bad arguments, out-of-range t), with torch's caching
#     allocator off so that out-of-bounds accesses reach the sanitizer (graph capture needs the
#     allocator: that test runs in step 1 only);
#  3. `iddpm bench step` on the card, JSON in $OUT/bench_step.json.
step pytest_gpu_step 180 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_step_gpu.py

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  step memcheck_step 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 1 --target-processes all \
    $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/test_step_gpu.py \
    -k "(kernel_paths and (float32-float32 or float16-float16)) or (matches_eager_and_cpu and EPSILON) or philox or argument_errors or out_of_range"
else
  log "compute-sanitizer not found: memcheck_step skipped"
  echo "memcheck_step skipped" >>"$OUT/status.txt"
fi

step bench_step 180 $PY -m iddpm_ext.bench step --device cuda --json "$OUT/bench_step.json"
