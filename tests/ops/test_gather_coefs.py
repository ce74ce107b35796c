"""iddpm::gather_coefs: the first op through the whole custom-op path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iddpm_ext import ops
from iddpm_ext.script_util import create_gaussian_diffusion

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_indexing(index_dtype):
    table = torch.randn(50, 7)
    t = torch.tensor([0, 49, 3, 3, 17], dtype=index_dtype)
    torch.testing.assert_close(ops.gather_coefs(table, t), table[t.long()], rtol=0, atol=0)


def test_non_contiguous_inputs():
    table = torch.randn(7, 50).t()  # [50, 7], strided
    t = torch.arange(0, 50, 5)[::2]
    torch.testing.assert_close(ops.gather_coefs(table, t), table[t], rtol=0, atol=0)


def test_empty_batch():
    assert ops.gather_coefs(torch.randn(5, 3), torch.zeros(0, dtype=torch.long)).shape == (0, 3)


def test_diffusion_table_gather_equals_float64_values_cast():
    d = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    t = torch.tensor([0, 99, 50])
    rows = ops.gather_coefs(d.coef_table("cpu"), t)
    expected = torch.from_numpy(d._coef_table_f64)[t].float()
    assert torch.equal(rows, expected)


@pytest.mark.parametrize(
    "table,t,match",
    [
        (torch.randn(5), torch.tensor([0]), r"table: expected a 2-D tensor \[T, K\], got shape \[5\]"),
        (
            torch.randn(5, 2, dtype=torch.float64),
            torch.tensor([0]),
            r"table: expected dtype Float, got Double",
        ),
        (torch.randn(5, 2), torch.tensor([[0]]), r"t: expected a 1-D tensor \[B\], got shape \[1, 1\]"),
        (
            torch.randn(5, 2),
            torch.tensor([0.0]),
            r"t: expected an integer tensor \(int64 or int32\), got Float",
        ),
        (torch.randn(5, 2), torch.tensor([5]), r"t: expected timesteps in \[0, 5\).*got t\[0\] = 5"),
        (torch.randn(5, 2), torch.tensor([1, -1]), r"t: expected timesteps in \[0, 5\).*got t\[1\] = -1"),
    ],
)
def test_errors_name_argument_expected_and_got(table, t, match):
    with pytest.raises(ValueError, match=match):
        ops.gather_coefs(table, t)


def test_bad_t_leaves_no_partial_output_and_raises():
    with pytest.raises(ValueError):
        ops.gather_coefs(torch.randn(4, 2), torch.tensor([0, 1, 9]))


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 12),
    K=st.integers(0, 5),
    B=st.integers(0, 9),
    t_lo=st.integers(-3, 3),
    t_hi=st.integers(0, 15),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
    idx_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]),
)
def test_random_arguments_give_result_or_clean_error(T, K, B, t_lo, t_hi, dtype, idx_dtype):
    table = torch.arange(T * K).reshape(T, K).to(dtype)
    t = torch.randint(min(t_lo, t_hi), max(t_lo, t_hi) + 1, (B,)).to(idx_dtype)
    try:
        out = ops.gather_coefs(table, t)
    except ValueError as e:
        assert str(e).split(":")[0] in ("table", "t")
        return
    assert dtype == torch.float32 and idx_dtype != torch.float32
    assert torch.equal(out, table[t.long()])


def test_opcheck():
    table = torch.randn(20, 4)
    for t in (torch.tensor([0, 19, 5]), torch.tensor([2], dtype=torch.int32)):
        torch.library.opcheck(torch.ops.iddpm.gather_coefs.default, (table, t))


def test_torch_compile_fullgraph():
    table = torch.randn(30, 6)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(table, t, x):
        rows = torch.ops.iddpm.gather_coefs(table, t)
        return rows[:, 0].view(-1, 1) * x + rows[:, 1].view(-1, 1)

    t = torch.tensor([1, 29, 0])
    x = torch.randn(3, 5)
    rows = table[t]
    torch.testing.assert_close(f(table, t, x), rows[:, 0:1] * x + rows[:, 1:2])


@pytest.mark.gpu
def test_cuda_matches_cpu_and_marks_out_of_range_with_nan():
    table = torch.randn(40, 5)
    t = torch.tensor([0, 39, 7, 7])
    torch.testing.assert_close(ops.gather_coefs(table.cuda(), t.cuda()).cpu(), table[t], rtol=0, atol=0)
    out = ops.gather_coefs(table.cuda(), torch.tensor([1, 40], device="cuda")).cpu()
    assert torch.equal(out[0], table[1]) and torch.isnan(out[1]).all()
    torch.library.opcheck(torch.ops.iddpm.gather_coefs.default, (table.cuda(), t.cuda()))


@pytest.mark.gpu
def test_cuda_rejects_t_on_another_device():
    with pytest.raises(ValueError, match="t: expected a tensor on cuda"):
        ops.gather_coefs(torch.randn(4, 2, device="cuda"), torch.tensor([0]))
