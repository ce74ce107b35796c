"""In-kernel Philox noise of the fused steps (CPU): the algorithm against the Random123
known answers and a numpy re-implementation, seeding and reproducibility, statistics."""

import numpy as np
import pytest
import torch

import iddpm_ext.ops as ops
from helpers.oracles import cpu_generator_key, philox4x32_10, philox_normals
from helpers.step_cases import make_diffusion, noise_probe, probe_noise

pytestmark = pytest.mark.kernels


def test_numpy_philox_matches_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, expected in cases:
        got = philox4x32_10([np.uint64(c) for c in ctr], *key)
        assert [int(v) for v in got] == list(expected)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_noise_is_philox_box_muller_keyed_by_the_generator(x_dtype):
    d, x, mo, t = noise_probe(shape=(3, 2, 5, 7), x_dtype=x_dtype)
    g = torch.Generator().manual_seed(2024)
    key = cpu_generator_key(g)
    z = probe_noise(d, x, mo, t, generator=g)
    expected = torch.from_numpy(philox_normals(key, 0, z.numel())).view(z.shape).to(x_dtype)
    tol = 2e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(z, expected, rtol=tol, atol=tol)
    # The generator moved by exactly one 64-bit draw.
    assert cpu_generator_key(g) != key
    copy = torch.Generator().manual_seed(2024)
    torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=copy)
    assert torch.equal(copy.get_state(), g.get_state())


def test_noise_follows_memory_order_for_channels_last():
    d, x, mo, t = noise_probe(shape=(2, 3, 4, 5))
    g = torch.Generator().manual_seed(7)
    key = cpu_generator_key(g)
    cl = torch.channels_last
    z = probe_noise(d, x.to(memory_format=cl), mo.to(memory_format=cl), t, generator=g)
    assert z.is_contiguous(memory_format=cl)
    expected = philox_normals(key, 0, z.numel())
    got = z.permute(0, 2, 3, 1).reshape(-1).numpy()  # memory order: b, h, w, c
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_default_generator_and_reproducibility():
    d, x, mo, t = noise_probe()
    torch.manual_seed(5)
    key = cpu_generator_key(torch.default_generator)
    a = probe_noise(d, x, mo, t)
    b = probe_noise(d, x, mo, t)
    torch.manual_seed(5)
    a2 = probe_noise(d, x, mo, t)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)
    np.testing.assert_allclose(a.reshape(-1).numpy(), philox_normals(key, 0, a.numel()), rtol=2e-5, atol=2e-5)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (9, 9, 10))
    n1, n2, n3 = (probe_noise(d, x, mo, t, generator=g) for g in (g1, g2, g3))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)


def test_no_noise_where_t_is_zero():
    d, x, mo, t = noise_probe(shape=(4, 3, 4, 4))
    t = torch.tensor([0, 4, 0, 9])
    z = probe_noise(d, x, mo, t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z[0], torch.zeros_like(z[0])) and torch.equal(z[2], z[0])
    assert (z[1] != 0).all() and (z[3] != 0).all()


def _corr(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_noise_statistics():
    d, x, mo, t = noise_probe(shape=(64, 3, 32, 32))
    g = torch.Generator().manual_seed(31337)
    z1 = probe_noise(d, x, mo, t, generator=g)
    z2 = probe_noise(d, x, mo, t, generator=g)  # the next step
    n = z1.numel()
    se = 1 / n**0.5
    flat = z1.reshape(-1).double()
    assert abs(flat.mean().item()) < 5 * se
    assert abs(flat.var().item() - 1) < 5 * 2**0.5 * se
    # Each of the four lanes of a Philox draw is N(0, 1) on its own.
    lanes = flat.view(-1, 4)
    for r in range(4):
        assert abs(lanes[:, r].mean().item()) < 10 * se
        assert abs(lanes[:, r].var().item() - 1) < 10 * 2**0.5 * se
    # Tails as N(0, 1): P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027.
    for k, p in ((2, 0.04550), (3, 0.00270)):
        frac = (flat.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5
    # No correlation between consecutive steps, batch items, or neighbouring elements.
    bound = 5 * se
    assert abs(_corr(z1, z2)) < bound
    assert abs(_corr(z1[:-1], z1[1:])) < 5 / (z1[1:].numel() ** 0.5)
    assert abs(_corr(flat[:-1], flat[1:])) < bound
    assert abs(_corr(flat[:-4], flat[4:])) < bound
    assert abs(_corr(lanes[:, 0], lanes[:, 1])) < 10 * se  # the two outputs of one Box–Muller


def test_sampling_loop_with_a_generator_reproduces():
    d = make_diffusion(steps=200, respacing="ddim10")

    def model(x, t, **kwargs):
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)

    runs = [
        d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    ddim = [
        d.ddim_sample_loop(model, (2, 3, 4, 4), eta=1.0, generator=torch.Generator().manual_seed(s))
        for s in (3, 3)
    ]
    assert torch.equal(ddim[0], ddim[1])


# ---- per-sample streams (sample_index) ------------------------------------------------------


def _split_probe(rule, shape, parts, layout=None, x_dtype=torch.float32, seed=11, as_int=False):
    """The in-kernel noise of a batch of shape[0] samples computed as one call and as calls
    over ``parts`` (lists of global indices), each from a generator seeded alike."""
    d, x, mo, t = noise_probe(shape=shape, x_dtype=x_dtype)
    if layout is not None:
        x, mo = x.to(memory_format=layout), mo.to(memory_format=layout)
    table = d.coef_table("cpu")

    def noise(items, index):
        g = torch.Generator().manual_seed(seed)
        args = (x[items], mo[items], t[items], table, d.model_mean_type, d.model_var_type, False)
        if rule == "ancestral":
            out, _ = ops.p_sample_step(*args, generator=g, sample_index=index, return_pred_xstart=False)
        else:  # DDIM with eta = 1 at t = 5: sample = x0·a + b·eps + σ·z, x0 = eps = 0
            out, _ = ops.ddim_step(*args, eta=1.0, generator=g, sample_index=index, return_pred_xstart=False)
        return out

    whole = noise(list(range(shape[0])), None)
    pieces = []
    for items in parts:
        index = items[0] if as_int else torch.tensor(items)
        pieces.append((items, noise(items, index)))
    return d, whole, pieces


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (6, 3, 5, 7), (6, 1, 3)], ids=["L%4=0", "L%4=1", "L=3"])
@pytest.mark.parametrize("rule", ["ancestral", "ddim"])
def test_kernel_noise_per_sample_streams_do_not_depend_on_the_batch_split(shape, rule):
    _, whole, pieces = _split_probe(rule, shape, [[0, 1, 2], [3, 4, 5]])
    for items, part in pieces:
        assert torch.equal(part, whole[items])  # bit for bit
    _, whole_i, pieces_i = _split_probe(rule, shape, [[0, 1, 2], [3, 4, 5]], as_int=True)
    assert torch.equal(whole_i, whole)
    for (_, part), (_, part_i) in zip(pieces, pieces_i):
        assert torch.equal(part_i, part)  # an int k means samples k .. k+B-1
    # Any order and any subset: each item takes its own sample's stream.
    _, _, shuffled = _split_probe(rule, shape, [[5, 0, 3], [2], [4, 1]])
    for items, part in shuffled:
        assert torch.equal(part, whole[items])


@pytest.mark.parametrize(
    "layout,x_dtype", [(torch.channels_last, torch.float32), (None, torch.float16), (None, torch.bfloat16)]
)
def test_kernel_noise_per_sample_streams_in_other_layouts_and_dtypes(layout, x_dtype):
    _, whole, pieces = _split_probe(
        "ancestral", (6, 3, 3, 5), [[0, 1, 2], [3, 4, 5]], layout=layout, x_dtype=x_dtype
    )
    for items, part in pieces:
        assert torch.equal(part, whole[items])
        if layout is not None:
            assert part.is_contiguous(memory_format=layout)


def test_kernel_noise_of_a_sample_is_its_run_of_the_philox_sequence():
    """Item b with sample index n takes Philox elements n*C*S .. n*C*S + C*S - 1 (memory
    order within the sample), also for indices beyond 32 bits of elements; int32 indices
    equal int64 ones; None equals arange(B)."""
    d, x, mo, t = noise_probe(shape=(3, 2, 5, 7))
    L = 2 * 5 * 7
    index = torch.tensor([7, 0, 2**40 + 3])
    g = torch.Generator().manual_seed(77)
    key = cpu_generator_key(g)
    z = probe_noise(d, x, mo, t, generator=g, sample_index=index)
    for b, n in enumerate(index.tolist()):
        expected = philox_normals(key, 0, L, first=n * L)
        np.testing.assert_allclose(z[b].reshape(-1).numpy(), expected, rtol=2e-5, atol=2e-5)
    g = torch.Generator().manual_seed(77)
    small = torch.tensor([7, 0, 3])
    z_small = probe_noise(d, x, mo, t, generator=g, sample_index=small)
    assert torch.equal(z_small[:2], z[:2])
    g = torch.Generator().manual_seed(77)
    assert torch.equal(probe_noise(d, x, mo, t, generator=g, sample_index=small.int()), z_small)
    g = torch.Generator().manual_seed(77)
    plain = probe_noise(d, x, mo, t, generator=g)
    g = torch.Generator().manual_seed(77)
    assert torch.equal(probe_noise(d, x, mo, t, generator=g, sample_index=torch.arange(3)), plain)


def test_sample_index_is_unused_with_explicit_noise_and_checked():
    d, x, mo, t = noise_probe(shape=(2, 3, 4, 4))
    noise = torch.randn(x.shape)
    a = probe_noise(d, x, mo, t, noise=noise)
    b = probe_noise(d, x, mo, t, noise=noise, sample_index=torch.tensor([9, 4]))
    assert torch.equal(a, b) and torch.equal(a, noise)
    with pytest.raises(ValueError, match=r"^sample_index: expected shape \[2\] \(one global"):
        probe_noise(d, x, mo, t, sample_index=torch.arange(3))
    with pytest.raises(ValueError, match=r"^sample_index: expected an integer tensor"):
        probe_noise(d, x, mo, t, sample_index=torch.zeros(2))
    with pytest.raises(ValueError, match=r"^sample_index: expected None, an int"):
        probe_noise(d, x, mo, t, sample_index=1.5)
