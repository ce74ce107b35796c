"""iddpm::winograd_weight(weight, packed=True) and iddpm::conv3x3_winograd on the packed bf16 weight
(csrc/cpu/winograd_packed.cpp: VDPBF16PS GEMMs per L2-sized block of tiles, products kept in
float32): the packing's layout against its definition, the conv against float64 (within 4× of
torch's bf16 conv error, as the plain bf16 path, and no worse than the plain path by more than a
bf16 rounding), exact where every rounding is (odd maps, 12-row micro-tile tails, several tile
blocks), NaN stored as 0x7FC0, opcheck, argument errors on CPU and meta, and iddpm_ext.nn's use of
it (on by default where the CPU runs it, switchable off). The kernel needs AVX512-BF16: on CPUs
without it only the refusals are tested."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import iddpm_ext.nn as N
from iddpm_ext.ops import winograd as WG

from .test_winograd import _case, _err, _int_case, _oracle

pytestmark = pytest.mark.kernels

conv = torch.ops.iddpm.conv3x3_winograd
wweight = torch.ops.iddpm.winograd_weight

needs_packed = pytest.mark.skipif(
    not WG.packed_available(), reason="this CPU has no AVX512-BF16: the packed bf16 conv does not run here"
)


def _bf16(*tensors):
    return [None if t is None else t.bfloat16() for t in tensors]


def test_capability_is_a_bool():
    assert isinstance(WG.packed_available(), bool)


@needs_packed
def test_packing_layout():
    """u_packed[k][nb][p][2j + h] = U[k][2p + h][32 nb + j] (common/winograd_params.h)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 6, 3, 3, generator=g).bfloat16()
    u, up = wweight(w), wweight(w, True)
    assert up.shape == (16, 2, 3, 64) and up.dtype == torch.bfloat16
    expected = u.view(16, 3, 2, 2, 32).permute(0, 3, 1, 4, 2).reshape(16, 2, 3, 64)
    assert torch.equal(up, expected)
    assert torch.equal(wweight(w.contiguous(memory_format=torch.channels_last), packed=True), up)


CASES = [
    # N, Cin, Cout, H, W: odd maps, one tile, a micro-tile tail (tiles not a multiple of 12), rows
    # in several blocks (Cin = 512: 24 tiles per block), a single column block and several
    (2, 32, 64, 8, 8),
    (3, 2, 32, 5, 7),
    (1, 16, 32, 2, 2),
    (1, 64, 96, 1, 1),
    (2, 512, 32, 9, 11),
    (2, 128, 128, 16, 16),
]


@needs_packed
@pytest.mark.parametrize("N_, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize(
    "bias, residual, cl", [(True, False, True), (False, True, False), (True, True, True)]
)
def test_matches_float64_within_4x_torch_bf16_error(N_, Cin, Cout, H, W, bias, residual, cl):
    x, w, b, r = _bf16(*_case(N_, Cin, Cout, H, W, bias, residual, cl))
    y = conv(x, wweight(w, True), b, r)
    ref = _oracle(x, w, b, r)
    assert y.shape == (N_, Cout, H, W) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch_err = _err(F.conv2d(x, w, b, 1, 1) + (0 if r is None else r), ref)
    assert _err(y, ref) <= 4 * max(torch_err, 2.0**-9), (_err(y, ref), torch_err)
    # the plain path rounds the GEMMs' products to bf16 as well: the packed one is no less accurate
    # (up to one rounding of the output)
    plain = conv(x, wweight(w), b, r)
    assert _err(y, ref) <= _err(plain, ref) + 2.0**-8


@needs_packed
@pytest.mark.parametrize(
    "N_, Cin, Cout, H, W", [(2, 18, 32, 7, 9), (1, 2, 64, 1, 1), (3, 38, 32, 2, 3), (2, 64, 32, 23, 24)]
)
def test_exact_where_every_rounding_is(N_, Cin, Cout, H, W):
    """Small integers (tests/ops/test_winograd.py's _int_case): every step exact, so the result is
    the exact convolution, bit for bit — the indexing of tiles, blocks, micro-tile tails, column
    blocks and odd edges, independently of any error bound."""
    x, w, b, r = _int_case(N_, Cin, Cout, H, W)
    expected = _oracle(x, w, b, r)
    assert expected.abs().max() <= 256
    y = conv(*_bf16(x, wweight(w.bfloat16(), True), b, r))
    assert torch.equal(y.double(), expected)


@needs_packed
def test_nan_is_stored_as_0x7fc0():
    x, w, b, r = _bf16(*_case(2, 8, 32, 6, 5, residual=True))
    x[1, 3, 2, 3] = float("nan")
    x[0, 7, 0, 0] = x[0, 7, 2, 0] = float("inf")  # inf - inf in a transform: x86's negative NaN
    y = conv(x, wweight(w, True), b, r)
    assert y[0].isnan().any() and y[1].isnan().any()
    assert set(y.view(torch.int16)[y.isnan()].tolist()) == {0x7FC0}
    plain = conv(x, wweight(w), b, r)
    assert torch.equal(y.isnan(), plain.isnan())


@needs_packed
def test_opcheck():
    x, w, b, r = _bf16(*_case(2, 8, 32, 5, 6, residual=True))
    torch.library.opcheck(wweight.default, (w, True))
    up = wweight(w, True)
    torch.library.opcheck(conv.default, (x, up, b, r))
    torch.library.opcheck(conv.default, (x.contiguous(), up, None, None))


def _weight_errors():
    bf = torch.bfloat16
    errors = [
        (torch.zeros(32, 4, 3, 3), "weight: the packed form is bf16 only, got float32"),
        (
            torch.zeros(32, 5, 3, 3, dtype=bf),
            "weight: the packed form needs an even Cin and a Cout that is a multiple of 32, "
            "got Cin = 5, Cout = 32",
        ),
        (torch.zeros(48, 4, 3, 3, dtype=bf), "Cin = 4, Cout = 48"),
    ]
    if not WG.packed_available():
        errors.append((torch.zeros(32, 4, 3, 3, dtype=bf), "the packed form needs a CPU with AVX512-BF16"))
    return errors


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_weight_errors(device):
    for w, match in _weight_errors():
        with pytest.raises(ValueError, match=match):
            wweight(w.to(device), True)


@needs_packed
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv_errors_name_the_argument(device):
    x, w, b, r = _bf16(*_case(2, 8, 32, 5, 5, residual=True))
    up = wweight(w, True)  # [16, 1, 4, 64]
    bad = [
        (
            dict(weight_t=up[:, :, :3]),
            r"weight_t: expected shape \[16, Cout/32, 4, 64\] .*got \[16, 1, 3, 64\]",
        ),
        (dict(weight_t=up[..., :32]), r"weight_t: expected shape \[16, Cout/32, 4, 64\]"),
        (dict(weight_t=up.float()), r"weight_t: expected dtype bfloat16 \(that of x\), got float32"),
        (
            dict(bias=torch.zeros(31).bfloat16()),
            r"bias: expected shape \[32\] \(\[Cout\] of weight_t\), got \[31\]",
        ),
    ]
    for kw, match in bad:
        args = {**dict(x=x, weight_t=up, bias=b, residual=r), **kw}
        args = {k: v.to(device) for k, v in args.items()}
        with pytest.raises(ValueError, match=match):
            conv(*args.values())
    # fp32 x with a packed weight: the dtype check comes first, as for the plain weight
    args = {k: v.to(device) for k, v in dict(x=x.float(), weight_t=up).items()}
    with pytest.raises(ValueError, match=r"weight_t: expected dtype float32 \(that of x\), got bfloat16"):
        conv(*args.values())


@needs_packed
def test_nn_uses_the_packed_weight_and_can_switch_it_off():
    """iddpm_ext.nn's Winograd bf16 convs cache the packed weight by default (where packable) and
    the plain one with set_conv_winograd_packed(False); both give the conv within bf16 error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 48, 3, padding=1))
    x = torch.randn(2, 64, 16, 16).bfloat16()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        model = N.set_conv_prepack(model.bfloat16(), "bf16")
        outs = {}
        previous = N.set_conv_winograd_packed(True)
        try:
            with N.conv_winograd("on"):
                for packed in (True, False):
                    N.set_conv_winograd_packed(packed)
                    N.clear_conv_prepack(model)
                    outs[packed] = model(x)
                    entries = [conv.__dict__["forward"].entries for conv in model]
                    bf = torch.bfloat16
                    first = ("winograd", bf, "packed") if packed else ("winograd", bf, 2)
                    assert [list(e) for e in entries] == [[first], [("winograd", bf, 2)]]
                    dims = [[entry[1].dim() for entry in e.values()] for e in entries]
                    # the 64 -> 64 conv packs (Cout a multiple of 32), the 64 -> 48 one cannot
                    assert dims == ([[4], [3]] if packed else [[3], [3]]), dims
        finally:
            N.set_conv_winograd_packed(previous)
    for y in outs.values():
        assert _err(y, ref) <= 2e-2
    with pytest.raises(ValueError, match="enabled: expected True or False"):
        N.set_conv_winograd_packed("yes")


@needs_packed
def test_same_bits_for_any_blocking_and_thread_count():
    """Each tile's sums run in the same order however the tiles are cut into blocks (one block per
    thread or L2-sized ones): 1, 2 and 3 threads give the same bits."""
    x, w, b, r = _bf16(*_case(3, 64, 64, 13, 11, residual=True, seed=4))
    up = wweight(w, True)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(conv(x, up, b, r))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(outs[0].view(torch.int16), o.view(torch.int16)) for o in outs[1:])


def test_switch_context_restores_the_setting():
    previous = N.set_conv_winograd_packed(True)
    try:
        with N.conv_winograd_packed(False):
            assert N.set_conv_winograd_packed(False) is False  # (the setting inside)
        assert N.set_conv_winograd_packed(True) is True
        with pytest.raises(RuntimeError, match="boom"), N.conv_winograd_packed(False):
            raise RuntimeError("boom")
        assert N.set_conv_winograd_packed(True) is True
    finally:
        N.set_conv_winograd_packed(previous)


@needs_packed
def test_empty_batch():
    x, w, b, r = _bf16(*_case(0, 8, 32, 5, 5, residual=True))
    y = conv(x, wweight(w, True), b, r)
    assert y.shape == (0, 32, 5, 5) and y.dtype == torch.bfloat16


def test_environment_variable(monkeypatch):
    """IDDPM_WINOGRAD_PACKED: 1/0 and the other switches' aliases; a typo is a clear error."""
    for raw, expected in (
        ("0", False),
        ("off", False),
        ("false", False),
        ("1", True),
        ("yes", True),
        ("", True),
    ):
        monkeypatch.setenv("IDDPM_WINOGRAD_PACKED", raw)
        assert N._winograd_packed_from_env() is expected, raw  # noqa: SLF001
    monkeypatch.delenv("IDDPM_WINOGRAD_PACKED")
    assert N._winograd_packed_from_env() is True  # noqa: SLF001
    monkeypatch.setenv("IDDPM_WINOGRAD_PACKED", "maybe")
    with pytest.raises(
        ValueError, match="IDDPM_WINOGRAD_PACKED: expected 1 or 0 \\(or unset\\), got 'maybe'"
    ):
        N._winograd_packed_from_env()  # noqa: SLF001
