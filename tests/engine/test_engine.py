"""The sampling engine on CPU: eager and compile modes against the library's loops with the
same seed, graph mode's build path with a stand-in capture backend, configuration caching,
buffer reuse, memory reporting, autocast, channels-last and argument errors. The CUDA graph
itself is tested in tests/engine/test_engine_gpu.py."""

import pytest
import torch

import iddpm_ext.engine.sampling_engine as engine_mod
from helpers.engine_cases import (
    Autocast,
    PerSample,
    call_graph_backend,
    diffusion,
    reference_loop,
    tiny_model,
)
from iddpm_ext.engine import SamplingEngine, capture, default_mode, diffusion_signature
from iddpm_ext.engine.op_graph import OpGraphBackend

pytestmark = pytest.mark.kernels

SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cond_model():
    return tiny_model(num_classes=5, seed=1)


def _pair(d, m, sampler="ancestral", eta=0.0, seed=3, engine=None, model_kwargs=None, **engine_kwargs):
    """(engine sample, reference loop sample) with a CPU generator seeded alike."""
    engine = engine or SamplingEngine(m, d, mode="eager", **engine_kwargs)
    g = torch.Generator().manual_seed(seed)
    ours = engine.sample(SHAPE, sampler=sampler, eta=eta, generator=g, model_kwargs=model_kwargs)
    g = torch.Generator().manual_seed(seed)
    ref = reference_loop(d, m, SHAPE, sampler, eta, generator=g, model_kwargs=model_kwargs)
    return ours, ref


# ---------------------------------------------------------------------------------
# same seed -> same samples as the library's loops
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
@pytest.mark.parametrize("respacing,rescale", [("10", True), ("", False), ("ddim5", True)])
def test_eager_matches_library_loop(model, sampler, eta, respacing, rescale):
    d = diffusion(respacing=respacing, steps=20 if respacing == "" else 100, rescale=rescale)
    ours, ref = _pair(d, model, sampler, eta)
    assert torch.equal(ours, ref)
    assert ours.dtype == torch.float32 and ours.is_contiguous()


@pytest.mark.parametrize("learn_sigma,predict_xstart", [(False, False), (False, True), (True, True)])
def test_eager_matches_for_other_mean_and_variance_types(learn_sigma, predict_xstart):
    m = tiny_model(learn_sigma=learn_sigma, seed=2)
    d = diffusion(learn_sigma=learn_sigma, predict_xstart=predict_xstart, schedule="linear")
    ours, ref = _pair(d, m)
    assert torch.equal(ours, ref)


def test_class_conditional_matches_and_uses_labels(cond_model):
    d = diffusion()
    engine = SamplingEngine(cond_model, d, mode="eager")
    y = torch.tensor([1, 4])
    ours, ref = _pair(d, cond_model, engine=engine, model_kwargs={"y": y})
    assert torch.equal(ours, ref)
    g = torch.Generator().manual_seed(3)
    other = engine.sample(SHAPE, y=torch.tensor([0, 2]), generator=g)
    assert not torch.equal(other, ours)  # the new labels reached the static y buffer


def test_default_generator_semantics(model):
    """No generator: the engine uses the device's default generator, i.e. the library loop
    with generator=torch.default_generator; the global stream advances as in that loop."""
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    torch.manual_seed(11)
    ours = engine.sample(SHAPE)
    after_ours = torch.randn(4)
    torch.manual_seed(11)
    ref = d.p_sample_loop(model, SHAPE, generator=torch.default_generator)
    after_ref = torch.randn(4)
    assert torch.equal(ours, ref)
    assert torch.equal(after_ours, after_ref)


def test_user_generator_state_is_advanced_and_default_untouched(model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(9)
    engine.sample(SHAPE, generator=g)
    default_after = torch.randn(3)
    g_ref = torch.Generator().manual_seed(9)
    d.p_sample_loop(model, SHAPE, generator=g_ref)
    assert torch.equal(g.get_state(), g_ref.get_state())
    torch.manual_seed(5)
    assert torch.equal(torch.randn(3), default_after)


def test_explicit_x_T_and_progress(model):
    d = diffusion()
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    engine = SamplingEngine(model, d, mode="eager")
    g = torch.Generator().manual_seed(1)
    ours = engine.p_sample_loop(SHAPE, noise=x_T, generator=g, progress=True)
    g = torch.Generator().manual_seed(1)
    ref = d.p_sample_loop(model, SHAPE, noise=x_T.float(), generator=g)
    assert torch.equal(ours, ref)
    g = torch.Generator().manual_seed(1)
    ddim = engine.ddim_sample_loop(SHAPE, noise=x_T, eta=0.0, generator=g)
    assert torch.equal(ddim, d.ddim_sample_loop(model, SHAPE, noise=x_T.float()))


def test_clip_denoised_off(model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    g = torch.Generator().manual_seed(2)
    ours = engine.sample(SHAPE, clip_denoised=False, generator=g)
    g = torch.Generator().manual_seed(2)
    ref = d.p_sample_loop(model, SHAPE, clip_denoised=False, generator=g)
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------------
# bf16 autocast and channels-last
# ---------------------------------------------------------------------------------


def test_bf16_autocast_matches_loop_under_autocast(model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager", amp="bf16")
    g = torch.Generator().manual_seed(4)
    ours = engine.sample(SHAPE, generator=g)
    g = torch.Generator().manual_seed(4)
    # The engine's fused steps read the model's bf16 output in float32; the library's loop on a
    # bf16 output takes the reference's bf16 variance arithmetic (eager), so it is given the
    # output upcast, the engine's arithmetic.
    autocast = Autocast(model, "cpu", torch.bfloat16)
    ref = d.p_sample_loop(lambda x, t, **kw: autocast(x, t, **kw).float(), SHAPE, generator=g)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(4)
    fp32 = engine.sample(SHAPE, generator=g, amp=None)  # per-call override
    assert not torch.equal(fp32, ours)
    assert len(engine.cache_keys()) == 2


def test_channels_last_matches_loop_with_channels_last_inputs():
    m = tiny_model(seed=3)
    d = diffusion()
    engine = SamplingEngine(m, d, mode="eager", channels_last=True)
    assert m.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x_T = torch.randn(SHAPE)
    g = torch.Generator().manual_seed(6)
    ours = engine.sample(SHAPE, noise=x_T, generator=g)
    (entry,) = engine._entries.values()
    assert entry.x.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(6)
    ref = d.p_sample_loop(m, SHAPE, noise=x_T.contiguous(memory_format=torch.channels_last), generator=g)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.is_contiguous()


# ---------------------------------------------------------------------------------
# caching, buffer reuse, memory report
# ---------------------------------------------------------------------------------


def test_configuration_cached_and_buffers_reused(model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    first = engine.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    (entry,) = engine._entries.values()
    ptrs = (entry.x.data_ptr(), entry.t_rows.data_ptr(), entry.counter.data_ptr())
    first_copy = first.clone()
    first.add_(1.0)  # the result is a copy, not the static buffer
    second = engine.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(second, first_copy)
    assert engine.stats["builds"] == 1 and engine.stats["runs"] == 2 and entry.runs == 2
    assert (entry.x.data_ptr(), entry.t_rows.data_ptr(), entry.counter.data_ptr()) == ptrs
    assert second.data_ptr() != entry.x.data_ptr()
    # A diffusion object equal to the first reuses its configuration.
    engine.sample(SHAPE, diffusion=diffusion(), generator=torch.Generator().manual_seed(0))
    assert engine.stats["builds"] == 1


def test_cache_keys_distinguish_every_part(model, cond_model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    y = {"y": torch.zeros(2, dtype=torch.long)}
    base = engine.config_key(d, SHAPE)
    variants = [
        engine.config_key(d, (4, 3, 8, 8)),  # batch
        engine.config_key(d, (2, 3, 16, 16)),  # image shape
        engine.config_key(diffusion(respacing="20"), SHAPE),  # respacing
        engine.config_key(diffusion(rescale=False), SHAPE),  # timestep rescaling
        engine.config_key(diffusion(schedule="linear"), SHAPE),  # beta schedule
        engine.config_key(d, SHAPE, sampler="ddim"),  # sampler
        engine.config_key(d, SHAPE, sampler="ddim", eta=0.5),  # eta
        engine.config_key(d, SHAPE, clip_denoised=False),
        engine.config_key(d, SHAPE, model_kwargs=y),  # class-conditional
        engine.config_key(d, SHAPE, model_kwargs={"y": torch.zeros(2, dtype=torch.int32)}),
        engine.config_key(d, SHAPE, amp="bf16"),  # autocast dtype
        engine.config_key(d, SHAPE, amp="fp16"),
        SamplingEngine(tiny_model(seed=4), d, mode="eager", channels_last=True).config_key(d, SHAPE),
        SamplingEngine(model, d, mode="compile").config_key(d, SHAPE),  # mode
    ]
    keys = [base] + variants
    assert len(set(keys)) == len(keys)
    assert engine.config_key(d, SHAPE, sampler="ddim", eta=0) == engine.config_key(
        d, SHAPE, sampler="ddim", eta=0.0
    )
    assert diffusion_signature(d) == diffusion_signature(diffusion())
    # Actually building distinct configurations keeps one entry each.
    for shape in (SHAPE, (3, 3, 8, 8)):
        for respacing in ("10", "5"):
            engine.sample(shape, diffusion=diffusion(respacing=respacing))
    assert engine.stats["builds"] == 4 and len(engine.cache_keys()) == 4
    engine.clear()
    assert engine.cache_keys() == []


def test_memory_report_counts_static_buffers(cond_model):
    d = diffusion(respacing="10")
    engine = SamplingEngine(cond_model, d, mode="eager")
    engine.sample(SHAPE, y=torch.tensor([0, 1]))
    report = engine.memory_report()
    (rec,) = report["entries"]
    B, S = SHAPE[0], 10
    x_bytes = 4 * B * 3 * 8 * 8
    t_bytes = 8 * S * B
    model_t_bytes = 4 * S * B  # rescaled timesteps are float32
    expected = x_bytes + t_bytes + model_t_bytes + 8 + 8 * B + 8 * B  # counter, y, sample_index
    assert rec["static_bytes"] == expected and report["total_bytes"] == expected
    assert rec["steps"] == S and rec["runs"] == 1 and report["mode"] == "eager"


def test_step_reads_timesteps_from_the_device_counter(model):
    """The step function takes t from t_rows[counter] and advances the counter, and the
    model sees the timesteps the respaced loop passes it."""
    d = diffusion(respacing="10", rescale=True)
    engine = SamplingEngine(model, d, mode="eager")
    engine.sample(SHAPE)
    (entry,) = engine._entries.values()
    assert entry.t_rows[:, 0].tolist() == list(range(9, -1, -1))
    seen = []
    d._run_model(lambda x, ts, **kw: seen.append(ts), None, torch.tensor([9, 9]), None)
    assert torch.equal(entry.model_t_rows[0], seen[0])
    assert entry.counter.item() == 10


# ---------------------------------------------------------------------------------
# graph mode's build path (stand-in backend) and compile mode
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("respacing", ["10", "1"])
def test_graph_mode_build_path_on_cpu(model, monkeypatch, respacing):
    """Graph mode with a backend that runs instead of capturing: warm-up steps (which draw
    random numbers) must leave the random stream and the results as in eager mode, and a
    second run must not build again. respacing "1": a one-step process, where warm-up must
    reset the counter before each warm-up step."""
    d = diffusion(respacing=respacing)
    with call_graph_backend(monkeypatch) as backends:
        engine = SamplingEngine(model, d, mode="graph")
        torch.manual_seed(8)
        ours = engine.sample(SHAPE)
        after = torch.randn(2)
        again = engine.sample(SHAPE, generator=torch.Generator().manual_seed(8))
    (backend,) = backends
    assert backend.warmups == 2 and backend.captures == 1
    assert engine.stats["captures"] == 1 and engine.stats["builds"] == 1
    torch.manual_seed(8)
    ref = d.p_sample_loop(model, SHAPE, generator=torch.default_generator)
    assert torch.equal(ours, ref) and torch.equal(after, torch.randn(2))
    assert torch.equal(again, ours)
    rec = engine.memory_report()["entries"][0]
    assert "graph_pool_reserved_bytes" in rec


@pytest.mark.slow
def test_compile_mode_matches_eager(cond_model):
    d = diffusion(respacing="6")
    y = torch.tensor([3, 1])
    engine = SamplingEngine(
        cond_model, d, mode="compile", compile_options={"backend": "aot_eager", "fullgraph": True}
    )
    eager = SamplingEngine(cond_model, d, mode="eager")
    for sampler, eta in (("ddim", 0.5), ("ancestral", 0.0)):
        g = torch.Generator().manual_seed(12)
        ours = engine.sample(SHAPE, sampler=sampler, eta=eta, y=y, generator=g)
        g = torch.Generator().manual_seed(12)
        ref = eager.sample(SHAPE, sampler=sampler, eta=eta, y=y, generator=g)
        assert torch.equal(ours, ref)
    engine.sample(SHAPE, sampler="ddim", eta=0.5, y=y)
    assert engine.stats["compiles"] == 2 and engine.stats["builds"] == 2


# ---------------------------------------------------------------------------------
# modes and errors
# ---------------------------------------------------------------------------------


def test_default_mode_and_environment(monkeypatch, model):
    monkeypatch.delenv(engine_mod.ENV_MODE, raising=False)
    assert default_mode("cpu") == "eager" and default_mode("cuda") == "graph"
    assert SamplingEngine(model, diffusion()).mode == "eager"
    monkeypatch.setenv(engine_mod.ENV_MODE, "compile")
    assert default_mode("cpu") == "compile"
    assert SamplingEngine(model, diffusion()).mode == "compile"
    monkeypatch.setenv(engine_mod.ENV_MODE, "eager")
    assert default_mode("cuda") == "eager"
    monkeypatch.setenv(engine_mod.ENV_MODE, "fast")
    with pytest.raises(ValueError, match=engine_mod.ENV_MODE):
        default_mode("cpu")
    monkeypatch.setenv(engine_mod.ENV_MODE, "graph")  # on the CPU: an op graph
    engine = SamplingEngine(model, diffusion())
    assert engine.mode == "graph" and isinstance(engine._backend, OpGraphBackend)
    monkeypatch.setenv(engine_mod.ENV_MODE, "compile-graph")
    with pytest.raises(ValueError, match=r"^mode: 'compile-graph' .*needs a CUDA device, got cpu"):
        SamplingEngine(model, diffusion())


def test_mode_errors(model):
    with pytest.raises(ValueError, match=r"^mode: 'compile-graph' captures the compiled step in a CUDA"):
        SamplingEngine(model, diffusion(), mode="compile-graph")
    with pytest.raises(ValueError, match=r"^mode: 'graph' and 'compile-graph' capture CUDA graphs"):
        capture.CUDAGraphBackend(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^device: op graphs are the CPU's capture, got meta"):
        OpGraphBackend(torch.device("meta"))
    with pytest.raises(ValueError, match=r"mode: expected one of"):
        SamplingEngine(model, diffusion(), mode="cudagraph")
    with pytest.raises(ValueError, match=r"amp: expected"):
        SamplingEngine(model, diffusion(), amp="int8")
    with pytest.raises(ValueError, match=r"device: the engine runs on cpu or cuda"):
        SamplingEngine(model, diffusion(), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: cuda was asked for but CUDA is not"):
            SamplingEngine(model, diffusion(), device="cuda")


def test_first_call_under_inference_mode(model):
    d = diffusion(respacing="4")
    engine = SamplingEngine(model, d, mode="eager")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        first = engine.sample(SHAPE, generator=g)
    g = torch.Generator().manual_seed(0)
    second = engine.sample(SHAPE, generator=g)  # reuses the buffers outside inference mode
    assert torch.equal(first, second) and engine.stats["builds"] == 1


def test_argument_errors(model, cond_model):
    d = diffusion()
    engine = SamplingEngine(model, d, mode="eager")
    cases = [
        (dict(shape=(2,)), r"shape: expected a tuple \(B, C, \.\.\.\)"),
        (dict(shape=(0, 3, 8, 8)), r"shape: expected"),
        (dict(sampler="plms"), r"sampler: expected one of"),
        (dict(eta=0.5), r"eta: only DDIM has an eta"),
        (dict(sampler="ddim", eta=-1.0), r"eta: expected a number in \[0, 1\] .*, got -1.0"),
        (dict(sampler="ddim", eta=1.5), r"eta: expected a number in \[0, 1\] .*, got 1.5"),
        (dict(sampler="ddim", eta=float("nan")), r"eta: expected a number in \[0, 1\] .*, got nan"),
        (dict(sampler="ddim", eta="a"), r"eta: expected a number in \[0, 1\] \(DDIM's η\), got 'a'"),
        (dict(noise=torch.randn(1, 3, 8, 8)), r"noise: expected shape \(2, 3, 8, 8\)"),
        (dict(generator=object()), r"generator: expected a torch.Generator on cpu"),
        (dict(model_kwargs={"y": [1, 2]}), r"model_kwargs\['y'\]: expected a tensor"),
        (dict(model_kwargs={"y": torch.zeros(3)}), r"model_kwargs\['y'\]: expected a leading"),
        (dict(y=torch.zeros(2), model_kwargs={"y": torch.zeros(2)}), r"y: given both"),
        (dict(amp="fp8"), r"amp: expected"),
    ]
    for kwargs, pattern in cases:
        shape = kwargs.pop("shape", SHAPE)
        with pytest.raises(ValueError, match=pattern):
            engine.sample(shape, **kwargs)
    with pytest.raises(ValueError, match=r"diffusion: none given"):
        SamplingEngine(model, mode="eager").sample(SHAPE)
    cond = SamplingEngine(cond_model, d, mode="eager")
    with pytest.raises(ValueError, match=r"y: the model is class-conditional \(5 classes\)"):
        cond.sample(SHAPE)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 5\), got 5"):
        cond.sample(SHAPE, y=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"y: expected integer class labels"):
        cond.sample(SHAPE, y=torch.tensor([0.0, 1.0]))
    model.train()
    try:
        with pytest.raises(ValueError, match=r"model: expected eval mode"):
            engine.sample(SHAPE)
    finally:
        model.eval()
    assert engine.cache_keys() == []  # nothing was built by a failing call


# ---------------------------------------------------------------------------------
# per-sample noise streams (sample_index)
# ---------------------------------------------------------------------------------


def _split_runs(engine, d, sampler="ancestral", eta=0.0, y=None, seed=21):
    """6 samples with fixed x_T: as one batch, and as batches of 2 and 3 with their global
    indices, each run from a generator seeded alike."""
    x_T = torch.randn((6, 3, 8, 8), generator=torch.Generator().manual_seed(99))

    def run(items, index):
        g = torch.Generator().manual_seed(seed)
        kw = {} if y is None else {"y": y[items]}
        return engine.sample(
            (len(items), 3, 8, 8),
            sampler=sampler,
            eta=eta,
            noise=x_T[items],
            generator=g,
            sample_index=index,
            **kw,
        )

    whole = run(list(range(6)), None)
    splits = {}
    for size in (2, 3):
        parts = [list(range(s, s + size)) for s in range(0, 6, size)]
        splits[size] = torch.cat([run(p, torch.tensor(p)) for p in parts])
    return whole, splits, run


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.5)])
def test_sample_index_makes_samples_batch_independent(model, sampler, eta):
    """With a model whose per-sample output does not depend on the batch (PerSample), each
    sample is the same bit for bit in any split; the batched model agrees to 1e-4."""
    d = diffusion(respacing="5")
    engine = SamplingEngine(PerSample(model), d, mode="eager")
    whole, splits, run = _split_runs(engine, d, sampler, eta)
    for size, got in splits.items():
        assert torch.equal(got, whole), size
    # int k = samples k .. k+B-1; any order of indices
    assert torch.equal(run([3, 4, 5], 3), whole[3:])
    assert torch.equal(run([5, 1], [5, 1]), whole[[5, 1]])
    # other indices: other noise
    assert not torch.allclose(run([0, 1], [7, 8]), whole[:2])
    assert engine.stats["builds"] == 3  # batch 6, 2, 3: one configuration per batch size
    batched_whole, batched_splits, _ = _split_runs(SamplingEngine(model, d, mode="eager"), d, sampler, eta)
    torch.testing.assert_close(batched_whole, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched_splits[2], whole, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sample_index_reaches_graph_and_compiled_steps_without_rebuilding(cond_model, monkeypatch):
    d = diffusion(respacing="4")
    y = torch.tensor([0, 3, 1, 4, 2, 2])
    eager = SamplingEngine(cond_model, d, mode="eager")
    ref, ref_splits, _ = _split_runs(eager, d, y=y)
    with call_graph_backend(monkeypatch) as backends:
        graph = SamplingEngine(cond_model, d, mode="graph")
        whole, splits, _ = _split_runs(graph, d, y=y)
    assert torch.equal(whole, ref) and torch.equal(splits[3], ref_splits[3])
    assert graph.stats["captures"] == 3 and sum(b.captures for b in backends) == 3  # B = 6, 2, 3
    compiled = SamplingEngine(
        cond_model, d, mode="compile", compile_options={"backend": "aot_eager", "fullgraph": True}
    )
    whole_c, splits_c, _ = _split_runs(compiled, d, y=y)
    assert torch.equal(whole_c, ref) and torch.equal(splits_c[2], ref_splits[2])
    assert compiled.stats["compiles"] == 3


@pytest.mark.slow  # one torch.compile (aot_eager) of the step
def test_compile_graph_mode_captures_the_compiled_step(model, monkeypatch):
    """mode "compile-graph": the step compiled first, then captured (CPU stand-in backend) and
    replayed; the samples are the eager engine's."""
    d = diffusion(respacing="4")
    g = torch.Generator().manual_seed(5)
    ref = SamplingEngine(model, d, mode="eager").sample(SHAPE, generator=g)
    with call_graph_backend(monkeypatch) as backends:
        engine = SamplingEngine(
            model, d, mode="compile-graph", compile_options={"backend": "aot_eager", "fullgraph": True}
        )
        g = torch.Generator().manual_seed(5)
        out = engine.sample(SHAPE, generator=g)
        g = torch.Generator().manual_seed(5)
        again = engine.sample(SHAPE, generator=g)  # replays: no second compile or capture
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert engine.stats["compiles"] == 1 and engine.stats["captures"] == 1
    assert sum(b.captures for b in backends) == 1


def test_callback_sees_every_step(model):
    d = diffusion(respacing="5")
    engine = SamplingEngine(model, d, mode="eager")
    seen = []
    out = engine.sample(
        SHAPE, generator=torch.Generator().manual_seed(0), callback=lambda t, x: seen.append((t, x.clone()))
    )
    assert [t for t, _ in seen] == [4, 3, 2, 1, 0]
    assert torch.equal(seen[-1][1], out) and not torch.equal(seen[0][1], out)


def test_sample_index_and_callback_errors(model):
    engine = SamplingEngine(model, diffusion(), mode="eager")
    for bad in (torch.arange(3), torch.zeros(2), [0.5, 1.5], "01", True):
        with pytest.raises(ValueError, match=r"^sample_index: expected None, an int or 2 integers"):
            engine.sample(SHAPE, sample_index=bad)
    with pytest.raises(ValueError, match=r"^callback: expected a callable"):
        engine.sample(SHAPE, callback=3)
    assert engine.cache_keys() == []
