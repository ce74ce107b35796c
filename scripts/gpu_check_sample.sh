# scripts/gpu_check_sample.sh — the sampling engine's part of scripts/gpu_check.sh, which sources
# it (uses its `step` and `log` helpers, $PY and $OUT). About 1.5–2 minutes on an H100:
#  1. tests/test_engine_gpu.py: the CUDA-graph step against the non-graph loop with the same
#     seed (fp32 within 1e-5: ancestral, DDIM eta 0 / 0.5, respaced, class-conditional,
#     channels-last, user generators, the CIFAR-10 model), bf16 by the 2x-error rule, capture
#     caching and memory report, compile mode (aot_eager), launches per replayed step;
#  2. `iddpm bench sample` on the card with the trimmed case list (iddpm_ext/bench/sample.py):
#     50 steps at B in {1, 16, 256} for the reference-style loop, our eager loop and the CUDA
#     graph in fp32 and bf16; 250 steps at B = 1 for reference vs graph in bf16; torch.compile
#     (inductor) once, at B = 1 bf16, last. JSON in $OUT/bench_sample.json, rewritten after each
#     case so a run cut by the time limit keeps what it measured. The whole grid (all four
#     impls, both dtypes, B in {1, 16, 256} x {50, 250} steps) is `--full` (several minutes,
#     mostly inductor builds and the 250-step reference loops at B = 256).
step pytest_gpu_engine 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py
step bench_sample 150 $PY -m iddpm_ext.bench sample --device cuda --json "$OUT/bench_sample.json"
