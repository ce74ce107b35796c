"""Building the CUDA-kernel host emulators (tests/ops/cuda_emulation/*.cpp): the kernels' .cuh
files compiled by the host C++ compiler on top of a warp/block emulator. Needs the CUDA headers
(cuda_fp16.h), a C++20 compiler and Linux (the emulator's threads are ucontext coroutines)."""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMULATION = ROOT / "tests" / "ops" / "cuda_emulation"


def cuda_include():
    """The CUDA toolkit's include folder (CUDA_HOME, CUDA_PATH or /usr/local/cuda), or None."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "include" / "cuda_fp16.h").exists():
            return pathlib.Path(base) / "include"
    return None


def build_emulator(source: str, exe: pathlib.Path, extra_flags=()) -> pathlib.Path:
    """Compile tests/ops/cuda_emulation/``source`` into ``exe`` (-Og: the fastest compile + run
    here); skips the calling test where the toolchain is missing, fails it on a compile error."""
    inc = cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if inc is None or cxx is None or platform.system() != "Linux":
        pytest.skip("needs the CUDA headers (cuda_fp16.h), a C++ compiler and Linux (ucontext)")
    cmd = [
        cxx,
        "-std=c++20",
        "-Og",
        "-Wno-unknown-pragmas",
        "-Wno-class-memaccess",
        *extra_flags,
        "-U_FORTIFY_SOURCE",  # its longjmp check refuses the jumps between coroutine stacks
        f"-I{ROOT / 'csrc'}",
        f"-I{inc}",
        str(EMULATION / source),
        "-o",
        str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe
