"""What ptxas says about the Hopper (sm_90a) attention kernels, checked without a GPU wherever nvcc
can compile for sm_90a (CI's CUDA build machine, this VM): every instance of both kernels gets
exactly the 168 registers per thread that their `setmaxnreg` split assumes (the launchers check
this again on the card, where another count would hang), no spills, and no "Potential Performance
Loss" message (C75xx: ptxas serialising wgmma because a register of an in-flight product is
touched, or injecting a warpgroup.arrive). ptxas prints those as `info`, not as warnings, so a
build stays green without this test. And, where a cuobjdump is at hand (the CUDA toolkit's, or
the one the triton wheel ships), that the pipelined forward's softmax sits between its two wgmma
waits in the machine code (its exponentials overlap the P·vᵀ products). See docs/attention.md,
"Hopper kernels"."""

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
    "attention_bwd_sm90.cu": ("attn_bwd_sm90_kernel", 8),  # fp16/bf16 × C 64/128 × atomic/bulk dq
}
REGISTERS = 168  # 65536 / 384 threads, rounded down to ptxas's granule of 8


def _nvcc():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "bin" / "nvcc").exists():
            return str(pathlib.Path(base) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "bin" / "cuobjdump").exists():
            return str(pathlib.Path(base) / "bin" / "cuobjdump")
    try:
        import triton

        shipped = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compiled(source) -> (ptxas's -v report, the object file): each source compiled for sm_90a
    once per test process."""
    done = {}

    def get(source: str):
        if source not in done:
            done[source] = _compile(source, tmp_path_factory.mktemp("sm90") / "kernel.o")
        return done[source]

    return get


def _compile(source: str, obj: pathlib.Path):
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
        str(obj),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "sm_90a" in run.stderr and "not defined" in run.stderr:
        pytest.skip("this nvcc cannot compile for sm_90a")
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout + run.stderr, obj


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
def test_sm90_kernels_registers_spills_and_no_serialisation(source, compiled):
    report, _ = compiled(source)
    kernel, instances = KERNELS[source]
    entries = {k: v for k, v in _entries(report).items() if kernel in k}
    assert len(entries) == instances, sorted(entries)
    for name, lines in entries.items():
        regs = re.search(r"Used (\d+) registers", lines)
        assert regs and int(regs.group(1)) == REGISTERS, (name, lines)
        assert "0 bytes spill stores, 0 bytes spill loads" in lines, (name, lines)
        assert "0 bytes stack frame" in lines, (name, lines)
    assert not re.search(r"C75\d\d", report), [line for line in report.splitlines() if "C75" in line]


@pytest.mark.slow
def test_pipelined_softmax_between_the_waits(compiled):
    """In every pipelined forward instance, the machine code between `wgmma.wait_group 1` (S
    retired) and `wgmma.wait_group 0` (P·vᵀ retired) holds the softmax: its 66 exponentials
    (MUFU.EX2: 64 probabilities, 2 rescale factors) and its 4 shuffles. ptxas 13.0 put the second
    wait before all of them until the kernel's anchor store (docs/attention.md)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("needs cuobjdump")
    _, obj = compiled("attention_fwd_sm90.cu")
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr[-2000:]
    functions = re.split(r"Function : ", sass.stdout)[1:]
    pipelined = [
        f for f in functions if "attn_fwd_sm90_kernel" in f.split("\n")[0] and "Lb1E" in f.split("\n")[0]
    ]
    assert len(pipelined) == 4, [f.split("\n")[0] for f in functions]
    for f in pipelined:
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", f)
        first = next(i for i, op in enumerate(ops) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in op)
        second = next(i for i, op in enumerate(ops) if i > first and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in op)
        between = ops[first + 1 : second]
        ex2 = sum(op.lstrip("@!P0123456789T ").startswith("MUFU.EX2") for op in between)
        shfl = sum("SHFL.BFLY" in op for op in between)
        assert ex2 >= 64 and shfl >= 4, (f.split("\n")[0], ex2, shfl, len(between))
