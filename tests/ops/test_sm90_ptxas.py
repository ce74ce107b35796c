"""What ptxas says about the Hopper (sm_90a) attention kernels, checked without a GPU wherever nvcc
can compile for sm_90a (CI's CUDA build machine, this VM): every instance of both kernels gets
exactly the 168 registers per thread that their `setmaxnreg` split assumes (the launchers check
this again on the card, where another count would hang), no spills, and no "Potential Performance
Loss" message (C75xx: ptxas serialising wgmma because a register of an in-flight product is
touched, or injecting a warpgroup.arrive). ptxas prints those as `info`, not as warnings, so a
build stays green without this test. See docs/attention.md, "Hopper kernels"."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = {
    "attention_fwd_sm90.cu": ("attn_fwd_sm90_kernel", 8),  # fp16/bf16 × C 64/128 × plain/pipelined
    "attention_bwd_sm90.cu": ("attn_bwd_sm90_kernel", 4),  # fp16/bf16 × C 64/128
}
REGISTERS = 168  # 65536 / 384 threads, rounded down to ptxas's granule of 8


def _nvcc():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "bin" / "nvcc").exists():
            return str(pathlib.Path(base) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _ptxas_report(source: str, tmp_path) -> str:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    cmd = [
        nvcc,
        "-std=c++17",
        f"-I{ROOT / 'csrc'}",
        "--expt-relaxed-constexpr",
        "-O3",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-Xptxas",
        "-v",
        "-c",
        str(ROOT / "csrc" / "cuda" / source),
        "-o",
        str(tmp_path / "kernel.o"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "sm_90a" in run.stderr and "not defined" in run.stderr:
        pytest.skip("this nvcc cannot compile for sm_90a")
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout + run.stderr


def _entries(report: str) -> dict[str, str]:
    """Each compiled entry function's lines of the report, by mangled name."""
    entries, name = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            entries[name] = ""
        elif name is not None:
            entries[name] += line + "\n"
    return entries


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_sm90_kernels_registers_spills_and_no_serialisation(source, tmp_path):
    report = _ptxas_report(source, tmp_path)
    kernel, instances = KERNELS[source]
    entries = {k: v for k, v in _entries(report).items() if kernel in k}
    assert len(entries) == instances, sorted(entries)
    for name, lines in entries.items():
        regs = re.search(r"Used (\d+) registers", lines)
        assert regs and int(regs.group(1)) == REGISTERS, (name, lines)
        assert "0 bytes spill stores, 0 bytes spill loads" in lines, (name, lines)
        assert "0 bytes stack frame" in lines, (name, lines)
    assert not re.search(r"C75\d\d", report), [line for line in report.splitlines() if "C75" in line]
