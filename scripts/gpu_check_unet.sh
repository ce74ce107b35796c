# UNet section of the GPU check: a bash fragment, sourced by scripts/gpu_check.sh after the
# project is installed on the GPU machine. Needs $OUT (output folder); uses $PY if set.
# About 1-2 minutes on an H100: the GPU-marked UNet tests (bf16/fp16 autocast vs fp32 on the
# CIFAR-10 configuration, fused vs einsum attention, use_checkpoint memory) and
# `iddpm bench unet` (CIFAR-10 config, batch 128). Sets unet_tests_rc and unet_bench_rc;
# does not exit, so the caller decides what a failure means.

: "${OUT:?gpu_check_unet.sh: set OUT to the output folder}"
_unet_py="${PY:-python3}"
mkdir -p "$OUT"

echo "== unet: GPU tests (tests/test_unet_gpu.py)"
timeout 150 "$_unet_py" -m pytest -q -rs -s tests/test_unet_gpu.py 2>&1 | tee "$OUT/unet_gpu_tests.log"
unet_tests_rc=${PIPESTATUS[0]}
echo "== unet: GPU tests exit status $unet_tests_rc"

echo "== unet: iddpm bench unet --device cuda"
timeout 240 "$_unet_py" -m iddpm_ext.bench unet --device cuda --json "$OUT/bench_unet.json" 2>&1 \
    | tee "$OUT/bench_unet.log"
unet_bench_rc=${PIPESTATUS[0]}
echo "== unet: benchmark exit status $unet_bench_rc"
unset _unet_py
