"""No argument of any op crashes the process or returns garbage (CPU; the CUDA twin is
test_op_safety_gpu.py): meta tensors mixed with real ones are refused like torch's own ops
refuse them, all-meta calls (torch.compile's tracing) keep working, head counts near 2^63 do
not overflow the attention checks, the CUDA entry's checks run before anything touches the
device, and a hypothesis fuzz test throws random shapes, head counts, dtypes, strides and
device mixes at every op (helpers/op_fuzz.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import op_fuzz
from helpers.step_cases import make_diffusion
from iddpm_ext import ModelMeanType, ModelVarType
from iddpm_ext.ops import attention as A

pytestmark = pytest.mark.kernels
OPS = torch.ops.iddpm


def meta(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _step_args():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, steps=40)
    x = torch.randn(2, 3, 4, 4)
    mo = torch.rand(2, 6, 4, 4)
    return [x, mo, torch.tensor([1, 30]), d.coef_table("cpu"), "epsilon", "learned_range", True]


# ---- meta tensors mixed with CPU tensors (issue 16, item 5) ----


def test_gather_coefs_meta_t_refused():
    with pytest.raises(ValueError, match=r"^t: expected a tensor on cpu \(the device of table\), got meta"):
        OPS.gather_coefs(torch.arange(12.0).reshape(4, 3), torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"^t: expected a tensor on meta \(the device of table\), got cpu"):
        OPS.gather_coefs(torch.empty(4, 3, device="meta"), torch.tensor([1, 2]))


def test_attention_backward_meta_grad_out_refused():
    qkv = torch.randn(1, 12, 5)
    out, lse = OPS.qkv_attention(qkv, 2)
    with pytest.raises(
        ValueError, match=r"^grad_out: expected a tensor on cpu \(the device of qkv\), got meta"
    ):
        OPS.qkv_attention_backward(meta(out), qkv, out, lse, 2)
    for i, name in ((2, "out"), (3, "lse")):
        args = [out, qkv, out, lse, 2]
        args[i] = meta(args[i])
        with pytest.raises(
            ValueError, match=rf"^{name}: expected a tensor on cpu \(the device of qkv\), got meta"
        ):
            OPS.qkv_attention_backward(*args)
    with pytest.raises(
        ValueError, match=r"^grad_out: expected a tensor on meta \(the device of qkv\), got cpu"
    ):
        OPS.qkv_attention_backward(out, meta(qkv), meta(out), meta(lse), 2)


@pytest.mark.parametrize("index, name", [(1, "model_output"), (2, "t"), (3, "table")])
def test_step_meta_argument_refused(index, name):
    args = _step_args()
    args[index] = meta(args[index])
    for op, extra in ((OPS.p_sample_step, ()), (OPS.ddim_step, (0.5,)), (OPS.ddim_reverse_step, ())):
        with pytest.raises(
            ValueError, match=rf"^{name}: expected a tensor on cpu \(the device of x\), got meta"
        ):
            op(*args, *extra)


def test_step_meta_noise_and_sample_index_refused():
    args = _step_args()
    noise = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"^noise: expected a tensor on cpu \(the device of x\), got meta"):
        OPS.p_sample_step(*args, noise=meta(noise))
    with pytest.raises(
        ValueError, match=r"^sample_index: expected a tensor on cpu \(the device of x\), got meta"
    ):
        OPS.p_sample_step(*args, sample_index=torch.tensor([0, 1], device="meta"))
    with pytest.raises(
        ValueError, match=r"^model_output: expected a tensor on meta \(the device of x\), got cpu"
    ):
        OPS.p_sample_step(meta(args[0]), *args[1:])


def test_all_meta_calls_keep_working():
    table = torch.empty(10, 19, device="meta")
    t = torch.empty(3, dtype=torch.long, device="meta")
    assert OPS.gather_coefs(table, t).shape == (3, 19)
    qkv = torch.empty(2, 3 * 2 * 8, 7, device="meta", dtype=torch.float16)
    out, lse = OPS.qkv_attention(qkv, 2)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (
        (2, 16, 7),
        torch.float16,
        (2, 2, 7),
        torch.float32,
    )
    assert OPS.qkv_attention_backward(out, qkv, out, lse, 2).shape == qkv.shape
    x = torch.empty(3, 4, 5, 5, device="meta").to(memory_format=torch.channels_last)
    mo = torch.empty(3, 8, 5, 5, device="meta")
    sample, pred = OPS.p_sample_step(x, mo, t, table, "epsilon", "learned", True)
    assert sample.device.type == "meta" and sample.shape == x.shape and sample.stride() == x.stride()
    sample, pred = OPS.ddim_step(
        x, mo, t, table, "start_x", "learned_range", False, 0.5, return_pred_xstart=False
    )
    assert pred.shape == (0,)
    assert OPS.ddim_reverse_step(x, mo, t, table, "epsilon", "learned", True)[0].shape == x.shape


def test_all_meta_calls_refuse_what_the_kernels_refuse():
    m = torch.empty
    with pytest.raises(ValueError, match="^table: expected dtype float32"):
        OPS.gather_coefs(m(10, 19, device="meta", dtype=torch.float64), m(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="^t: expected an integer tensor"):
        OPS.gather_coefs(m(10, 19, device="meta"), m(3, device="meta"))
    with pytest.raises(ValueError, match="^qkv: expected dtype"):
        OPS.qkv_attention(m(1, 6, 3, device="meta", dtype=torch.int32), 2)
    with pytest.raises(
        ValueError, match="^table: expected a .T, K. coefficient table with T >= 1 and K >= 18"
    ):
        x = m(2, 3, 4, device="meta")
        OPS.p_sample_step(x, x, m(2, dtype=torch.long, device="meta"), m(10, 5, device="meta"), "epsilon",
                          "fixed_small", True)  # fmt: skip
    # DDIM's eta outside [0, 1]: the same words from the CPU kernel and from the fake
    for device in ("cpu", "meta"):
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _step_args()]
        for eta in (1.5, -0.25, float("nan")):
            with pytest.raises(ValueError, match=r"^eta: expected a number in \[0, 1\] \(DDIM's eta"):
                OPS.ddim_step(*args, eta)


def test_fake_tensor_mode_checks_devices():
    # torch.compile's tracing sees FakeTensors on their real devices: a mix is refused there too.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table = torch.empty(4, 3)
        t = torch.empty(2, dtype=torch.long, device="meta")
        with pytest.raises(ValueError, match="^t: expected a tensor on cpu"):
            OPS.gather_coefs(table, t)
        assert OPS.gather_coefs(table, torch.empty(2, dtype=torch.long)).shape == (2, 3)


# ---- num_heads near 2^63 (issue 16, item 6) ----

# (2^64 + 2) / 3: 3·num_heads wraps around to 2 in int64, which divided a 6-channel qkv.
OVERFLOWING_HEADS = [(2**64 + 2) // 3, 2**62, 2**63 - 1, (2**64 + 1) // 3 + 1]


@pytest.mark.parametrize("heads", OVERFLOWING_HEADS)
def test_num_heads_near_2_63_is_refused(heads):
    qkv = torch.randn(1, 6, 4)
    match = r"^qkv: expected a channel count \(dim 1\) that is a positive multiple of 3·num_heads = "
    with pytest.raises(
        ValueError, match=match + str(3 * heads) if 3 * heads < 2**63 else match + "3·" + str(heads)
    ):
        OPS.qkv_attention(qkv, heads)
    with pytest.raises(ValueError, match=match):
        OPS.qkv_attention(torch.empty(0, 6, 0), heads)
    out, lse = OPS.qkv_attention(qkv, 2)
    with pytest.raises(ValueError, match=match):
        OPS.qkv_attention_backward(out, qkv, out, lse, heads)
    with pytest.raises(ValueError, match="qkv: expected a channel count"):
        OPS.qkv_attention(meta(qkv), heads)
    with pytest.raises(ValueError, match="qkv: expected a channel count"):
        A.qkv_attention_reference(qkv, heads)
    assert not A.fused_supported(qkv, heads)


def test_learned_channels_near_2_63_are_refused():
    # x of C = 2^62 channels (empty): 2C does not fit in int64, so no model output can match.
    x = torch.empty(0, 2**62)
    args = (torch.empty(0, 2**62), torch.empty(0, dtype=torch.long), make_diffusion().coef_table("cpu"))
    with pytest.raises(
        ValueError, match=r"^model_output: expected shape \[B, 2·4611686018427387904, \.\.\.\]"
    ):
        OPS.p_sample_step(x, *args, "epsilon", "learned_range", True)
    sample, _ = OPS.p_sample_step(x, *args, "epsilon", "fixed_small", True)
    assert sample.shape == x.shape


def test_attention_huge_but_empty():
    for shape, heads in (((2**40, 3, 0), 1), ((0, 3 * 2**40, 5), 2), ((1, 3 * 2**61, 0), 2**60)):
        out, lse = OPS.qkv_attention(torch.empty(shape), heads)
        assert out.shape == (shape[0], shape[1] // 3, shape[2]) and lse.shape == (shape[0], heads, shape[2])
        assert OPS.qkv_attention_backward(out, torch.empty(shape), out, lse, heads).shape == shape


# ---- the CUDA entry's checks, reached without a GPU ----


def _cuda_entry(op, *args):
    """Calls the op's CUDA kernel directly (DispatchKey.CUDA) with FakeTensors that say they
    are on CUDA: its argument checks run on this machine; anything past them needs the device."""
    return op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


# FakeTensors hold no data: on a machine with a GPU, a call past the checks would launch a kernel
# on null pointers (test_op_safety_gpu.py is the twin there).
needs_cuda_entry = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("iddpm::qkv_attention", "CUDA")
    or torch.cuda.is_available(),
    reason="iddpm_ext._C built without CUDA, or a GPU is visible",
)


HEAD_DIM_MSG = (
    r"^qkv: expected a head dim C = channels / \(3·num_heads\) that is a multiple of 8 from 8 to 256 "
    r"on CUDA, got C = "
)


@needs_cuda_entry
@pytest.mark.parametrize("head_dim", [1, 4, 12, 100, 204, 264, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_entry_refuses_unsupported_head_dims(head_dim, dtype):
    # The first H100 run segfaulted here (head dim 96, fp16, then without a kernel) instead of
    # raising (issue 13); the kernels now take every multiple of 8 up to 256.
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        qkv = torch.empty(1, 3 * 2 * head_dim, 16, dtype=dtype, device="cuda")
        out = torch.empty(1, 2 * head_dim, 16, dtype=dtype, device="cuda")
        lse = torch.empty(1, 2, 16, device="cuda")
    match = HEAD_DIM_MSG + f"{head_dim} "
    with pytest.raises(ValueError, match=match):
        _cuda_entry(OPS.qkv_attention, qkv, 2)
    with pytest.raises(ValueError, match=match):
        _cuda_entry(OPS.qkv_attention_backward, out, qkv, out, lse, 2)
    # The fake (torch.compile's tracing on CUDA tensors) refuses them with the same message.
    with mode, pytest.raises(ValueError, match=match):
        OPS.qkv_attention(qkv, 2)


@needs_cuda_entry
@pytest.mark.parametrize("head_dim", [8, 48, 96, 136, 256])
def test_cuda_entry_accepts_every_multiple_of_8_up_to_256(head_dim):
    # Past the checks, the call fails only where the device is needed (no GPU here); the fake
    # gives the outputs' metadata.
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        qkv = torch.empty(1, 3 * 2 * head_dim, 16, dtype=torch.float16, device="cuda")
        out, lse = OPS.qkv_attention(qkv, 2)
        assert out.shape == (1, 2 * head_dim, 16) and lse.shape == (1, 2, 16)
    with pytest.raises(RuntimeError, match="NVIDIA driver|CUDA|cuda"):
        _cuda_entry(OPS.qkv_attention, qkv, 2)


@needs_cuda_entry
def test_cuda_entry_checks_before_touching_the_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(3, 3 * 2 * 64, 16, dtype=torch.float16, device="cuda")
        qkv64 = torch.empty(1, 6 * 32, 4, dtype=torch.float64, device="cuda")
        long_qkv = torch.empty(1, 6 * 32, 65535 * 64 + 1, dtype=torch.float16, device="cuda")
    cases = [
        ((qkv64, 2), "^qkv: expected dtype float32, float16 or bfloat16 on CUDA, got Double"),
        ((long_qkv, 2), "^qkv: expected at most 4194240 positions"),
        ((qkv, 0), "^num_heads: expected a positive number of heads, got 0"),
        ((qkv, (2**64 + 2) // 3), "^qkv: expected a channel count"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            _cuda_entry(OPS.qkv_attention, *args)
    # Valid arguments pass every check and fail only where the device is needed.
    with pytest.raises(RuntimeError, match="NVIDIA driver|CUDA|cuda"):
        _cuda_entry(OPS.qkv_attention, qkv, 2)


# ---- hypothesis: every op, random arguments ----

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.data())
def test_fuzz_gather_coefs(data):
    op_fuzz.fuzz_gather_coefs(data)


@FUZZ
@given(st.data())
def test_fuzz_qkv_attention(data):
    op_fuzz.fuzz_qkv_attention(data)


@FUZZ
@given(st.data())
def test_fuzz_qkv_attention_bf16(data):
    op_fuzz.fuzz_qkv_attention_bf16(data)


@FUZZ
@given(st.data())
def test_fuzz_qkv_attention_backward(data):
    op_fuzz.fuzz_qkv_attention_backward(data)


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_fuzz_group_norm_act(data):
    op_fuzz.fuzz_group_norm_act(data)


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_fuzz_group_norm_act_backward(data):
    op_fuzz.fuzz_group_norm_act_backward(data)


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_fuzz_step_ops(data):
    op_fuzz.fuzz_step(data)


@FUZZ
@given(st.data())
def test_fuzz_winograd_weight(data):
    op_fuzz.fuzz_winograd_weight(data)


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_fuzz_conv3x3_winograd(data):
    op_fuzz.fuzz_conv3x3_winograd(data)


# ---- hypothesis: every op's CUDA kernel, reached without a GPU ----
# The same draws as above against the CUDA kernels (op_fuzz.FAKE_CUDA, with CPU tensors mixed
# in): each call is refused with an error naming an argument, or passes every check and fails
# only where the device is needed; never a crash. The CUDA kernel accepts only what the CPU
# kernel accepts, the fake accepts what the CUDA kernel accepts, and the CUDA attention takes
# exactly what fused_supported says.


CUDA_ENTRY_FUZZ = (
    "gather_coefs",
    "qkv_attention",
    "qkv_attention_backward",
    "step",
    "group_norm_act",
    "group_norm_act_backward",
    "winograd_weight",
    "conv3x3_winograd",
)


@needs_cuda_entry
@pytest.mark.parametrize("op", CUDA_ENTRY_FUZZ)
@settings(FUZZ, max_examples=80)
@given(st.data())
def test_fuzz_cuda_entry(op, data):
    with op_fuzz.on_fake_cuda():
        getattr(op_fuzz, f"fuzz_{op}")(data, base=op_fuzz.FAKE_CUDA, mixes=("cpu",))


def _valid_cuda_calls():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, steps=40)
    table = d.coef_table("cpu")
    x, mo, t = torch.randn(2, 3, 4, 4), torch.rand(2, 6, 4, 4), torch.tensor([1, 30])
    qkv, g = torch.randn(2, 6 * 64, 16).half(), torch.randn(2, 128, 16).half()
    out, lse = OPS.qkv_attention(qkv, 2)
    xg = torch.randn(2, 32, 4, 4)
    _, mean, rstd = OPS.group_norm_act(xg, 8, None, None, None, None, 1e-5, True)
    step = (x, mo, t, table, "epsilon", "learned_range", True)
    return {
        "gather_coefs": (OPS.gather_coefs, (table, t)),
        "p_sample_step": (OPS.p_sample_step, (*step, None, None, True, None)),
        "ddim_step": (OPS.ddim_step, (*step, 0.5, torch.randn(2, 3, 4, 4), None, True, None)),
        "ddim_reverse_step": (OPS.ddim_reverse_step, (*step, True)),
        "qkv_attention": (OPS.qkv_attention, (qkv, 2)),
        "qkv_attention_backward": (OPS.qkv_attention_backward, (g, qkv, out, lse, 2)),
        "group_norm_act": (OPS.group_norm_act, (xg, 8, None, None, None, None, 1e-5, True)),
        "group_norm_act_backward": (
            OPS.group_norm_act_backward,
            (xg, xg, mean, rstd, 8, None, None, None, None, True),
        ),
    }


@needs_cuda_entry
@pytest.mark.parametrize("name", sorted(_valid_cuda_calls()))
def test_cuda_entry_valid_calls_pass_every_check(name):
    # What the fuzz tests above count as "got past the checks" does happen: valid arguments on
    # FAKE_CUDA reach the device (and fail only there), the same arguments on the CPU run.
    op, args = _valid_cuda_calls()[name]
    op(*args)
    with op_fuzz.on_fake_cuda():
        res, err = op_fuzz.outcome(lambda: op(*(op_fuzz.place(a, op_fuzz.FAKE_CUDA) for a in args)), (name,))
        assert (res, err) == (op_fuzz.PASSED, None)
        # A tensor argument left on the CPU is refused, naming it.
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if len(tensors) < 2:
            return
        mixed = [op_fuzz.place(a, op_fuzz.FAKE_CUDA) for a in args]
        mixed[tensors[-1]] = args[tensors[-1]]
        res, err = op_fuzz.outcome(lambda: op(*mixed), op_fuzz.STEP_ARGS + op_fuzz.ATTENTION_ARGS
                                   + op_fuzz.GROUP_NORM_BWD_ARGS + op_fuzz.GATHER_ARGS)  # fmt: skip
        assert err is not None and res is None


@needs_cuda_entry
def test_cuda_entry_fuzz_gets_past_the_checks(monkeypatch):
    # test_fuzz_cuda_entry would pass vacuously if its checks refused everything: with the same
    # settings, every op with a CUDA kernel has draws that pass all of its checks (PASSED).
    import collections

    passed = collections.Counter()
    real_outcome = op_fuzz.outcome

    def counting(call, names):
        res = real_outcome(call, names)
        passed[current[0]] += res[0] is op_fuzz.PASSED
        return res

    monkeypatch.setattr(op_fuzz, "outcome", counting)
    current = [None]
    for op in [o for o in CUDA_ENTRY_FUZZ if "winograd" not in o]:  # those have CPU kernels only
        current[0] = op

        @settings(FUZZ, max_examples=80)
        @given(st.data())
        def run(data):
            with op_fuzz.on_fake_cuda():
                getattr(op_fuzz, f"fuzz_{current[0]}")(data, base=op_fuzz.FAKE_CUDA, mixes=("cpu",))

        run()
        assert passed[op] > 0, f"no draw of {op} got past the CUDA kernel's checks"


@needs_cuda_entry
def test_cuda_group_norm_refuses_more_item_groups_than_its_grid():
    # One block per (item, group) along gridDim.x (at most 2^31 - 1): beyond, a clean error
    # naming num_groups (empty x; the statistics [N, G] are never allocated: there is no device).
    ok = op_fuzz.place(torch.empty(2**30, 2, 0), op_fuzz.FAKE_CUDA)
    big = op_fuzz.place(torch.empty(2**31, 2, 0), op_fuzz.FAKE_CUDA)
    names = op_fuzz.GROUP_NORM_ARGS
    with op_fuzz.on_fake_cuda():
        for x, groups, refused in ((ok, 1, False), (ok, 2, True), (big, 1, True), (big, 2**62, False)):
            res, err = op_fuzz.outcome(
                lambda: OPS.group_norm_act(x, groups, None, None, None, None, 1e-5, True), names
            )
            if groups == 2**62:  # not a divisor of 2: refused before, by the divisor check
                assert "positive divisor" in str(err)
                continue
            assert (err is not None) == refused, (x.shape, groups, err)
            if refused:
                assert str(err).startswith(
                    "num_groups: expected at most 2147483647 batch items × groups on CUDA"
                )


@needs_cuda_entry
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cuda_entry_refusal_through_the_autograd_kernel(requires_grad):
    # The first H100 run's crash path without a GPU: torch.ops.iddpm.qkv_attention called as a
    # user would (through the Python autograd kernel that register_autograd installs, which
    # redispatches to the CUDA kernel), the CUDA kernel's check raising; a clean ValueError.
    from torch._subclasses.fake_tensor import FakeTensor

    elem = torch.empty(1, 6 * 100, 16, dtype=torch.float16, device="meta")
    qkv = FakeTensor(op_fuzz._fake_mode(), elem, torch.device("cuda", 0))
    qkv.requires_grad_(requires_grad)
    with op_fuzz.on_fake_cuda():
        assert torch._C._dispatch_keys(qkv).has(torch._C.DispatchKey.AutogradCUDA)
        with pytest.raises(ValueError, match=HEAD_DIM_MSG + "100 "):
            OPS.qkv_attention(qkv, 2)
