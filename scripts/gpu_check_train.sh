# Trainer / sampler section of the GPU check: a bash fragment sourced by scripts/gpu_check.sh
# after the project is installed (uses its `step NAME SECONDS CMD...`, $PY and $OUT).
# About 1.5-2 minutes on an H100:
#   train_gpu_tests  CUDA training steps (fp32 / bf16 / fp16 + GradScaler), resume on the GPU,
#                    batch-size-independent sampling with CUDA generators
#   bench_train      `iddpm bench train`: CIFAR-10 config, batch 128, it/s and peak memory,
#                    fp32 / bf16 x use_checkpoint x fused / einsum attention (target: >= 2x the
#                    einsum fp32 it/s)
#   demo_cuda        `iddpm demo` on the GPU: digits samples with the fused step (timed against
#                    the eager step), the loss plot and held-out bits/dim

: "${OUT:?gpu_check_train.sh: set OUT to the output folder}"
step train_gpu_tests 120 "${PY:-python3}" -m pytest -q -rs tests/test_train_gpu.py
step bench_train 180 "${PY:-python3}" -m iddpm_ext.bench train --device cuda --json "$OUT/bench_train.json"
step demo_cuda 120 "${PY:-python3}" -m iddpm_ext demo --device cuda --out "$OUT/demo"
