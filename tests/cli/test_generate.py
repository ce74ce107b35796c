"""Sampling: per-sample seeds (independent of batch size), DDIM, class labels, output files."""

import json
import os

import numpy as np
import pytest
import torch

from helpers.models import randomize_
from helpers.training import main, tiny_config, write_npz
from iddpm_ext import dist_util
from iddpm_ext.cli import generate as S
from iddpm_ext.cli import images
from iddpm_ext.script_util import create_model_and_diffusion


def _model(**overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    randomize_(model)
    return model.eval(), diffusion


@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_samples_do_not_depend_on_batch_size(use_ddim, eta):
    model, diffusion = _model(timestep_respacing="6")
    kw = dict(seed=5, use_ddim=use_ddim, eta=eta)
    a = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=2, **kw)["images"]
    b = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=3, **kw)["images"]
    c = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, **kw)["images"]
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert len({img.tobytes() for img in a}) == 6  # distinct samples
    other = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, seed=6, use_ddim=use_ddim, eta=eta)[
        "images"
    ]
    assert not np.array_equal(a, other)


def test_one_sample_alone_equals_its_place_in_a_batch():
    model, diffusion = _model(timestep_respacing="4")
    x_all, _, _ = S.sample_batch(model, diffusion, [0, 1, 2, 3], (1, 8, 8), seed=1)
    x_two, _, _ = S.sample_batch(model, diffusion, [2], (1, 8, 8), seed=1)
    torch.testing.assert_close(x_all[2:3], x_two, rtol=1e-5, atol=1e-5)


def test_noise_chunks_do_not_change_samples(monkeypatch):
    model, diffusion = _model(diffusion_steps=10)
    a, _, _ = S.sample_batch(model, diffusion, [0, 1], (1, 8, 8), seed=2)
    monkeypatch.setattr(S, "NOISE_CHUNK", 3)
    b, _, _ = S.sample_batch(model, diffusion, [0, 1], (1, 8, 8), seed=2)
    assert torch.equal(a, b)


def test_class_labels_come_from_the_models_classes():
    model, diffusion = _model(class_cond=True, num_classes=3, timestep_respacing="3")
    res = S.generate(model, diffusion, 12, (1, 8, 8), batch_size=5, seed=0)
    assert res["labels"].shape == (12,) and set(res["labels"].tolist()) <= {0, 1, 2}
    assert len(set(res["labels"].tolist())) > 1
    again = S.generate(model, diffusion, 12, (1, 8, 8), batch_size=12, seed=0)
    assert np.array_equal(res["labels"], again["labels"]) and np.array_equal(res["images"], again["images"])
    fixed = S.generate(model, diffusion, 4, (1, 8, 8), batch_size=4, seed=0, label=2)
    assert fixed["labels"].tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="label"):
        S.generate(model, diffusion, 2, (1, 8, 8), label=3)


def test_fused_and_eager_steps_agree():
    model, diffusion = _model(timestep_respacing="5")
    if not hasattr(diffusion, "use_fused"):
        pytest.skip("this diffusion has no fused sampling step")
    diffusion.use_fused = False
    eager = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), seed=3)[0]
    diffusion.use_fused = True
    fused = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), seed=3)[0]
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_trajectory_and_files(tmp_path):
    model, diffusion = _model(timestep_respacing="8")
    res = S.generate(
        model, diffusion, 5, (1, 8, 8), batch_size=5, seed=0, trajectory_steps=4, trajectory_samples=3
    )
    ts = [t for t, _ in res["trajectory"]]
    assert ts == [7, 5, 2, 0] and all(f.shape == (3, 1, 8, 8) for _, f in res["trajectory"])
    # the last frame is the final sample
    assert np.array_equal(images.to_uint8(res["trajectory"][-1][1]).numpy(), res["images"][:3])
    npz = str(tmp_path / images.samples_filename(res["images"]))
    assert os.path.basename(npz) == "samples_5x8x8x1.npz"
    images.save_npz(npz, res["images"], np.arange(5))
    with np.load(npz) as f:
        assert np.array_equal(f["arr_0"], res["images"]) and f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(FileExistsError):
        images.save_npz(npz, res["images"][:1])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 8, 8, 1)  # untouched
    images.save_grid(str(tmp_path / "g.png"), res["images"])
    fig = images.save_trajectory(str(tmp_path / "t.png"), res["trajectory"], diffusion=diffusion)
    from PIL import Image

    with Image.open(tmp_path / "g.png") as g, Image.open(tmp_path / "t.png") as t:
        assert g.size == ((3 * 10 + 2) * 12, (2 * 10 + 2) * 12)  # 3x2 tiles of 8 px + 2 px pads, ×12
        assert t.size == (int((4 * 10 + 2) * 48 / 8) + 160, int((3 * 10 + 2) * 48 / 8) + 110)  # 48-px cells
    ax = fig.axes[0]  # columns: the timesteps kept, in the original process's numbering
    ts = [t for t, _ in res["trajectory"]]
    assert [x.get_text() for x in ax.get_xticklabels()] == [f"t={diffusion.timestep_map[t]}" for t in ts]
    assert [y.get_text() for y in ax.get_yticklabels()] == ["0", "1", "2"] and "timestep t" in ax.get_xlabel()
    assert images.save_trajectory(str(tmp_path / "none.png"), []) is None
    with pytest.raises(FileExistsError, match="already exists"):
        images.check_outputs_free([str(tmp_path / "none.png"), npz])


# ---------------------------------------------------------------------------------------
# the sampling engine (in-kernel per-sample noise): eager mode on CPU
# ---------------------------------------------------------------------------------------


@pytest.mark.kernels
@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.7)])
def test_engine_samples_do_not_depend_on_batch_size(use_ddim, eta):
    model, diffusion = _model(timestep_respacing="6")
    kw = dict(seed=5, use_ddim=use_ddim, eta=eta, engine="eager")
    runs = {bs: S.generate(model, diffusion, 6, (1, 8, 8), batch_size=bs, **kw) for bs in (2, 3, 6)}
    a = runs[2]["images"]
    assert runs[2]["engine"] == "eager" and a.shape == (6, 8, 8, 1)
    assert np.array_equal(a, runs[3]["images"]) and np.array_equal(a, runs[6]["images"])
    assert len({img.tobytes() for img in a}) == 6
    # float samples per sample: alone, in a batch, in another order
    x_all, _, _ = S.sample_batch(model, diffusion, list(range(6)), (1, 8, 8), **kw)
    x_two, _, _ = S.sample_batch(model, diffusion, [4, 1], (1, 8, 8), **kw)
    torch.testing.assert_close(x_two, x_all[[4, 1]], rtol=1e-5, atol=1e-5)
    # the step noise is not the loop's (same x_T and labels, other noise) and follows the seed
    loop = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, seed=5, use_ddim=use_ddim, eta=eta)
    assert loop["engine"] == "loop" and not np.array_equal(loop["images"], a)
    other = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, **{**kw, "seed": 6})["images"]
    assert not np.array_equal(other, a)


@pytest.mark.kernels
def test_engine_deterministic_ddim_equals_the_loop():
    """DDIM with η = 0 draws no noise: the engine and the loop start from the same per-sample
    x_T and run the same fused update."""
    model, diffusion = _model(timestep_respacing="5")
    kw = dict(seed=2, use_ddim=True, eta=0.0)
    eng, _, _ = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), engine="eager", **kw)
    loop, _, _ = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), engine="loop", **kw)
    torch.testing.assert_close(eng, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
def test_engine_class_labels_and_trajectory():
    model, diffusion = _model(class_cond=True, num_classes=3, timestep_respacing="8")
    kw = dict(seed=0, engine="eager")
    res = S.generate(
        model, diffusion, 5, (1, 8, 8), batch_size=2, trajectory_steps=4, trajectory_samples=2, **kw
    )
    loop = S.generate(model, diffusion, 5, (1, 8, 8), batch_size=5, seed=0)
    assert np.array_equal(res["labels"], loop["labels"])  # labels from the per-sample generators
    again = S.generate(model, diffusion, 5, (1, 8, 8), batch_size=5, **kw)
    assert np.array_equal(again["images"], res["images"]) and np.array_equal(again["labels"], res["labels"])
    assert [t for t, _ in res["trajectory"]] == [7, 5, 2, 0]
    assert all(f.shape == (2, 1, 8, 8) for _, f in res["trajectory"])
    assert np.array_equal(images.to_uint8(res["trajectory"][-1][1]).numpy(), res["images"][:2])


def test_rank_split_covers_every_index_once_in_order():
    for n in (1, 5, 7, 12):
        for world in (1, 2, 3, 4, 8):
            blocks = [dist_util.rank_indices(n, r, world) for r in range(world)]
            assert sum(blocks, []) == list(range(n))
            assert [len(b) for b in blocks] == dist_util.rank_counts(n, world)


@pytest.mark.kernels
def test_engine_samples_do_not_depend_on_the_number_of_processes(monkeypatch):
    """generate on each rank of 2 (ranks simulated in one process: the gather returns the
    rank's own rows) gives the blocks of the single-process result."""
    model, diffusion = _model(timestep_respacing="4")
    kw = dict(seed=9, engine="eager")
    single = S.generate(model, diffusion, 7, (1, 8, 8), batch_size=3, **kw)["images"]
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(S.dist_util, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(S.dist_util, "get_world_size", lambda: 2)
        monkeypatch.setattr(S.dist_util, "all_gather_rows", lambda t, counts: t)
        parts.append(S.generate(model, diffusion, 7, (1, 8, 8), batch_size=2, **kw)["images"])
    assert [len(p) for p in parts] == [4, 3]
    assert np.array_equal(np.concatenate(parts), single)


def test_engine_choice():
    _, diffusion = _model()
    assert S.resolve_engine("auto", "cpu", diffusion) == "loop"
    assert S.resolve_engine("eager", "cpu", diffusion) == "eager"
    from iddpm_ext.ops import loader

    cuda_ok = loader.available() and loader.has_kernel("cuda")
    assert S.resolve_engine("auto", "cuda", diffusion) == ("graph" if cuda_ok else "loop")
    diffusion.use_fused = False
    assert S.resolve_engine("auto", "cuda", diffusion) == "loop"
    assert S.resolve_engine("graph", "cpu", diffusion) == "graph"  # an op graph on the CPU
    with pytest.raises(ValueError, match=r"^engine: 'compile-graph' captures CUDA graphs and needs a CUDA"):
        S.resolve_engine("compile-graph", "cpu", diffusion)
    with pytest.raises(ValueError, match=r"engine: expected one of auto, graph"):
        S.resolve_engine("fast", "cpu", diffusion)
    assert S.step_noise_seed(0) != S.step_noise_seed(1)
    assert S.step_noise_seed(0) not in {S.sample_seed(0, i) for i in range(100)}
    assert 0 <= S.step_noise_seed(123) < 2**63


@pytest.mark.kernels
def test_cli_sample_engine_flag(tmp_path, capsys):
    from iddpm_ext.training import checkpoint as ckpt

    cfg = tiny_config(timestep_respacing="")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**cfg)
    randomize_(model)
    weights = str(tmp_path / "m.safetensors")
    ckpt.save_weights(weights, model.state_dict(), cfg)
    images = {}
    for engine, bs in (("eager", 2), ("eager", 3), ("graph", 2), ("loop", 3)):
        out = str(tmp_path / f"{engine}{bs}")
        rc = main(
            (
                "sample --model_path {model_path} --num_samples 5 --batch_size "
                "{batch_size} --timestep_respacing 4 --out_dir {out_dir} --engine "
                "{engine} --progress False"
            ),
            model_path=weights,
            batch_size=str(bs),
            out_dir=out,
            engine=engine,
        )
        assert rc == 0
        assert f"engine {engine}" in capsys.readouterr().out
        with np.load(os.path.join(out, "samples_5x8x8x1.npz")) as f:
            images[engine, bs] = f["arr_0"]
    assert np.array_equal(images["eager", 2], images["eager", 3])
    assert np.array_equal(images["graph", 2], images["eager", 2])  # the CPU's op graph: the same bits
    assert not np.array_equal(images["eager", 3], images["loop", 3])
    assert (
        main(
            ("sample --model_path {model_path} --engine compile-graph --device cpu --out_dir {out_dir}"),
            model_path=weights,
            out_dir=str(tmp_path / "g"),
        )
        == 2
    )
    assert "engine: 'compile-graph' captures CUDA graphs" in capsys.readouterr().err


def _autocast_seen(model):
    """Records, per forward call, the CPU autocast dtype in effect (None: autocast off)."""
    seen = []

    def hook(module, args):
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else None)

    model.register_forward_pre_hook(hook)
    return seen


@pytest.mark.kernels
@pytest.mark.parametrize("engine", ["loop", "eager"])
def test_amp_runs_the_network_under_autocast(engine):
    model, diffusion = _model(timestep_respacing="4")
    seen = _autocast_seen(model)
    kw = dict(seed=4, use_ddim=True, eta=0.0, engine=engine)
    plain = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), **kw)[0]
    assert seen and set(seen) == {None}
    seen.clear()
    low = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), amp="bf16", **kw)[0]
    assert seen and set(seen) == {torch.bfloat16}  # every network call, and only those
    assert low.dtype == torch.float32 and low.shape == plain.shape
    assert bool(low.isfinite().all()) and float(low.abs().max()) <= 1.0  # x_0 clipped as in fp32
    assert not torch.equal(low, plain)
    # amp="none" is the default path, bit for bit.
    assert torch.equal(S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), amp="none", **kw)[0], plain)
    with pytest.raises(ValueError, match=r"amp: expected one of \['none', 'bf16', 'fp16'\], got 'fp8'"):
        S.sample_batch(model, diffusion, [0], (1, 8, 8), amp="fp8", **kw)


def test_autocast_model_wrapper():
    from iddpm_ext.core.precision import AutocastModel, with_amp

    model, _ = _model(class_cond=True, num_classes=3)
    assert with_amp(model, "none", "cpu") is model
    wrapped = with_amp(model, "bf16", "cpu")
    assert isinstance(wrapped, AutocastModel) and wrapped.num_classes == 3  # attributes fall through
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        out, ref = wrapped(x, t, y=torch.tensor([0, 2])), model(x, t, y=torch.tensor([0, 2]))
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.05, err  # bf16 rounding, not garbage
    import copy
    import pickle

    for twin in (copy.copy(wrapped), copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert isinstance(twin, AutocastModel) and twin.dtype == torch.bfloat16 and twin.device_type == "cpu"
        assert isinstance(twin.model, type(model)) and twin.num_classes == 3
    with pytest.raises(AttributeError):
        wrapped.__no_such_dunder__  # noqa: B018


def test_a_sampler_keeps_its_own_amp():
    model, diffusion = _model(timestep_respacing="2")
    sampler = S.Sampler("loop", model, diffusion, "cpu", "bf16")
    x = S.sample_batch(model, diffusion, [0], (1, 8, 8), engine=sampler, amp="bf16")[0]
    assert torch.equal(x, S.sample_batch(model, diffusion, [0], (1, 8, 8), engine=sampler)[0])
    with pytest.raises(
        ValueError, match=r"amp: expected the Sampler's own amp 'bf16' \(or none\), got 'fp16'"
    ):
        S.sample_batch(model, diffusion, [0], (1, 8, 8), engine=sampler, amp="fp16")


@pytest.mark.kernels
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_captured_loop_gives_the_same_samples(amp):
    """--capture: the loop's network replayed from op graphs (one per batch shape, kept across
    batches): the same images as the plain loop, on the plain and the to_inference model."""
    import copy

    model, diffusion = _model(timestep_respacing="4")
    for m in (model, copy.deepcopy(model).to_inference()):
        sampler = S.Sampler("loop", m, diffusion, "cpu", amp, capture=True)
        got = S.generate(m, diffusion, 5, (1, 8, 8), batch_size=2, engine=sampler)["images"]
        want = S.generate(m, diffusion, 5, (1, 8, 8), batch_size=2, amp=amp)["images"]
        assert np.array_equal(got, want)
        stats = sampler.net.model.stats if amp != "none" else sampler.net.stats
        # batches of 2, 2, 1 x 4 steps: two signatures captured, the other calls replayed
        assert stats == {"captures": 2, "replays": 10, "eager": 0}
    for engine, device in (("eager", "cpu"), ("loop", "meta")):
        with pytest.raises(ValueError, match=r"^capture: op graphs serve the loop sampler on the CPU, got "):
            S.Sampler(engine, model, diffusion, device, capture=True)


@pytest.mark.kernels
def test_cli_sample_and_nll_amp_and_inference_flags(tmp_path, capsys):
    import copy

    from iddpm_ext.training import checkpoint as ckpt

    cfg = tiny_config(timestep_respacing="")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config(timestep_respacing="4"))
    randomize_(model)
    weights = str(tmp_path / "m.safetensors")
    ckpt.save_weights(weights, model.state_dict(), cfg)
    out = str(tmp_path / "s")
    rc = main(
        "sample --model_path {m} --num_samples 3 --batch_size 2 --timestep_respacing 4 --out_dir {out} "
        "--progress False --amp bf16 --inference True",
        m=weights,
        out=out,
    )
    assert rc == 0
    assert "engine loop, amp bf16, to_inference," in capsys.readouterr().out
    with np.load(os.path.join(out, "samples_3x8x8x1.npz")) as f:
        got = f["arr_0"]
    # The same as the library: the model switched to its inference paths, sampled under bf16.
    fast = copy.deepcopy(model).eval().to_inference()
    want = S.generate(fast, diffusion, 3, (1, 8, 8), batch_size=2, amp="bf16")["images"]
    assert np.array_equal(got, want)
    rc = main(  # and replayed from op graphs: the same images
        "sample --model_path {m} --num_samples 3 --batch_size 2 --timestep_respacing 4 --out_dir {out} "
        "--progress False --amp bf16 --inference True --capture True --overwrite True",
        m=weights,
        out=out,
    )
    assert rc == 0 and "to_inference, op-graph capture," in capsys.readouterr().out
    with np.load(os.path.join(out, "samples_3x8x8x1.npz")) as f:
        assert np.array_equal(f["arr_0"], want)
    # nll: the bound with and without the flags, close (bf16 network, float32 terms).
    data = write_npz(str(tmp_path / "d.npz"), n=4)
    bpd = {}
    for name, flags in (
        ("plain", ""),
        ("fast", "--amp bf16 --inference True"),
        ("captured", "--amp bf16 --inference True --capture True"),
    ):
        rc = main(
            "nll --model_path {m} --data_dir {data} --num_samples 4 --batch_size 4 --out_dir {out} "
            "--progress False " + flags,
            m=weights,
            data=data,
            out=str(tmp_path / f"nll_{name}"),
        )
        assert rc == 0
        printed = capsys.readouterr().out
        assert ("amp bf16, to_inference" in printed) == (name != "plain")
        assert ("op-graph capture" in printed) == (name == "captured")
        bpd[name] = json.loads(printed.strip().splitlines()[-1])["bits_per_dim"]
    assert bpd["fast"] != bpd["plain"] and bpd["fast"] == pytest.approx(bpd["plain"], rel=0.05)
    assert bpd["captured"] == bpd["fast"]  # op graphs: the same network outputs, the same bound
    with pytest.raises(SystemExit):  # argparse refuses it, naming the choices
        main("sample --model_path {m} --amp fp8 --out_dir {out}", m=weights, out=out)
    assert "argument --amp: invalid choice: 'fp8'" in capsys.readouterr().err
