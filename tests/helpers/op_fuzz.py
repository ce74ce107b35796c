"""Random calls of every ``iddpm`` op for the safety tests (tests/ops/test_op_safety.py on the
CPU, tests/ops/test_op_safety_gpu.py on CUDA): shapes with 0-size and huge-but-empty dims,
head counts (0, negative, near 2^63), dtypes (int, bool, complex, float64, fp16, bf16, fp32),
non-contiguous strides and devices mixed with meta (and CPU, on CUDA).

Each ``fuzz_*`` function draws one call from hypothesis data and checks that it either
returns what the readable oracle (:mod:`helpers.oracles`) gives for the same inputs, or raises
a clean Python exception (ValueError, TypeError, RuntimeError, NotImplementedError) whose
message names one of the op's arguments. A crash kills the test process, which fails the test.
An all-meta call (the tracing of torch.compile) must agree with the same call on the real
device: the same output shapes, dtypes and strides where the kernel returns, an error where it
refuses (except for what only the data can tell, t out of range).

``base=FAKE_CUDA`` (inside :func:`on_fake_cuda`) runs the same draws against the ops' CUDA
kernels on a machine without a GPU: the tensors are FakeTensors that say they are on CUDA (no
data), the calls go to the CUDA kernels (FakeTensor's Python dispatch keys excluded), and a call
that gets past every check of a kernel comes back as :data:`PASSED` (its first use of the device
fails here). So CI checks that the CUDA kernels' checks refuse what they must, name the
argument, agree with the fakes, and never crash, before anything reaches a device.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from hypothesis import assume
from hypothesis import strategies as st

from helpers.oracles import attention_math_f64, max_err, reference_step64
from helpers.step_cases import make_diffusion
from iddpm_ext import ModelMeanType, ModelVarType

CLEAN = (ValueError, TypeError, RuntimeError, NotImplementedError)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPES = FLOATS + [torch.int32, torch.int64, torch.bool, torch.complex64]
# Head counts that overflowed 3·num_heads (int64) in the attention checks, and other extremes.
EXTREME_HEADS = [0, -1, -(2**63), 2**62, (2**64 + 2) // 3, 2**63 - 1]
HUGE = 2**40  # a dim that only exists next to a 0-size one
LAYOUTS = ["contiguous", "strided", "transposed", "expanded"]
WINOGRAD_DTYPES = (torch.float32, torch.bfloat16)  # what conv3x3_winograd / winograd_weight take


def _packable(cin, cout, dtype):
    """Whether winograd_weight(w, packed=True) takes a [cout, cin, 3, 3] weight of dtype here."""
    from iddpm_ext.ops import winograd

    return winograd.packed_refusal(dtype, cin, cout) is None


def _unpack(up, cin):
    """The plain [16, Cin, Cout] weight of a packed [16, Cout/32, Cin/2, 64] one."""
    nb = up.shape[1]
    return up.reshape(16, nb, cin // 2, 32, 2).permute(0, 2, 4, 1, 3).reshape(16, cin, nb * 32)


# Tolerances against the float64 oracles, relative to max(1, |reference|): the output's
# rounding and the float32 arithmetic, generously (precision is tested elsewhere; this catches
# garbage).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}

GATHER_ARGS = ("table", "t")
ATTENTION_ARGS = ("qkv", "num_heads", "grad_out", "out", "lse")
STEP_ARGS = ("x", "model_output", "t", "table", "noise", "sample_index", "generator",
             "model_mean_type", "model_var_type", "eta")  # fmt: skip


# ---- the CUDA kernels without a GPU ----

FAKE_CUDA = "fake-cuda"  # a device for place(): a FakeTensor on cuda (metadata only)


class _Passed:
    def __repr__(self):
        return "PASSED"


# What outcome() gives, inside on_fake_cuda(), for a call that got past every check of the
# op's CUDA kernel and failed only at its first use of the device.
PASSED = _Passed()
_FAKE = {"mode": None, "on": False}


def _fake_mode():
    if _FAKE["mode"] is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _FAKE["mode"] = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE["mode"]


@contextlib.contextmanager
def on_fake_cuda():
    """Within: outcome() calls the ops with FakeTensor's Python dispatch keys excluded, so
    FAKE_CUDA tensors reach the ops' CUDA kernels (and real CPU tensors beside them too)."""
    assert not torch.cuda.is_available(), "FAKE_CUDA tensors hold no data: a real device would read it"
    _FAKE["on"] = True
    try:
        yield
    finally:
        _FAKE["on"] = False


def _needs_the_device(err) -> bool:
    """Whether ``err`` is the CUDA runtime's failure on a machine without a GPU (the first
    allocation or stream use past the checks), not a check of the op."""
    if isinstance(err, (ValueError, TypeError, NotImplementedError)):
        return False
    return type(err).__name__ == "AcceleratorError" or bool(
        re.search(r"(?i)cuda driver|nvidia driver|no cuda gpus|cuda-capable device|^cuda error", str(err))
    )


def outcome(call, names):
    """(result, None), or (None, error) for a clean exception naming one of ``names``; any
    other exception propagates (and fails the test). Inside on_fake_cuda(), (PASSED, None)
    for a call that failed only where the device was needed."""
    try:
        if not _FAKE["on"]:
            return call(), None
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Python)
        keys = keys | torch._C.DispatchKeySet(torch._C.DispatchKey.PythonTLSSnapshot)
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return call(), None
    except CLEAN as e:
        if _FAKE["on"] and _needs_the_device(e):
            return PASSED, None
        msg = str(e)
        # "name: expected ..." (the ops' checks) or "argument 'name'" (torch's schema checks).
        assert any(re.search(rf"(?<![\w.]){re.escape(n)}(:|')", msg) for n in names), (
            f"{type(e).__name__} does not name an argument of {names}: {msg}"
        )
        return None, e


# ---- tensors ----


def values(shape, dtype, gen):
    """Random values of ``dtype`` (contiguous, CPU)."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-3, 4, shape, generator=gen).to(dtype)


def make(data, shape, dtype, gen, layout=None, value_fn=None):
    """A CPU tensor of ``shape`` and ``dtype`` in a drawn layout: contiguous, every other element
    of a larger tensor, the transpose of a transposed one, or expanded along dim 0 (stride 0)."""
    shape = tuple(shape)
    assume(math.prod(shape) <= 10**6)  # a derived shape (a dim dropped or grown) may no longer be empty
    layout = layout or data.draw(st.sampled_from(LAYOUTS))
    fill = value_fn or (lambda s: values(s, dtype, gen))
    try:
        return _make(shape, layout, fill)
    except (RuntimeError, TypeError, ValueError):  # torch has no such tensor (a stride overflows int64)
        assume(False)


def _make(shape, layout, fill):
    if layout == "strided" and shape:
        return fill(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        return fill(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "expanded" and shape and (math.prod(shape) > 0 or math.prod(shape[1:]) == 0):
        return fill((1,) + shape[1:]).expand(shape)
    return fill(shape)


def relayout(data, src):
    """A copy of ``src`` (same values) in a drawn layout: contiguous, every other element of a
    larger tensor, or the transpose of a transposed one."""
    layout = data.draw(st.sampled_from(LAYOUTS[:3]))
    if layout == "strided" and src.dim():
        base = torch.empty(tuple(src.shape[:-1]) + (2 * src.shape[-1],), dtype=src.dtype, device=src.device)
        base[..., ::2] = src
        return base[..., ::2]
    if layout == "transposed" and src.dim() >= 2:
        return src.transpose(-1, -2).contiguous().transpose(-1, -2)
    return src.clone()


def place(x, device):
    """``x`` on ``device``, its strides kept where possible (meta, FAKE_CUDA: always)."""
    if not isinstance(x, torch.Tensor):
        return x
    if device == FAKE_CUDA:  # made without dispatch: place() may run inside outcome()'s guard
        from torch._subclasses.fake_tensor import FakeTensor

        elem = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
        return FakeTensor(_fake_mode(), elem, torch.device("cuda", 0))
    if x.device == torch.device(device):
        return x
    if torch.device(device).type == "meta":
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
    return x.to(device)


def choose(data, good, *bad):
    """``good`` 9 times in 10, else one of ``bad``: most calls valid but for one argument or none,
    so that a check that lets a bad argument through meets a call that would otherwise pass."""
    if not bad or data.draw(st.integers(0, 9)):
        return good
    return data.draw(st.sampled_from(bad))


def draw_devices(data, names, base, mixes):
    """Per tensor argument: all on ``base`` (4 in 10), all on meta (2 in 10), or ``base`` but
    for one argument (and perhaps more) on one of ``mixes`` (4 in 10)."""
    mode = data.draw(st.integers(0, 9))
    if mode >= 8:
        return {n: "meta" for n in names}
    devices = {n: base for n in names}
    if mode < 4:
        devices[data.draw(st.sampled_from(names))] = data.draw(st.sampled_from(mixes))
        for n in names:
            if not data.draw(st.integers(0, 4)):
                devices[n] = data.draw(st.sampled_from([base, *mixes]))
    return devices


def close(result, ref, dtype, what):
    """``result`` (any device, dtype) within TOL[dtype] of the float64 ``ref``; NaN where ref is NaN."""
    assert tuple(result.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(result.shape)} vs {tuple(ref.shape)}"
    )
    if ref.numel() == 0:
        return
    r, e = result.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.equal(r.isnan(), e.isnan()), f"{what}: NaN where the oracle has none (or the reverse)"
    keep = ~e.isnan()
    if keep.any():
        scale = max(1.0, e[keep].abs().max().item())
        err = max_err(r[keep], e[keep])
        assert err <= TOL[dtype] * scale, f"{what}: error {err:.3g} vs oracle (scale {scale:.3g}, {dtype})"


def same_meta(meta_out, real_out, what):
    """An all-meta call's outputs have the real call's shapes, dtypes and strides."""
    for m, r in zip(meta_out, real_out):
        assert m.device.type == "meta", f"{what}: meta call returned a {m.device} tensor"
        assert (tuple(m.shape), m.dtype) == (tuple(r.shape), r.dtype), f"{what}: meta {m.shape} {m.dtype}"
        if r.numel() > 1:  # strides of size-1 dims do not matter
            ms, rs = ([st for st, n in zip(x.stride(), x.shape) if n > 1] for x in (m, r))
            assert ms == rs, f"{what}: meta strides {m.stride()} vs {r.stride()}"


def check_meta_agrees(meta, real, data_dependent, what, strict):
    """meta, real: (result, error) of the all-meta call and the real one. ``strict``: the meta
    call also refuses what the real one refuses (the CPU kernels' limits are the fakes' limits)."""
    (m_res, m_err), (r_res, r_err) = meta, real
    if r_err is None:
        assert m_err is None, f"{what}: the fake refuses what the kernel accepts: {m_err}"
        if r_res is PASSED:  # the CUDA kernel's checks passed; it returned nothing
            return
        same_meta(
            m_res if isinstance(m_res, tuple) else (m_res,),
            r_res if isinstance(r_res, tuple) else (r_res,),
            what,
        )
    elif strict and m_err is None:
        assert data_dependent(r_err), f"{what}: the fake accepts what the kernel refuses: {r_err}"


def mixed(devices):
    return len(set(devices.values())) > 1


def assert_mix_refused(err, devices, what):
    assert err is not None, f"{what}: tensors on {sorted(set(devices.values()))} were accepted"


def check_cuda_within_cpu(cuda, cpu_call, names, data_dependent, what):
    """FAKE_CUDA: the CUDA kernel accepts only what the CPU kernel accepts, given the same
    arguments on the CPU (the CUDA kernels' limits are narrower, never wider: dtypes, head
    dims), except refusals that only the data can tell (t out of range: NaN on CUDA)."""
    if cuda[1] is None:
        cpu_err = outcome(cpu_call, names)[1]
        assert cpu_err is None or data_dependent(cpu_err), (
            f"{what}: the CUDA kernel accepts what the CPU kernel refuses: {cpu_err}"
        )


# ---- gather_coefs ----


def fuzz_gather_coefs(data, base="cpu", mixes=("meta",)):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    T = data.draw(st.sampled_from([0, 1, 3, 7]))
    K = data.draw(st.sampled_from([0, 1, 4, HUGE]))
    B = data.draw(st.sampled_from([0, 1, 3, 5]))
    if K == HUGE and T != 0:
        T = 0
    table_shape = choose(data, (T, K), (T,), (T, K, 1), ())
    table = make(data, table_shape, choose(data, torch.float32, *DTYPES), gen)
    t_dtype = choose(data, data.draw(st.sampled_from([torch.int64, torch.int32])), *DTYPES)
    hi = max(T, 1)
    lo = choose(data, 0, -1)
    top = choose(data, hi, hi + 1)

    def t_vals(s):
        return torch.randint(lo, top, s, generator=gen)

    t_shape = choose(data, (B,), (B, 1), ())
    t = make(data, t_shape, t_dtype, gen, value_fn=lambda s: values(s, t_dtype, gen) if t_dtype not in
             (torch.int64, torch.int32) else t_vals(s).to(t_dtype))  # fmt: skip
    devices = draw_devices(data, GATHER_ARGS, base, list(mixes))
    args = {"table": place(table, devices["table"]), "t": place(t, devices["t"])}

    def call(a):
        return lambda: torch.ops.iddpm.gather_coefs(a["table"], a["t"])

    res, err = outcome(call(args), GATHER_ARGS)
    if mixed(devices):
        return assert_mix_refused(err, devices, "gather_coefs")
    if devices["table"] == "meta":
        real = outcome(call({"table": place(table, base), "t": place(t, base)}), GATHER_ARGS)
        check_meta_agrees((res, err), real, _bad_timestep, "gather_coefs", strict=base == "cpu")
        return
    if base == FAKE_CUDA:
        return check_cuda_within_cpu((res, err), call({"table": table, "t": t}), GATHER_ARGS, _bad_timestep,
                                     "gather_coefs")  # fmt: skip
    if err is not None:
        return
    # The oracle: table[t] row by row; an out-of-range t gives NaN on CUDA (CPU raises).
    tc, tab = t.cpu().long(), table.cpu().double()
    ok = (tc >= 0) & (tc < tab.shape[0])
    ref = torch.full((tc.shape[0], tab.shape[1]), float("nan"), dtype=torch.float64)
    ref[ok] = tab[tc[ok]]
    assert base != "cpu" or bool(ok.all()), "gather_coefs: CPU accepted an out-of-range t"
    close(res, ref, torch.float32, "gather_coefs")


def _bad_timestep(err):
    return str(err).startswith("t: expected timesteps in")


# ---- attention ----


def _heads(data):
    """1 to 3 heads 9 times in 10, else -1 or an extreme (0, negative, near 2^63)."""
    return choose(data, data.draw(st.integers(1, 3)), -1, *EXTREME_HEADS)


def _qkv_shape(data, heads, head_dims, lengths):
    """A qkv shape [B, 3·H·C, T] for ``heads`` (H = 2 where heads is extreme), C and T drawn from
    the lists; 1 in 10 a bad channel count, some huge-but-empty, some not 3-D."""
    h = heads if 1 <= heads <= 3 else 2
    B = data.draw(st.sampled_from([0, 1, 2]))
    C = data.draw(st.sampled_from(head_dims))
    T = data.draw(st.sampled_from(lengths))
    width = choose(data, 3 * h * C, 0, 3 * h * C + 1, 6, 7)
    shape = [B, width, T]
    if B == 0 and data.draw(st.booleans()):  # huge but empty
        shape[data.draw(st.sampled_from([1, 2]))] = 3 * HUGE
    elif T == 0 and data.draw(st.booleans()):
        shape[0] = HUGE
    return choose(data, tuple(shape), tuple(shape[:2]), (2, 6, 2, 1))


def fuzz_qkv_attention(data, base="cpu", mixes=("meta",)):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    heads = _heads(data)
    # CUDA: head dims that are multiples of 8 up to 256 have kernels; 4, 12, 264 do not.
    head_dims = [1, 2, 3, 4, 8, 32, 96] if base == "cpu" else [4, 8, 12, 32, 96, 264]
    shape = _qkv_shape(data, heads, head_dims, [0, 1, 2, 5, 9])
    dtype = choose(data, data.draw(st.sampled_from(FLOATS)), *DTYPES)
    qkv = make(data, shape, dtype, gen)
    device = data.draw(st.sampled_from([base] * 4 + ["meta"]))

    def call(q):
        return lambda: torch.ops.iddpm.qkv_attention(q, heads)

    placed = place(qkv, device)
    res, err = outcome(call(placed), ATTENTION_ARGS)
    if device == "meta":
        real = outcome(call(place(qkv, base)), ATTENTION_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "qkv_attention", strict=base == "cpu")
        return
    if base == FAKE_CUDA:
        # The Python side's view of the CUDA kernel's limits ("auto" and "fused" go by it) is the
        # kernel's own: it takes exactly what fused_supported says it has a kernel for.
        from iddpm_ext.ops.attention import fused_supported

        supported = placed.dim() == 3 and fused_supported(placed, heads)
        assert (err is None) == supported, (
            f"qkv_attention on CUDA {'refused' if err else 'accepted'} {tuple(qkv.shape)} {dtype} "
            f"heads={heads} where fused_supported says {supported}: {err}"
        )
        return check_cuda_within_cpu((res, err), call(qkv), ATTENTION_ARGS, lambda e: False, "qkv_attention")
    if err is not None:
        return
    out, lse = res
    Bq, width_q, Tq = qkv.shape
    assert heads >= 1 and width_q % (3 * heads) == 0, f"accepted heads={heads} for width {width_q}"
    assert out.shape == (Bq, width_q // 3, Tq) and out.dtype == qkv.dtype
    assert lse.shape == (Bq, heads, Tq) and lse.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    if out.numel() == 0:
        return
    q64 = qkv.cpu().double()
    close(out, attention_math_f64(q64, heads), dtype, "qkv_attention out")
    close(lse, _lse64(q64, heads), torch.float32 if dtype != torch.float64 else dtype, "qkv_attention lse")


def fuzz_qkv_attention_bf16(data, base="cpu", mixes=("meta",)):
    """The bf16 inference attention (CPU only): bf16 qkv 9 times in 10, every layout (the
    "transposed" one is token-major, read in place), odd head dims, empty and huge-but-empty
    shapes, extreme head counts; on meta, the fake's shapes, strides and refusals."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    heads = _heads(data)
    shape = _qkv_shape(data, heads, [1, 2, 3, 5, 8, 32, 96], [0, 1, 2, 5, 9, 70])
    dtype = choose(data, torch.bfloat16, *DTYPES)
    qkv = make(data, shape, dtype, gen)
    device = data.draw(st.sampled_from(["cpu"] * 4 + ["meta"]))

    def call(q):
        return lambda: torch.ops.iddpm.qkv_attention_bf16(q, heads)

    res, err = outcome(call(place(qkv, device)), ATTENTION_ARGS)
    if device == "meta":
        real = outcome(call(qkv), ATTENTION_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "qkv_attention_bf16", strict=True)
        return
    if err is not None:
        return
    Bq, width_q, Tq = qkv.shape
    assert dtype == torch.bfloat16 and heads >= 1 and width_q % (3 * heads) == 0, (
        f"accepted {dtype} heads={heads} for width {width_q}"
    )
    assert res.shape == (Bq, width_q // 3, Tq) and res.dtype == dtype
    if res.numel() == 0:
        return
    assert res.stride() == (Tq * width_q // 3, 1, width_q // 3)
    close(res, attention_math_f64(qkv.double(), heads), dtype, "qkv_attention_bf16 out")


def _lse64(qkv, heads):
    B, width, T = qkv.shape
    C = width // (3 * heads)
    q, k, _ = qkv.reshape(B * heads, 3 * C, T).split(C, dim=1)
    return (torch.einsum("bct,bcs->bts", q, k) / math.sqrt(C)).logsumexp(-1).reshape(B, heads, T)


def fuzz_qkv_attention_backward(data, base="cpu", mixes=("meta",)):
    """A valid forward on ``base``, then its backward's arguments, one of them perhaps changed
    in shape, dtype, layout or device, or the head count."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    heads = data.draw(st.integers(1, 3))
    B, T = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 6))
    C = data.draw(st.sampled_from([1, 3, 32] if base == "cpu" else [32, 64]))
    dtype = data.draw(st.sampled_from(FLOATS if base == "cpu" else FLOATS[:3]))
    dev = "cpu" if base == FAKE_CUDA else base  # where the forward and the drawn tensors are made
    qkv = make(data, (B, 3 * heads * C, T), dtype, gen).to(dev)
    out, lse = torch.ops.iddpm.qkv_attention(qkv, heads)
    grad_out = make(data, tuple(out.shape), dtype, gen).to(dev)
    args = {"grad_out": grad_out, "qkv": qkv, "out": out, "lse": lse}
    change = data.draw(st.sampled_from(["none"] * 4 + ["shape", "dtype", "layout", "heads"]))
    target = data.draw(st.sampled_from(sorted(args)))
    n_heads = heads
    if change == "shape":
        s = list(args[target].shape)
        i = data.draw(st.integers(0, len(s) - 1))
        s[i] = data.draw(st.sampled_from([0, s[i] + 1, HUGE if 0 in s[:i] + s[i + 1 :] else 1]))
        s = data.draw(st.sampled_from([s, s[:2], s + [1]]))
        if tuple(s) == tuple(args[target].shape):  # the old size drawn again: nothing changed
            change = "none"
        else:
            args[target] = make(data, s, args[target].dtype, gen).to(dev)
    elif change == "dtype":
        new_dtype = data.draw(st.sampled_from(DTYPES))
        change = "none" if new_dtype == args[target].dtype else change
        args[target] = args[target].to(new_dtype)
    elif change == "layout":
        args[target] = relayout(data, args[target])
    elif change == "heads":
        n_heads = _heads(data)
    devices = draw_devices(data, ("grad_out", "qkv", "out", "lse"), base, list(mixes))
    placed = {n: place(v, devices[n]) for n, v in args.items()}

    def call(a):
        return lambda: torch.ops.iddpm.qkv_attention_backward(
            a["grad_out"], a["qkv"], a["out"], a["lse"], n_heads
        )

    res, err = outcome(call(placed), ATTENTION_ARGS)
    if mixed(devices):
        return assert_mix_refused(err, devices, "qkv_attention_backward")
    if devices["qkv"] == "meta":
        real = outcome(call({n: place(v, base) for n, v in args.items()}), ATTENTION_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "qkv_attention_backward", strict=base == "cpu")
        return
    if err is not None:
        return
    assert change in ("none", "layout") or (change == "heads" and n_heads == heads), (
        f"accepted a changed {change}"
    )
    if base == FAKE_CUDA:
        return check_cuda_within_cpu((res, err), call(args), ATTENTION_ARGS, lambda e: False,
                                     "qkv_attention_backward")  # fmt: skip
    assert res.shape == qkv.shape and res.dtype == dtype
    if res.numel() == 0:
        return
    x = qkv.detach().cpu().double().requires_grad_()
    (ref,) = torch.autograd.grad(attention_math_f64(x, heads), x, grad_out.cpu().double())
    close(res, ref, dtype if dtype != torch.float32 else torch.float16, "qkv_attention_backward")


# ---- the step ops ----

RULES = {"p_sample_step": "ancestral", "ddim_step": "ddim", "ddim_reverse_step": "reverse"}
MEAN = {
    "epsilon": ModelMeanType.EPSILON,
    "start_x": ModelMeanType.START_X,
    "previous_x": ModelMeanType.PREVIOUS_X,
}
VAR = {"fixed_small": ModelVarType.FIXED_SMALL, "fixed_large": ModelVarType.FIXED_LARGE,
       "learned": ModelVarType.LEARNED, "learned_range": ModelVarType.LEARNED_RANGE}  # fmt: skip
_DIFFUSIONS: dict = {}


def _diffusion(mean, var, steps):
    key = (mean, var, steps)
    if key not in _DIFFUSIONS:
        _DIFFUSIONS[key] = make_diffusion(MEAN[mean], VAR[var], steps=steps)
    return _DIFFUSIONS[key]


def fuzz_step(data, base="cpu", mixes=("meta",)):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    op = data.draw(st.sampled_from(sorted(RULES)))
    rule = RULES[op]
    mean = data.draw(st.sampled_from(sorted(MEAN)))
    var = data.draw(st.sampled_from(sorted(VAR)))
    d = _diffusion(mean, var, data.draw(st.sampled_from([40, 100])))
    learned = var in ("learned", "learned_range")
    B = data.draw(st.integers(0, 3))
    C = data.draw(st.integers(0, 3))
    spatial = data.draw(st.lists(st.integers(0, 3), max_size=2))
    x_shape = [B, C, *spatial]
    if 0 in x_shape[:1] + spatial and data.draw(st.booleans()):  # huge but empty
        C = data.draw(st.sampled_from([HUGE, 2**62]))
        x_shape[1] = C
    x_shape = choose(data, x_shape, x_shape[:1], [])
    x_dtype = choose(data, data.draw(st.sampled_from(FLOATS[:3])), *DTYPES)
    mo_dtype = choose(data, data.draw(st.sampled_from([x_dtype, torch.float32])), *DTYPES)
    mo_shape = list(x_shape)
    if len(mo_shape) >= 2 and learned and C < 2**62:
        mo_shape[1] *= 2
    if (
        data.draw(st.integers(0, 15)) == 0
        and mo_shape
        and math.prod(mo_shape[:-1]) * (mo_shape[-1] + 1) < 10**6
    ):
        mo_shape[-1] += 1
    mo_scale = {"learned": (-9.0, 0.0), "learned_range": (-1.0, 1.0)}.get(var)

    def mo_values(s):
        v = values(s, mo_dtype, gen)
        if mo_scale and len(s) >= 2 and s[1] and v.is_floating_point() and math.prod(s):
            lo, hi = mo_scale  # the variance half in its natural range
            v[:, s[1] // 2 :] = (torch.rand(v[:, s[1] // 2 :].shape, generator=gen) * (hi - lo) + lo).to(
                mo_dtype
            )
        return v

    x = make(data, x_shape, x_dtype, gen)
    mo = make(data, mo_shape, mo_dtype, gen, value_fn=mo_values)
    t_dtype = choose(data, data.draw(st.sampled_from([torch.int64, torch.int32])), *DTYPES)
    steps = d.num_timesteps
    in_range = data.draw(st.integers(0, 9)) > 0
    lo, hi = (0, steps) if in_range else (-1, steps + 2)

    def t_vals(s):
        return torch.randint(lo, hi, s, generator=gen)

    t = make(data, choose(data, (B,), (B, 1), ()), t_dtype, gen,
             value_fn=lambda s: t_vals(s).to(t_dtype) if t_dtype in (torch.int64, torch.int32)
             else values(s, t_dtype, gen))  # fmt: skip
    table = d.coef_table("cpu")
    table = choose(data, table, table.double(), table[:, :10], table[:0], table[0], table.t())
    table = relayout(data, table)
    noise = None
    if data.draw(st.booleans()):
        n_shape = choose(data, x_shape, x_shape[:-1])
        n_dtype = choose(data, x_dtype, *DTYPES)
        noise = make(data, n_shape, n_dtype, gen)
    sample_index = None
    if data.draw(st.booleans()):
        si_dtype = choose(data, data.draw(st.sampled_from([torch.int64, torch.int32])), torch.float32)
        sample_index = make(data, choose(data, (B,), (B + 1,)), si_dtype, gen)
    generator = data.draw(st.sampled_from([None, None, "base", "cpu"]))
    if generator is not None:
        on_base = generator == "base" and base != FAKE_CUDA  # no CUDA generator without a GPU
        generator = torch.Generator(device=base if on_base else "cpu").manual_seed(3)
    clip = data.draw(st.booleans())
    eta = choose(data, data.draw(st.sampled_from([0.0, 0.3, 1.0])), -0.5, 1.5, float("nan"), float("inf"))
    mean_name = choose(data, mean, "bogus")
    var_name = choose(data, var, "FIXED")
    ret_pred = data.draw(st.booleans())
    names = ("x", "model_output", "t", "table", "noise", "sample_index")
    devices = draw_devices(data, names, base, list(mixes))
    tensors = {
        "x": x,
        "model_output": mo,
        "t": t,
        "table": table,
        "noise": noise,
        "sample_index": sample_index,
    }

    def call(a, g=generator):
        head = (a["x"], a["model_output"], a["t"], a["table"], mean_name, var_name, clip)
        if op == "p_sample_step":
            return lambda: torch.ops.iddpm.p_sample_step(*head, a["noise"], g, ret_pred, a["sample_index"])
        if op == "ddim_step":
            return lambda: torch.ops.iddpm.ddim_step(*head, eta, a["noise"], g, ret_pred, a["sample_index"])
        return lambda: torch.ops.iddpm.ddim_reverse_step(*head, ret_pred)

    used = [n for n in names if tensors[n] is not None and (op != "ddim_reverse_step" or n in names[:4])]
    placed = {n: place(v, devices[n]) for n, v in tensors.items()}
    res, err = outcome(call(placed), STEP_ARGS)
    if len({devices[n] for n in used}) > 1:
        return assert_mix_refused(err, {n: devices[n] for n in used}, op)
    if devices["x"] == "meta":
        real = outcome(call({n: place(v, base) for n, v in tensors.items()}), STEP_ARGS)
        # The fakes leave the generator's device unchecked (meta stands for any device).
        strict = base == "cpu" and generator is None
        check_meta_agrees((res, err), real, _bad_timestep, op, strict=strict)
        return
    if base == FAKE_CUDA:
        return check_cuda_within_cpu((res, err), call(tensors), STEP_ARGS, _bad_timestep, op)
    if err is not None:
        return
    _check_step_result(res, d, rule, x, mo, t, clip, eta, noise, ret_pred, base, op)


def _check_step_result(res, d, rule, x, mo, t, clip, eta, noise, ret_pred, base, op):
    sample, pred = res
    assert sample.shape == x.shape and sample.dtype == x.dtype, f"{op}: sample {sample.shape} {sample.dtype}"
    assert pred.shape == (x.shape if ret_pred else (0,)), f"{op}: pred_xstart shape {pred.shape}"
    if x.numel() == 0:
        return
    tc = t.cpu().long()
    ok = (tc >= 0) & (tc < d.num_timesteps)
    assert base != "cpu" or bool(ok.all()), f"{op}: CPU accepted an out-of-range t"
    needs_noise = rule == "ancestral" or (rule == "ddim" and eta != 0)
    z = noise if noise is not None else (torch.zeros_like(x) if needs_noise else None)
    ref = reference_step64(d, rule, x.cpu(), mo.cpu(), tc.clamp(0, d.num_timesteps - 1), clip, eta,
                           z.cpu() if z is not None else None)  # fmt: skip
    shape = (-1,) + (1,) * (x.dim() - 1)
    bad = (~ok).view(shape).expand(x.shape)
    for name, got, want, check in (
        ("sample", sample, ref["sample"], noise is not None or not needs_noise),
        ("pred_xstart", pred, ref["pred_xstart"], ret_pred),
    ):
        if check:
            want = want.masked_fill(bad, float("nan"))  # CUDA: NaN for an out-of-range t
            close(got, want, x.dtype, f"{op} {name}")


# ---- group_norm_act ----

GROUP_NORM_ARGS = ("x", "num_groups", "weight", "bias", "scale", "shift", "eps", "silu")
_GN_TENSORS = ("x", "weight", "bias", "scale", "shift")


def _group_norm_inputs(data, gen):
    """(x, num_groups, weight, bias, scale, shift, eps, silu) for group_norm_act, most valid."""
    N = data.draw(st.sampled_from([0, 1, 2]))
    C = data.draw(st.sampled_from([1, 2, 4, 6, 8, 32]))
    spatial = list(data.draw(st.sampled_from([(), (3,), (2, 3), (4, 4), (1, 2, 2)])))
    if N == 0 and spatial and data.draw(st.booleans()):  # huge but empty
        spatial[0] = HUGE
    good_groups = data.draw(st.sampled_from([g for g in (1, 2, 4, 8) if C % g == 0]))
    groups = choose(data, good_groups, 0, -1, C + 1, 3 if C % 3 else 5, 2**63 - 1, -(2**63))
    x_shape = choose(data, (N, C, *spatial), (C,), ())
    dtype = choose(data, data.draw(st.sampled_from(FLOATS)), *DTYPES)
    x = make(data, x_shape, dtype, gen)

    def param(shape, bad_shapes):
        if data.draw(st.integers(0, 3)) == 0:
            return None
        p_dtype = choose(data, data.draw(st.sampled_from(FLOATS)), torch.int64, torch.bool)
        return make(data, choose(data, shape, *bad_shapes), p_dtype, gen, layout="contiguous")

    weight = param((C,), [(C + 1,), (C, 1)])
    bias = param((C,), [(1,), ()])
    scale = param((N, C), [(N,), (N, C + 1), (N + 1, C)])
    shift = param((N, C), [(C,), (N, C, 1)])
    eps = choose(data, data.draw(st.sampled_from([1e-5, 1e-6])), 0.0, -1e-5, math.inf, math.nan)
    silu = data.draw(st.booleans())
    return x, groups, weight, bias, scale, shift, eps, silu


def fuzz_group_norm_act(data, base="cpu", mixes=("meta",)):
    """iddpm::group_norm_act: x [N, C, *] (0-size and huge-but-empty dims, 1-D to 3-D spatial),
    group counts (0, negative, non-divisors, extremes), optional weight/bias [C] and
    scale/shift [N, C] of any dtype or a wrong shape, eps (0, negative, inf, NaN), silu."""
    from helpers.group_norm import oracle

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, groups, weight, bias, scale, shift, eps, silu = _group_norm_inputs(data, gen)
    tensors = {"x": x, "weight": weight, "bias": bias, "scale": scale, "shift": shift}
    drawn = draw_devices(data, _GN_TENSORS, base, list(mixes))
    devices = {n: d for n, d in drawn.items() if tensors[n] is not None}  # the tensors passed

    def call(dev):
        a = {n: place(t, dev.get(n, base)) for n, t in tensors.items()}
        return lambda: torch.ops.iddpm.group_norm_act(
            a["x"], groups, a["weight"], a["bias"], a["scale"], a["shift"], eps, silu
        )

    res, err = outcome(call(devices), GROUP_NORM_ARGS)
    if mixed(devices):
        return assert_mix_refused(err, devices, "group_norm_act")
    if devices["x"] == "meta":
        real = outcome(call({n: base for n in devices}), GROUP_NORM_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "group_norm_act", strict=base == "cpu")
        return
    if err is not None:
        return
    assert x.dim() >= 2 and 1 <= groups and x.shape[1] % groups == 0, (
        f"accepted groups={groups} for {x.shape}"
    )
    assert math.isfinite(eps) and eps > 0, f"accepted eps={eps}"
    if base == FAKE_CUDA:
        return check_cuda_within_cpu((res, err), call({n: "cpu" for n in devices}), GROUP_NORM_ARGS,
                                     lambda e: False, "group_norm_act")  # fmt: skip
    out, mean, rstd = res
    assert out.shape == x.shape and out.dtype == x.dtype
    assert mean.shape == rstd.shape == (x.shape[0], groups)
    if out.numel() == 0:
        return
    ref = oracle(
        x.cpu(), groups, *(None if t is None else t.cpu() for t in (weight, bias, scale, shift)), eps, silu
    )
    close(out, ref, x.dtype, "group_norm_act out")


GROUP_NORM_BWD_ARGS = (
    "grad_out",
    "x",
    "mean",
    "rstd",
    "num_groups",
    "weight",
    "bias",
    "scale",
    "shift",
    "silu",
)
_GN_BWD_TENSORS = ("grad_out", "x", "mean", "rstd", "weight", "bias", "scale", "shift")


def fuzz_group_norm_act_backward(data, base="cpu", mixes=("meta",)):
    """iddpm::group_norm_act_backward: the forward's inputs as above, the statistics of a valid
    forward (or of the wrong shape or dtype), grad_out of x's shape and dtype (or not); the
    gradients against float64 autograd of the oracle."""
    from helpers.group_norm import oracle

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, groups, weight, bias, scale, shift, _, silu = _group_norm_inputs(data, gen)
    G = groups if 1 <= groups <= 64 else 1
    N = x.shape[0] if x.dim() else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = choose(data, (N, G), (N,), (N, G + 1), (N + 1, G))
    stat_dtype = choose(data, acc, torch.float16, torch.int64)
    mean = make(data, stat_shape, stat_dtype, gen, layout="contiguous")
    rstd = make(data, stat_shape, stat_dtype, gen, layout="contiguous",
                value_fn=lambda sh: values(sh, stat_dtype, gen).abs() + 0.5 if stat_dtype.is_floating_point
                else values(sh, stat_dtype, gen))  # fmt: skip
    real_stats = False
    try:  # the real statistics where the forward takes these inputs
        _, m, r = torch.ops.iddpm.group_norm_act(x, groups, weight, bias, scale, shift, 1e-5, silu)
        if stat_shape == (N, G) and stat_dtype == acc:
            mean, rstd, real_stats = m, r, True
    except CLEAN:
        pass
    grad_out = make(data, choose(data, tuple(x.shape), (1,), tuple(x.shape) + (1,)),
                    choose(data, x.dtype, torch.float32, torch.float64), gen)  # fmt: skip
    tensors = {"grad_out": grad_out, "x": x, "mean": mean, "rstd": rstd, "weight": weight, "bias": bias,
               "scale": scale, "shift": shift}  # fmt: skip
    drawn = draw_devices(data, _GN_BWD_TENSORS, base, list(mixes))
    devices = {n: d for n, d in drawn.items() if tensors[n] is not None}

    def call(dev):
        a = {n: place(t, dev.get(n, base)) for n, t in tensors.items()}
        return lambda: torch.ops.iddpm.group_norm_act_backward(
            a["grad_out"], a["x"], a["mean"], a["rstd"], groups,
            a["weight"], a["bias"], a["scale"], a["shift"], silu,
        )  # fmt: skip

    res, err = outcome(call(devices), GROUP_NORM_BWD_ARGS)
    if mixed(devices):
        return assert_mix_refused(err, devices, "group_norm_act_backward")
    if devices["x"] == "meta":
        real = outcome(call({n: base for n in devices}), GROUP_NORM_BWD_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "group_norm_act_backward", strict=base == "cpu")
        return
    if err is not None:
        return
    assert x.dim() >= 2 and 1 <= groups and x.shape[1] % groups == 0, f"accepted groups={groups}"
    assert grad_out.shape == x.shape and grad_out.dtype == x.dtype, "accepted a grad_out unlike x"
    if base == FAKE_CUDA:
        return check_cuda_within_cpu((res, err), call({n: "cpu" for n in devices}), GROUP_NORM_BWD_ARGS,
                                     lambda e: False, "group_norm_act_backward")  # fmt: skip
    dx = res[0]
    assert dx.shape == x.shape and dx.dtype == x.dtype
    if x.numel() == 0 or not real_stats:
        return
    # The oracle's gradients where the statistics are x's own (else only shapes were checked).
    xs = [None if t is None else t.cpu().double().requires_grad_() for t in (x, weight, bias, scale, shift)]
    y = oracle(xs[0], groups, *xs[1:], 1e-5, silu)
    grads = torch.autograd.grad(y, [t for t in xs if t is not None], grad_out.cpu().double())
    close(dx, grads[0], x.dtype, "group_norm_act_backward grad_x")


# ---- Winograd 3×3 convolution ----

WINOGRAD_ARGS = ("x", "weight", "weight_t", "bias", "residual")
_WINOGRAD_TENSORS = ("x", "weight_t", "bias", "residual")


def _dims(data, sizes):
    return tuple(data.draw(st.sampled_from(s)) for s in sizes)


# G of F(2×2, 3×3) and F(4×4, 3×3) (common/winograd_params.h)
_WINOGRAD_G = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, -1 / 3], [-16 / 15, -8 / 15, -4 / 15],
        [1 / 15, -2 / 15, 4 / 15], [0, 0, 1]],
}  # fmt: skip


def fuzz_winograd_weight(data, base="cpu", mixes=("meta",)):
    """iddpm::winograd_weight: weight [Cout, Cin, 3, 3] (0-size and huge-but-empty dims, other
    kernel sizes and ranks, any dtype and layout), plain or packed, tile 2, 4 (F(4×4, 3×3), float32
    only) or a bad one, flipped or not, against G g Gᵀ in float64 (of g rotated by 180° with flip)."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    cout, cin = _dims(data, ([0, 1, 5, 16, 32], [0, 1, 2, 3, 17]))
    packed = data.draw(st.booleans())
    tile = choose(data, 2, 4, 3, 0)
    flip = data.draw(st.booleans())
    if 0 in (cout, cin) and data.draw(st.booleans()):
        cout, cin = (HUGE, cin) if cout == 0 and cin else (cout, HUGE) if cin == 0 and cout else (cout, cin)
    shape = choose(data, (cout, cin, 3, 3), (cout, cin, 3), (cout, cin, 5, 5), (cout, cin, 3, 1), (3, 3))
    good = data.draw(st.sampled_from(WINOGRAD_DTYPES))
    dtype = choose(data, good, *[d for d in DTYPES if d not in WINOGRAD_DTYPES])
    weight = make(data, shape, dtype, gen)
    device = data.draw(st.sampled_from([base, *mixes]))
    names = ("weight", "tile", "packed")
    op = torch.ops.iddpm.winograd_weight
    res, err = outcome(lambda: op(place(weight, device), packed, tile, flip), names)
    if device == "meta":
        real = outcome(lambda: op(place(weight, base), packed, tile, flip), names)
        check_meta_agrees((res, err), real, lambda e: False, "winograd_weight", strict=base == "cpu")
        return
    assert device != FAKE_CUDA or err is not None, "winograd_weight accepted a CUDA weight (CPU kernel only)"
    if err is not None:
        return
    assert tuple(weight.shape[2:]) == (3, 3) and weight.dim() == 4
    assert weight.dtype in WINOGRAD_DTYPES, f"winograd_weight accepted {weight.dtype}"
    assert tile in (2, 4) and (tile == 2 or (weight.dtype == torch.float32 and not packed)), f"tile {tile}"
    points = (tile + 2) ** 2
    if packed:
        assert _packable(weight.shape[1], weight.shape[0], weight.dtype), f"packed {tuple(weight.shape)}"
        assert res.shape == (16, weight.shape[0] // 32, weight.shape[1] // 2, 64)
        res = _unpack(res, weight.shape[1])
    assert res.shape == (points, weight.shape[1], weight.shape[0]) and res.dtype == weight.dtype
    assert res.device.type == "cpu", f"winograd_weight ran on {res.device} (it has a CPU kernel only)"
    if res.numel() == 0:
        return
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64)
    filters = weight.double().flip(2, 3) if flip else weight.double()
    ref = torch.einsum("ij,ocjk,lk->ilco", g, filters, g).reshape(points, *res.shape[1:])
    close(res, ref, weight.dtype, "winograd_weight")


def fuzz_conv3x3_winograd(data, base="cpu", mixes=("meta",)):
    """iddpm::conv3x3_winograd: x [N, Cin, H, W] (0-size, huge-but-empty, odd and 1-pixel maps,
    any layout and dtype), weight_t = winograd_weight(w) (F(2×2), packed, or F(4×4) for float32) or
    of a wrong shape or dtype, optional
    bias [Cout] and residual [N, Cout, H, W] (or wrong); against float64 conv2d(x, w, bias,
    padding=1) + residual."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    N, cin, cout, H, W = _dims(data, ([0, 1, 2], [0, 1, 3, 16], [0, 1, 4, 17, 32], [0, 1, 2, 5], [1, 3, 4]))
    if data.draw(st.integers(0, 9)) == 0:  # huge-but-empty: a huge dim next to an empty one
        N, H = (0, HUGE) if data.draw(st.booleans()) else (N, 0)
        cout = HUGE if H == 0 and data.draw(st.booleans()) else cout
    x_shape = choose(data, (N, cin, H, W), (N, cin, H), (cin, H, W, N, 1))
    x_dtype = choose(
        data, data.draw(st.sampled_from(WINOGRAD_DTYPES)), torch.float64, torch.float16, torch.int64
    )
    x = make(data, x_shape, x_dtype, gen)
    # the weight in x's dtype where the op takes it (most draws), else float32 (a mismatch)
    w_dtype = x_dtype if x_dtype == torch.bfloat16 and data.draw(st.integers(0, 4)) else torch.float32
    w = values((cout, cin, 3, 3), w_dtype, gen) if cout * cin <= 10**5 else None
    if w is not None and data.draw(st.integers(0, 9)):
        packed = _packable(cin, cout, w.dtype) and data.draw(st.booleans())
        tile = 4 if not packed and w.dtype == torch.float32 and data.draw(st.booleans()) else 2
        weight_t = torch.ops.iddpm.winograd_weight(w, packed, tile)
    else:
        wt_shape = choose(
            data, (16, cin, cout), (9, cin, cout), (16, cin + 1, cout), (16, cin), (16, 1, cin // 2, 64),
            (16, 1, cin // 2 + 1, 64), (16, 1, cin // 2, 32), (36, cin, cout), (25, cin, cout),
            (36, 1, cin // 2, 64),
        )  # fmt: skip
        wt_dtype = choose(data, torch.float32, torch.bfloat16, torch.float64)
        weight_t = make(data, wt_shape, wt_dtype, gen, layout="contiguous")
        w = None  # no oracle for a drawn weight_t
    bias = None
    if data.draw(st.booleans()):
        bias = make(
            data,
            choose(data, (cout,), (cout + 1,), (1, cout)),
            choose(data, x_dtype, torch.float32, torch.bfloat16),
            gen,
        )
    residual = None
    if data.draw(st.booleans()):
        r_shape = choose(data, (N, cout, H, W), (N, cout, H, W + 1), (N, cout, H))
        residual = make(data, r_shape, choose(data, x_dtype, torch.float32, torch.float64), gen)
    tensors = {"x": x, "weight_t": weight_t, "bias": bias, "residual": residual}
    drawn = draw_devices(data, _WINOGRAD_TENSORS, base, list(mixes))
    devices = {n: d for n, d in drawn.items() if tensors[n] is not None}

    def call(dev):
        a = {n: place(t, dev.get(n, base)) for n, t in tensors.items()}
        return lambda: torch.ops.iddpm.conv3x3_winograd(a["x"], a["weight_t"], a["bias"], a["residual"])

    res, err = outcome(call(devices), WINOGRAD_ARGS)
    if mixed(devices):
        return assert_mix_refused(err, devices, "conv3x3_winograd")
    if devices["x"] == "meta":
        real = outcome(call({n: base for n in devices}), WINOGRAD_ARGS)
        check_meta_agrees((res, err), real, lambda e: False, "conv3x3_winograd", strict=base == "cpu")
        return
    assert FAKE_CUDA not in devices.values() or err is not None, "conv3x3_winograd accepted CUDA tensors"
    if err is not None:
        return
    assert x.dim() == 4 and x.dtype in WINOGRAD_DTYPES, f"accepted x {x.dtype} {tuple(x.shape)}"
    for name, t in (("bias", bias), ("residual", residual)):
        assert t is None or t.dtype == x.dtype, f"accepted {name} {t.dtype} with x {x.dtype}"
    assert res.device.type == "cpu", f"conv3x3_winograd ran on {res.device} (it has a CPU kernel only)"
    assert weight_t.dtype == x.dtype
    if weight_t.dim() == 4:  # packed: [16, Cout/32, Cin/2, 64]
        assert _packable(x.shape[1], weight_t.shape[1] * 32, x.dtype), f"packed {tuple(weight_t.shape)}"
        assert tuple(weight_t.shape) == (16, weight_t.shape[1], x.shape[1] // 2, 64)
        out_channels = weight_t.shape[1] * 32
    else:  # [16, Cin, Cout], or F(4×4)'s [36, Cin, Cout] (float32)
        assert weight_t.shape[0] == 16 or (weight_t.shape[0] == 36 and x.dtype == torch.float32)
        assert weight_t.dim() == 3 and weight_t.shape[1] == x.shape[1], tuple(weight_t.shape)
        out_channels = weight_t.shape[2]
    assert res.shape == (x.shape[0], out_channels, *x.shape[2:]) and res.dtype == x.dtype
    if res.numel() == 0 or w is None:
        return
    if x.shape[1] == 0:  # an empty sum (torch's conv2d returns a 0-channel tensor there)
        ref = torch.zeros(res.shape, dtype=torch.float64) + (
            0 if bias is None else bias.double()[:, None, None]
        )
    else:
        ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
    if residual is not None:
        ref = ref + residual.double()
    close(res, ref, x.dtype, "conv3x3_winograd")
