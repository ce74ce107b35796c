"""The switches and build facts of the opt-in CUDA attention paths, on any machine. The Hopper
(sm_90a) kernels: reported by build_info(), never chosen for CPU tensors, their process-wide switch
(initially IDDPM_ATTENTION_SM90=1 from the environment) set and restored by attention_sm90; their
numerics are tested under the CPU emulator (test_attention_sm90_emulation.py) and on a card
(test_attention_sm90_gpu.py). The sm_80 kernels' tile-major launch order: its switch
(attention_tile_major) is its own and changes nothing on the CPU; on a card,
test_attention_gpu.py. The sm_90a forward's pipelined consumers: their switch
(attention_sm90_pipelined) likewise, and the sm_90a backward's bulk dq reductions
(attention_sm90_bulk_dq); numerics under the emulator and on a card."""

from __future__ import annotations

import os

import pytest
import torch

import iddpm_ext
from iddpm_ext.ops import attention as A
from iddpm_ext.ops import loader

pytestmark = pytest.mark.skipif(not loader.available(), reason="needs iddpm_ext._C")


def test_build_info_reports_the_sm90_kernel():
    info = iddpm_ext.build_info()
    assert isinstance(info["attention_sm90"], bool)
    if not info["cuda"]:
        assert info["attention_sm90"] is False
    assert A.sm90_built() == info["attention_sm90"]


def test_sm90_never_for_cpu_or_other_dtypes():
    qkv = torch.zeros(1, 3 * 2 * 64, 16, dtype=torch.float16)
    assert not A.sm90_supported(qkv, 2)
    assert not A.sm90_supported(qkv.float(), 2)


def test_attention_sm90_sets_and_restores_the_switch():
    start = A.sm90_enabled()
    with A.attention_sm90():
        assert A.sm90_enabled() is True
        with A.attention_sm90(False):
            assert A.sm90_enabled() is False
        assert A.sm90_enabled() is True
    assert A.sm90_enabled() is start
    with A.attention_sm90(False):
        assert A.sm90_enabled() is False
        with A.attention_sm90():
            assert A.sm90_enabled() is True
    assert A.sm90_enabled() is start


def _switch_values_in_a_new_process(code: str, var: str, value):
    """The last two words `code` prints in a new Python process whose environment has `var` =
    `value` (None: unset) and no other switch variable."""
    import subprocess
    import sys

    switches = (A.SM90_ENV, A.TILE_MAJOR_ENV, A.SM90_PIPELINED_ENV, A.SM90_BULK_DQ_ENV)
    env = {k: v for k, v in os.environ.items() if k not in switches}
    if value is not None:
        env[var] = value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-2:]


def test_the_switch_starts_from_the_environment():
    """IDDPM_ATTENTION_SM90=1 in the environment turns the switch on in a new process; os.environ
    writes afterwards change nothing (the op no longer reads the environment at each call)."""
    code = (
        "import os; from iddpm_ext.ops import attention as A; a = A.sm90_enabled(); "
        "os.environ['IDDPM_ATTENTION_SM90'] = '0' if a else '1'; print(a, A.sm90_enabled())"
    )
    for value, expected in (("1", "True True"), ("0", "False False"), (None, "False False")):
        assert _switch_values_in_a_new_process(code, A.SM90_ENV, value) == expected.split(), value


def test_the_tile_major_switch_starts_from_the_environment():
    """IDDPM_ATTENTION_TILE_MAJOR=1 in the environment turns that switch on in a new process (and
    only that one)."""
    code = "from iddpm_ext.ops import attention as A; print(A.tile_major_enabled(), A.sm90_enabled())"
    for value, expected in (("1", "True False"), ("0", "False False"), (None, "False False")):
        assert _switch_values_in_a_new_process(code, A.TILE_MAJOR_ENV, value) == expected.split(), value


def test_the_pipelined_switch_starts_from_the_environment():
    """IDDPM_ATTENTION_SM90_PIPELINED=1 turns that switch on in a new process, and not the sm_90a
    switch itself."""
    code = "from iddpm_ext.ops import attention as A; print(A.sm90_pipelined_enabled(), A.sm90_enabled())"
    for value, expected in (("1", "True False"), ("0", "False False"), (None, "False False")):
        assert _switch_values_in_a_new_process(code, A.SM90_PIPELINED_ENV, value) == expected.split(), value


def test_attention_sm90_pipelined_sets_and_restores_the_switch():
    start, sm90, tile = A.sm90_pipelined_enabled(), A.sm90_enabled(), A.tile_major_enabled()
    with A.attention_sm90_pipelined():
        assert A.sm90_pipelined_enabled() is True
        assert A.sm90_enabled() is sm90 and A.tile_major_enabled() is tile  # each switch is its own
        with A.attention_sm90_pipelined(False):
            assert A.sm90_pipelined_enabled() is False
        assert A.sm90_pipelined_enabled() is True
    with A.attention_sm90(not sm90):
        assert A.sm90_pipelined_enabled() is start
    assert A.sm90_pipelined_enabled() is start


def test_the_pipelined_switch_changes_nothing_on_cpu():
    qkv = torch.randn(1, 3 * 2 * 64, 40, dtype=torch.bfloat16)
    out = A.qkv_attention_fused(qkv, 2)
    with A.attention_sm90(), A.attention_sm90_pipelined():
        assert torch.equal(A.qkv_attention_fused_sm90(qkv, 2), out)


def test_the_bulk_dq_switch_starts_from_the_environment():
    """IDDPM_ATTENTION_SM90_BULK_DQ=1 turns that switch on in a new process, and neither the sm_90a
    switch nor the pipelined one."""
    code = (
        "from iddpm_ext.ops import attention as A; "
        "print(A.sm90_pipelined_enabled() or A.sm90_enabled(), A.sm90_bulk_dq_enabled())"
    )
    for value, expected in (("1", "False True"), ("0", "False False"), (None, "False False")):
        assert _switch_values_in_a_new_process(code, A.SM90_BULK_DQ_ENV, value) == expected.split(), value


def test_attention_sm90_bulk_dq_sets_and_restores_the_switch():
    start = A.sm90_bulk_dq_enabled()
    others = A.sm90_enabled(), A.tile_major_enabled(), A.sm90_pipelined_enabled()
    with A.attention_sm90_bulk_dq():
        assert A.sm90_bulk_dq_enabled() is True
        assert (A.sm90_enabled(), A.tile_major_enabled(), A.sm90_pipelined_enabled()) == others
        with A.attention_sm90_bulk_dq(False):
            assert A.sm90_bulk_dq_enabled() is False
        assert A.sm90_bulk_dq_enabled() is True
    with A.attention_sm90(not others[0]), A.attention_sm90_pipelined(not others[2]):
        assert A.sm90_bulk_dq_enabled() is start
    assert A.sm90_bulk_dq_enabled() is start


def test_the_bulk_dq_switch_changes_nothing_on_cpu():
    qkv = torch.randn(1, 3 * 2 * 64, 40, dtype=torch.bfloat16)
    g = torch.randn(1, 2 * 64, 40, dtype=torch.bfloat16)
    out, lse = A.qkv_attention_with_lse(qkv, 2)
    grad = A.qkv_attention_backward(g, qkv, out, lse, 2)
    with A.attention_sm90(), A.attention_sm90_bulk_dq():
        assert torch.equal(A.qkv_attention_backward(g, qkv, out, lse, 2), grad)


def test_the_switch_changes_nothing_on_cpu():
    qkv = torch.randn(1, 3 * 2 * 64, 40, dtype=torch.float16)
    out = A.qkv_attention_fused(qkv, 2)
    with A.attention_sm90():
        assert torch.equal(A.qkv_attention_fused_sm90(qkv, 2), out)


def test_the_switch_changes_nothing_on_cpu_backward():
    qkv = torch.randn(1, 3 * 2 * 64, 40, dtype=torch.float16)
    g = torch.randn(1, 2 * 64, 40, dtype=torch.float16)
    out, lse = A.qkv_attention_with_lse(qkv, 2)
    grad = A.qkv_attention_backward(g, qkv, out, lse, 2)
    with A.attention_sm90():
        assert torch.equal(A.qkv_attention_backward(g, qkv, out, lse, 2), grad)


def test_attention_tile_major_sets_and_restores_the_switch():
    start, sm90 = A.tile_major_enabled(), A.sm90_enabled()
    with A.attention_tile_major():
        assert A.tile_major_enabled() is True
        assert A.sm90_enabled() is sm90  # each switch is its own
        with A.attention_tile_major(False):
            assert A.tile_major_enabled() is False
        assert A.tile_major_enabled() is True
    with A.attention_sm90(not sm90):
        assert A.tile_major_enabled() is start
    assert A.tile_major_enabled() is start and A.sm90_enabled() is sm90


def test_tile_major_changes_nothing_on_cpu():
    qkv = torch.randn(1, 3 * 2 * 32, 40)
    out = A.qkv_attention_fused(qkv, 2)
    with A.attention_tile_major():
        assert torch.equal(A.qkv_attention_fused(qkv, 2), out)


def test_bench_rows_pin_every_switch():
    """`iddpm bench attention` runs each fused row under its own settings of the four switches
    (sm90, tile-major, sm90 pipelined, sm90 bulk dq), whatever they were before, and restores them
    after."""
    from iddpm_ext.bench import attention as bench

    def state():
        return A.sm90_enabled(), A.tile_major_enabled(), A.sm90_pipelined_enabled(), A.sm90_bulk_dq_enabled()

    expected = {
        bench.FUSED_ROW: (False, False, False, False),
        bench.TILE_MAJOR_ROW: (False, True, False, False),
        bench.SM90_ROW: (True, False, False, False),
        bench.SM90_PIPELINED_ROW: (True, False, True, False),
        bench.SM90_BULK_DQ_ROW: (True, False, False, True),
    }
    assert set(bench.SWITCHES) == set(expected)
    for before in ((False, False, False, False), (True, True, True, True)):
        with (
            A.attention_sm90(before[0]),
            A.attention_tile_major(before[1]),
            A.attention_sm90_pipelined(before[2]),
            A.attention_sm90_bulk_dq(before[3]),
        ):
            for row, want in expected.items():
                assert bench._under(bench.SWITCHES[row], state)() == want, (row, before)
                assert state() == before


def test_bench_variant_ratios():
    from iddpm_ext.bench import attention as bench

    rows = {
        bench.FUSED_ROW: {"ms": 2.0},
        bench.TILE_MAJOR_ROW: {"ms": 1.6},
        bench.SM90_ROW: {"ms": 1.0},
        bench.SM90_PIPELINED_ROW: {"ms": 0.8},
        bench.SM90_BULK_DQ_ROW: {"ms": 0.5},
        "einsum (reference)": {"ms": 9.0},
    }
    bench.variant_ratios(rows)
    assert rows[bench.TILE_MAJOR_ROW]["vs_fused"] == 1.25
    assert rows[bench.SM90_ROW]["vs_fused"] == 2.0
    assert rows[bench.SM90_PIPELINED_ROW]["vs_fused"] == 2.5
    assert rows[bench.SM90_PIPELINED_ROW]["vs_sm90"] == 1.25
    assert rows[bench.SM90_BULK_DQ_ROW]["vs_fused"] == 4.0 and rows[bench.SM90_BULK_DQ_ROW]["vs_sm90"] == 2.0
    assert "vs_fused" not in rows[bench.FUSED_ROW] and "vs_fused" not in rows["einsum (reference)"]
    only_fused = {bench.FUSED_ROW: {"ms": 2.0}}  # the CPU: no variants, nothing added
    bench.variant_ratios(only_fused)
    assert only_fused == {bench.FUSED_ROW: {"ms": 2.0}}
