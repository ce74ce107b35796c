"""Op graphs (iddpm_ext.engine.op_graph), the CPU's graph capture: a model's forward replayed
from its recorded op calls gives the eager forward's bits (plain, to_inference fp32 / bf16 with
the Winograd convs forced on, under autocast, class-conditional), one graph per input signature,
captured again after an in-place weight change, eager where it cannot replay (grad, tracing);
and the sampling engine's mode "graph" on the CPU: the eager engine's samples, bit for bit."""

import copy
import warnings

import pytest
import torch

import iddpm_ext.engine.op_graph as og
from helpers.engine_cases import diffusion, reference_loop, tiny_model
from iddpm_ext.engine import SamplingEngine, capture_forward
from iddpm_ext.engine.op_graph import OpGraph, OpGraphBackend
from iddpm_ext.nn import conv_winograd

pytestmark = pytest.mark.kernels

SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _inputs(batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def _check_replays(fn, captured, x, t, **kwargs):
    """Eager result, then the captured callable three times (capture, two replays): all equal."""
    with torch.no_grad():
        want = fn(x, t, **kwargs)
        outs = [captured(x, t, **kwargs) for _ in range(3)]
    for out in outs:
        assert out.dtype == want.dtype and out.shape == want.shape
        assert torch.equal(out, want)
    return want


@pytest.mark.parametrize("form", ["plain", "inference-fp32", "inference-bf16"])
def test_captured_forward_gives_the_eager_bits(model, form):
    dtype = torch.bfloat16 if form == "inference-bf16" else torch.float32
    m = copy.deepcopy(model)
    if form != "plain":
        m = m.to_inference(dtype)
    x, t = _inputs(dtype=dtype)
    if form != "plain":
        x = x.contiguous(memory_format=torch.channels_last)
    with conv_winograd("on"):  # the tiny model's 8x8 maps: the Winograd convs only when forced
        cf = capture_forward(m)
        _check_replays(m, cf, x, t)
    assert cf.stats == {"captures": 1, "replays": 2, "eager": 0}
    graph = next(iter(cf._graphs.values())).graph
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "iddpm.group_norm_act.default" in targets
    if form != "plain":
        assert "iddpm.conv3x3_winograd.default" in targets  # the fast paths' kernels are in the graph


def test_captured_forward_under_autocast_and_with_class_labels():
    m = tiny_model(num_classes=5, seed=1)
    cf = capture_forward(m)
    x, t = _inputs()
    y = torch.tensor([0, 4])
    _check_replays(m, cf, x, t, y=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _check_replays(m, cf, x, t, y=y)
    assert want.dtype == torch.bfloat16
    assert cf.stats["captures"] == 2  # autocast on/off: two signatures, each replayed as captured
    with torch.no_grad():
        plain = m(x, t, y=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(cf(x, t, y=y), want)
        assert torch.equal(cf(x, t, y=y), plain)


def test_plain_value_arguments_are_part_of_the_signature(model):
    class Scaled(torch.nn.Module):
        def forward(self, x, t, scale=1.0, shift=None):
            out = x * scale + t.view(-1, 1, 1, 1)
            return out if shift is None else out + shift

    cf = capture_forward(Scaled())
    x, t = _inputs()
    with torch.no_grad():
        for scale, shift in ((2.0, None), (3.0, None), (2.0, None), (2.0, x)):
            want = x * scale + t.view(-1, 1, 1, 1) + (0 if shift is None else shift)
            assert torch.equal(cf(x, t, scale=scale, shift=shift), want)
    assert cf.stats == {"captures": 3, "replays": 1, "eager": 0}
    _check_replays(model, capture_forward(model), x, t, y=None)  # None as a keyword value


def test_one_graph_per_signature_least_recently_used_dropped(model):
    cf = capture_forward(copy.deepcopy(model), max_graphs=2)
    with torch.no_grad():
        for batch in (1, 2, 1, 3, 2):
            x, t = _inputs(batch, seed=batch)
            assert torch.equal(cf(x, t), cf.model(x, t))
    # 1, 2 captured; 1 replayed; 3 captured (drops 2); 2 captured again (drops 1)
    assert cf.stats == {"captures": 4, "replays": 1, "eager": 0}
    assert len(cf._graphs) == 2
    x, t = _inputs(2)
    with torch.no_grad():  # another layout is another signature
        cf(x.contiguous(memory_format=torch.channels_last), t)
    assert cf.stats["captures"] == 5


def test_weights_changed_in_place_are_captured_again(model):
    m = copy.deepcopy(model).to_inference(torch.bfloat16)
    cf = capture_forward(m)
    x, t = _inputs(dtype=torch.bfloat16)
    with conv_winograd("on"):
        before = _check_replays(m, cf, x, t)
        m.load_state_dict(tiny_model(seed=7).to_inference(torch.bfloat16).state_dict())
        after = _check_replays(m, cf, x, t)  # the Winograd weights made again from the new ones
    assert not torch.equal(before, after)
    assert cf.stats["captures"] == 2


def test_calls_that_cannot_replay_run_the_model(model):
    m = copy.deepcopy(model)
    cf = capture_forward(m)
    x, t = _inputs()
    out = cf(x, t)  # grad on and the parameters require grad: the model itself, with autograd
    assert out.grad_fn is not None and cf.stats == {"captures": 0, "replays": 0, "eager": 1}
    with torch.no_grad():
        cf(x.requires_grad_(), t)  # an input that requires grad
    assert cf.stats["eager"] == 2
    m.requires_grad_(False)
    with torch.enable_grad():
        assert torch.equal(cf(x.detach(), t), m(x.detach(), t))  # no grad anywhere: replayed
    assert cf.stats["captures"] == 1


def test_inference_mode_and_hooks(model):
    """Captured and replayed under inference_mode as under no_grad; module hooks (Python) run in
    the warm-up and the capture only, not in replays (documented)."""
    m = copy.deepcopy(model)
    calls = []
    m.input_blocks[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    cf = capture_forward(m)
    x, t = _inputs()
    with torch.inference_mode():
        outs = [cf(x, t) for _ in range(3)]
    with torch.no_grad():
        want = m(x, t)
        outs.append(cf(x, t))
    assert all(torch.equal(o, want) for o in outs)
    assert cf.stats == {"captures": 1, "replays": 3, "eager": 0}
    assert len(calls) == 3  # warm-up, capture, and the eager call above


def test_capture_failure_warns_and_runs_the_model(model, monkeypatch):
    def fail(fn, args):
        raise RuntimeError("cannot record this")

    monkeypatch.setattr(og, "_trace", fail)
    cf = capture_forward(copy.deepcopy(model))
    x, t = _inputs()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"could not be captured \(RuntimeError: cannot"):
        out = cf(x, t)
    with torch.no_grad():
        assert torch.equal(out, cf.model(x, t))
    assert cf.stats["eager"] == 1 and not cf._graphs


def test_op_graph_sees_in_place_writes_to_captured_tensors():
    """Tensors the function reads and writes that are not arguments are kept by reference."""
    state = torch.zeros(3)
    step = torch.ones(3)

    def fn():
        state.add_(step)
        return state * 2

    g = OpGraph(fn)
    out = g()  # warm-up (+1), capture (+1), replay (+1)
    assert torch.equal(state, torch.full((3,), 3.0)) and torch.equal(out, state * 2)
    step.fill_(10)  # not watched, read by reference
    g()
    assert torch.equal(state, torch.full((3,), 13.0)) and g.captures == 1


def test_errors(model):
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got function"):
        capture_forward(lambda x, t: x)
    with pytest.raises(ValueError, match=r"^max_graphs: expected a positive count, got 0"):
        capture_forward(model, max_graphs=0)
    with pytest.raises(ValueError, match=r"^device: op graphs are the CPU's capture, got cuda"):
        OpGraphBackend(torch.device("cuda"))


# ---------------------------------------------------------------------------------
# the engine's mode "graph" on the CPU
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("respacing", ["10", "1"])  # "1": a one-step process (one row of t)
@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_engine_graph_mode_gives_the_eager_engine_samples(model, sampler, eta, respacing):
    d = diffusion(respacing=respacing)
    eager = SamplingEngine(model, d, mode="eager")
    graph = SamplingEngine(model, d, mode="graph")
    assert isinstance(graph._backend, OpGraphBackend)
    for seed in (3, 4):  # the second run replays
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = eager.sample(SHAPE, sampler=sampler, eta=eta, generator=g1)
        got = graph.sample(SHAPE, sampler=sampler, eta=eta, generator=g2)
        assert torch.equal(got, want)
        assert torch.equal(g1.get_state(), g2.get_state())  # the capture drew nothing from it
    assert graph.stats["captures"] == 1 and graph.stats["runs"] == 2


def test_engine_graph_mode_matches_the_library_loop_and_autocast(model):
    d = diffusion(respacing="5")
    g = torch.Generator().manual_seed(1)
    out = SamplingEngine(model, d, mode="graph").sample(SHAPE, generator=g)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(out, SamplingEngine(model, d, mode="eager").sample(SHAPE, generator=g))
    assert torch.equal(out, reference_loop(d, model, SHAPE, generator=torch.Generator().manual_seed(1)))
    fast = copy.deepcopy(model).to_inference()
    outs = []
    for mode in ("eager", "graph"):
        engine = SamplingEngine(fast, d, mode=mode, amp="bf16")
        outs.append(engine.sample(SHAPE, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(outs[0], outs[1])


def test_engine_graph_mode_under_inference_mode(model):
    d = diffusion(respacing="4")
    want = SamplingEngine(model, d, mode="eager").sample(SHAPE, generator=torch.Generator().manual_seed(0))
    engine = SamplingEngine(model, d, mode="graph")
    with torch.inference_mode():  # captured (buffers made as normal tensors) and replayed there
        outs = [engine.sample(SHAPE, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    outs.append(engine.sample(SHAPE, generator=torch.Generator().manual_seed(0)))  # and outside it
    assert all(torch.equal(o, want) for o in outs) and engine.stats["captures"] == 1


def test_engine_graph_mode_captures_again_after_a_weight_change():
    m = tiny_model(seed=2)
    d = diffusion(respacing="4")
    engine = SamplingEngine(m, d, mode="graph")
    first = engine.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    m.load_state_dict(tiny_model(seed=3).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = engine.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    want = SamplingEngine(m, d, mode="eager").sample(SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(second, want) and not torch.equal(first, second)
    assert engine.stats["captures"] == 2
    engine.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    assert engine.stats["captures"] == 2
