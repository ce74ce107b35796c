"""The CUDA attention kernels run on the CPU: tests/ops/cuda_emulation/ compiles
csrc/cuda/attention_{fwd,bwd}_kernel.cuh with the host compiler on top of a small warp/block
emulator (mma.sync, ldmatrix, cp.async, shuffles and barriers following the PTX ISA) and checks
every dtype and tile width, and head dims below their tile width (zero-filled channels), against
float64 (see the .cpp's header for what it can and cannot catch); fp32 under each product
precision (fp32 FMAs, TF32, split-TF32). The emulated fp32 → TF32 rounding (cvt.rna.tf32.f32)
is checked against numpy. Needs a C++20 compiler and the CUDA headers (cuda_fp16.h), not a GPU."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from helpers.emulation import build_emulator


@pytest.fixture(scope="module")
def emulation_exe(tmp_path_factory):
    # -Og: compile 7 s + run 5 s here, against 16 s + 3 s at -O1 (same output)
    return build_emulator(
        "attention_emulation.cpp", tmp_path_factory.mktemp("emulation") / "attention_emulation"
    )


@pytest.mark.slow
def test_cuda_kernels_under_host_emulation(emulation_exe):
    exe = emulation_exe
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all passed" in run.stdout
    # Every dtype × tile width (C = Cp) × load path ran, and head dims below their tile width
    # (fp32: "fp32" is the fp32-FMA reference kernel, "tf32" / "tf32x3" the GPU's fp32 paths).
    for dtype in ("fp16", "bf16", "tf32x3"):
        for c in (32, 64, 128, 256):
            assert f"{dtype} C={c} " in run.stdout
    for c, cp in ((8, 32), (24, 32), (48, 64), (80, 128), (96, 128), (160, 256), (192, 256)):
        assert f" C={c} (Cp={cp}) " in run.stdout
    for dtype in ("fp16", "bf16", "tf32", "tf32x3"):
        assert f"{dtype} C=160 (Cp=256)" in run.stdout or f"{dtype} C=192 (Cp=256)" in run.stdout
    assert "tf32 C=32 B=1 H=1 T=136 cp.async" in run.stdout  # TF32 rounding of pipelined stages
    assert "cp.async" in run.stdout and "guarded" in run.stdout and "unaligned" in run.stdout
    assert "(Cp=256) B=1 H=1 T=80 guarded unaligned" in run.stdout
    # fp32 under TF32 and split-TF32 at C = 32, 64, 128 and 48, 96 (below their tiles), masked
    # (T = 37) and whole (T = 64) tiles; split-TF32 compared with the fp32-FMA kernel at Cp = 64.
    assert "tf32 mma error 0.00e+00" in run.stdout
    for c, t in ((32, 37), (64, 64), (48, 37), (128, 37), (96, 64)):
        for prec in ("tf32", "tf32x3"):
            assert f"{prec} C={c} " in run.stdout and f" B=1 H=2 T={t} " in run.stdout
    for c, t in ((64, 64), (48, 37)):
        assert f"tf32x3 vs fp32 (kFma) C={c} T={t} " in run.stdout
    assert "tf32 C=160 (Cp=256)" in run.stdout


def _tf32_reference(x: np.ndarray) -> np.ndarray:
    """fp32 → TF32 by the rule, in float64 arithmetic: round to nearest, ties away from zero, to 10
    mantissa bits (an ulp of 2^(e-10) for |x| in [2^e, 2^(e+1)), e >= -126; fp32's subnormal
    range keeps the ulp of e = -126); inf and NaN unchanged; overflow to ±inf."""
    with np.errstate(invalid="ignore"):  # signalling NaNs among the patterns
        x64 = x.astype(np.float64)
    finite = np.isfinite(x64)
    mag = np.abs(np.where(finite, x64, 0.0))
    _, exp = np.frexp(mag)  # mag = m · 2^exp, m in [0.5, 1)
    e = np.maximum(exp - 1, -126)
    ulp = np.ldexp(1.0, e - 10)
    rounded = np.floor(mag / ulp + 0.5) * ulp  # mag / ulp is exact; + 0.5 ties away from zero
    with np.errstate(over="ignore"):
        out = np.copysign(rounded, x64).astype(np.float32)
    return np.where(finite, out, x)


@pytest.mark.slow
def test_tf32_rounding_emulation_matches_the_rule(emulation_exe, tmp_path):
    rng = np.random.default_rng(5)
    bits = [rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)]
    # ties (exactly half an ulp dropped), just below and above them, both signs; subnormals;
    # the largest finite values (which round to infinity); zeros, infinities, NaN.
    mant = rng.integers(0, 2**10, size=200, dtype=np.uint32) << 13
    expo = rng.integers(0, 255, size=200, dtype=np.uint32) << 23
    for low in (0x1000, 0x0FFF, 0x1001, 0x1FFF, 0x0001):
        for sign in (0, 0x80000000):
            bits.append((mant | expo | low | sign).astype(np.uint32))
    bits.append(
        np.array(
            [
                0,
                0x80000000,
                0x00001000,
                0x00000FFF,
                0x007FF000,
                0x007FFFFF,
                0x7F7FFFFF,
                0x7F7FF000,
                0x7F7FEFFF,
                0xFF7FFFFF,
                0x7F800000,
                0xFF800000,
                0x3F800FFF,
                0x3F801000,
            ],
            dtype=np.uint32,
        )
    )
    x = np.concatenate(bits).view(np.float32)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    x.tofile(src)
    run = subprocess.run(
        [str(emulation_exe), "--tf32-round", str(src), str(dst)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    got = np.fromfile(dst, dtype=np.uint32)
    want = _tf32_reference(x).view(np.uint32)
    assert got.shape == want.shape
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(x.view(np.uint32)[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
    assert np.all(got[np.isfinite(x)] & 0x1FFF == 0)  # every finite result is TF32
    assert np.isinf(got.view(np.float32)[x.view(np.uint32) == 0x7F7FFFFF]).all()
