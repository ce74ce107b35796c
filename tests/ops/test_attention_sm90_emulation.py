"""The Hopper (sm_90a) attention forward and backward run on the CPU: tests/ops/cuda_emulation/
compiles csrc/cuda/attention_{fwd,bwd}_sm90.cuh with the host compiler on top of sm90_emulator.h
(wgmma with shared-memory descriptors and 128-byte swizzle, its fence / commit / wait, mbarriers with
transaction counts, TMA tensor copies, fence.proxy.async, written from the PTX ISA) and checks the
emulator against the ISA's worked examples and hand-written layouts, then the kernel against
float64 (fp16 / bf16, head dims 64 and 128, masked and whole key tiles, the TMA and the cp.async /
guarded producers; the forward's plain and pipelined consumers; the backward's dq, dk, dv after the
sm_90a forward). The kernels have not run
on a card yet: this is all the checking they get without one. Needs a C++20 compiler and the CUDA
headers, not a GPU."""

from __future__ import annotations

import subprocess

import pytest

from helpers.emulation import build_emulator


@pytest.fixture(scope="module")
def sm90_exe(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emulation_sm90") / "attention_sm90_emulation"
    # -Wno-attributes: __grid_constant__ on the host
    return build_emulator("attention_sm90_emulation.cpp", exe, extra_flags=("-Wno-attributes",))


@pytest.mark.slow
def test_sm90_forward_under_host_emulation(sm90_exe):
    run = subprocess.run([str(sm90_exe)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all passed" in run.stdout
    # The emulator against the ISA: swizzle table, the five worked canonical-layout examples,
    # descriptor fields, mbarrier phases, wgmma on hand-written layouts (exact).
    assert "unit: swizzle patterns ok" in run.stdout
    for name in ("K none tf32", "K 32B tf32", "MN none bf16", "MN 32B bf16", "MN 64B bf16"):
        assert f"unit: canonical layout {name}" in run.stdout
    assert "unit: descriptor fields ok" in run.stdout
    assert "unit: mbarrier phases ok" in run.stdout
    assert "unit: wgmma ss (M/N-major) error 0.0, rs (K-major) error 0.0" in run.stdout
    assert "unit: named barriers (ping-pong order) ok" in run.stdout
    assert "unit: TMA reduction (swizzled box, bounds) ok" in run.stdout
    # The kernel: both dtypes and head dims, masked (37, 200) and whole (128, 1024) key tiles,
    # B, H > 1, cp.async and guarded loads, unaligned storage.
    for dtype in ("fp16", "bf16"):
        for c in (64, 128):
            assert f"sm90 {dtype} C={c} " in run.stdout
    for t in (37, 200, 128, 1024):
        assert f" T={t} " in run.stdout
    # Both producers: TMA (tensor map, expect_tx / complete_tx) and cp.async, each over several
    # rounds of both stages; guarded loads for odd T and unaligned storage.
    assert "B=1 H=2 T=37 guarded" in run.stdout and "B=2 H=2 T=128 tma" in run.stdout
    assert "C=128 B=1 H=1 T=200 tma" in run.stdout and "C=128 B=1 H=1 T=200 cp.async" in run.stdout
    assert "T=1024 tma" in run.stdout and "T=384 cp.async" in run.stdout
    assert "sm90 fp16 C=64 B=1 H=2 T=300 guarded" in run.stdout  # heads × query tiles in the grid
    assert "guarded unaligned" in run.stdout
    # The pipelined consumers: both dtypes and head dims, one tile, two, and more tiles than
    # stages (several rounds of each stage), both producers, unaligned storage.
    piped = [line for line in run.stdout.splitlines() if line.startswith("sm90 pipelined")]
    for dtype in ("fp16", "bf16"):
        for c in (64, 128):
            assert any(f"{dtype} C={c} " in line for line in piped), (dtype, c)
    for case in (
        "T=37 guarded",
        "T=640 tma",
        "C=128 B=1 H=1 T=512 cp.async",
        "T=2048 tma",
        "T=1536 cp.async",
        "guarded unaligned",
    ):
        assert any(case in line for line in piped), case
    # The backward after the sm_90a forward: both dtypes and head dims, one partial key tile
    # (T = 37), two key tiles and several query tiles over both stages (T = 200, 256, 320), the
    # TMA, cp.async and guarded producers, unaligned storage.
    for dtype in ("fp16", "bf16"):
        for c in (64, 128):
            assert f"sm90 bwd {dtype} C={c} " in run.stdout
    bwd_lines = [line for line in run.stdout.splitlines() if line.startswith("sm90 bwd")]
    for case in (
        "T=37 guarded",
        "C=128 B=1 H=1 T=200 tma",
        "C=128 B=1 H=1 T=200 cp.async",
        "B=2 H=2 T=256 tma",
        "T=320 cp.async",
        "T=128 guarded unaligned",
    ):
        assert any(case in line for line in bwd_lines), case
    # dq by TMA reductions (bulk dq): both dtypes and head dims, partial query and key tiles
    # (T = 200, 132), several heads, buffers reused (T = 320, 384), both producers, unaligned qkv;
    # T = 37 (T % 4 != 0) takes the atomics.
    bulk = [line for line in bwd_lines if line.startswith("sm90 bwd bulk-dq")]
    for case in (
        "fp16 C=64 B=1 H=1 T=200 tma",
        "bf16 C=64 B=2 H=2 T=256 tma",
        "fp16 C=64 B=1 H=1 T=320 cp.async",
        "fp16 C=128 B=1 H=1 T=200 tma",
        "bf16 C=128 B=1 H=2 T=384 cp.async",
        "fp16 C=128 B=1 H=1 T=132 guarded unaligned",
    ):
        assert any(case in line for line in bulk), case
    assert not any(" T=37 " in line for line in bulk)


@pytest.mark.slow
@pytest.mark.parametrize(
    "misuse, message",
    [
        ("base-offset", "base offset != 0 is not emulated"),
        ("no-fence", "without wgmma.fence"),
        ("unwaited", "wgmma never waited for"),
        ("no-proxy-fence", "without fence.proxy.async"),
        ("no-store-fence", "has not executed fence.proxy.async"),
        ("acc-in-flight", "accumulator registers written while a wgmma on them was in flight"),
        ("a-regs-in-flight", "A registers written while the wgmma reading them was in flight"),
        ("write-after-fence", "registers written between wgmma.fence and a wgmma that accesses them"),
        ("pingpong-no-start", "deadlock"),
        ("reduce-unfenced", "TMA reduction reads shared memory stored by a thread that has not"),
        ("reduce-overwritten", "st.shared to the source of a TMA reduction that its issuing thread"),
        ("reduce-unwaited", "TMA reduction still in flight at the block's end"),
    ],
)
def test_sm90_emulator_refuses_misuse(sm90_exe, misuse, message):
    run = subprocess.run([str(sm90_exe), "--refuse", misuse], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stdout + run.stderr
    assert message in run.stderr
    assert "not refused" not in run.stdout
