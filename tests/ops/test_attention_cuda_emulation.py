"""The CUDA attention kernels run on the CPU: tests/ops/cuda_emulation/ compiles
csrc/cuda/attention_{fwd,bwd}_kernel.cuh with the host compiler on top of a small warp/block
emulator (mma.sync, ldmatrix, cp.async, shuffles and barriers following the PTX ISA) and checks
every dtype and tile width, and head dims below their tile width (zero-filled channels), against
float64 (see the .cpp's header for what it can and cannot catch). Needs a C++20 compiler and
the CUDA headers (cuda_fp16.h), not a GPU."""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = pathlib.Path(__file__).resolve().parent / "cuda_emulation" / "attention_emulation.cpp"


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "include" / "cuda_fp16.h").exists():
            return pathlib.Path(base) / "include"
    return None


@pytest.mark.slow
def test_cuda_kernels_under_host_emulation(tmp_path):
    inc = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if inc is None or cxx is None or platform.system() != "Linux":
        pytest.skip("needs the CUDA headers (cuda_fp16.h), a C++ compiler and Linux (ucontext)")
    exe = tmp_path / "attention_emulation"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-Wno-unknown-pragmas",
        "-Wno-class-memaccess",
        "-U_FORTIFY_SOURCE",  # its longjmp check refuses the jumps between coroutine stacks
        f"-I{ROOT / 'csrc'}",
        f"-I{inc}",
        str(SRC),
        "-o",
        str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all passed" in run.stdout
    # Every dtype × tile width (C = Cp) × load path ran, and head dims below their tile width.
    for dtype in ("fp16", "bf16", "fp32"):
        for c in (32, 64, 128, 256):
            assert f"{dtype} C={c} " in run.stdout
    for c, cp in ((8, 32), (24, 32), (48, 64), (80, 128), (96, 128), (160, 256), (192, 256)):
        assert f" C={c} (Cp={cp}) " in run.stdout
    for dtype in ("fp16", "bf16", "fp32"):
        assert f"{dtype} C=160 (Cp=256)" in run.stdout or f"{dtype} C=192 (Cp=256)" in run.stdout
    assert "cp.async" in run.stdout and "guarded" in run.stdout and "unaligned" in run.stdout
    assert "(Cp=256) B=1 H=1 T=80 guarded unaligned" in run.stdout
