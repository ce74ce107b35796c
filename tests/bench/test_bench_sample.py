"""`iddpm bench sample` on CPU: the case grids (trimmed CUDA default, --full, CPU) and one
quick run through the harness, whose records carry the fields the GPU check reads."""

import json
import os

import pytest
import torch

from iddpm_ext import bench
from iddpm_ext.bench import sample as bench_sample

pytestmark = pytest.mark.kernels


def _args(argv):
    return bench.build_parser().parse_args(["sample", *argv])


def test_cuda_grids(monkeypatch):
    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)  # no reference-code rows
    cuda = torch.device("cuda")
    trimmed = bench_sample.cases(_args([]), cuda)
    assert {(s, b) for s, b, _, i in trimmed if i == "graph"} == {(50, 1), (50, 16), (50, 256), (250, 1)}
    assert {b for s, b, _, i in trimmed if i == "reference" and s == 50} == {1, 16, 256}
    assert [c[3] for c in trimmed[-2:]] == ["compile", "compile-graph"]
    assert sum(c[3] in ("compile", "compile-graph") for c in trimmed) == 2
    full = bench_sample.cases(_args(["--full"]), cuda)
    assert len(full) == 3 * 2 * 4 * 2
    assert all(c[3] == "compile" for c in full[-12:])  # compile rows last
    picked = bench_sample.cases(
        _args(["--batches", "2", "--steps", "7", "--impls", "graph", "--dtypes", "bfloat16"]), cuda
    )
    assert picked == [(7, 2, "bfloat16", "graph")]
    assert all(
        c[3] not in ("compile", "compile-graph") for c in bench_sample.cases(_args(["--no-compile"]), cuda)
    )
    quick = bench_sample.cases(_args(["--quick"]), cuda)
    assert {(s, b) for s, b, _, _ in quick} == {(10, 1), (10, 16)}
    assert "compile" not in {c[3] for c in quick}
    with pytest.raises(SystemExit, match="--impls: unknown impl"):
        bench_sample.cases(_args(["--impls", "tensorrt"]), cuda)


def test_cpu_grid_has_op_graph_rows_and_no_cuda_graph_ones():
    cpu = torch.device("cpu")
    grid = bench_sample.cases(_args(["--impls", "reference,graph,compile-graph,engine-eager"]), cpu)
    assert {c[3] for c in grid} == {"reference", "graph", "engine-eager"}  # graph: the CPU's op graph
    quick = bench_sample.cases(_args(["--quick"]), cpu)
    assert {(s, b) for s, b, _, _ in quick} == {(5, 1)}
    assert "compile" in {c[3] for c in bench_sample.cases(_args(["--compile"]), cpu)}


def _quick_cpu_run(tmp_path):
    """A quick two-step CPU run of the bench at one thread; the JSON file's path."""
    path = tmp_path / "bench_sample.json"
    argv = ["sample", "--device", "cpu", "--quick", "--threads", "1", "--steps", "2", "--json", str(path)]
    previous = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    return path


def test_quick_cpu_run_writes_records(tmp_path, monkeypatch):
    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)  # no reference-code rows
    path = _quick_cpu_run(tmp_path)
    data = json.loads(path.read_text())
    records = data["records"]
    assert {r["impl"] for r in records} == {
        "reference",
        "eager",
        "inference",
        "inference-capture",
        "engine-eager",
        "inference-graph",
    }
    for r in records:
        assert r["steps"] == 2 and r["ms"] > 0 and r["images_per_s"] > 0
        assert r["ms_per_run"] == pytest.approx(2 * r["ms"], rel=1e-3)
        assert "speedup" in r and r["op"] == "sample small 2 steps"
    # GFLOP per step = the UNet forward's FLOPs × B (counted here on the same model), TFLOP/s from it
    from torch.utils.flop_counter import FlopCounterMode

    from iddpm_ext.bench.unet import build_model
    from iddpm_ext.ops.attention import attention_impl

    model, size = build_model("tiny")
    with attention_impl("einsum"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size), torch.zeros(1))
    per_image = counter.get_total_flops()
    assert per_image > 1e6
    for r in records:
        assert r["gflop_per_step"] == pytest.approx(per_image * r["shape"][0] / 1e9, abs=1e-4), r
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["ms"], abs=1e-3), r
    assert data["environment"]["torch"] == torch.__version__


def test_reference_loop_matches_the_library_with_the_same_noise():
    """The reference-style loop is the same sampler written the reference's way: with the
    global RNG seeded alike it gives the library loop's samples (fp32)."""
    from helpers.engine_cases import diffusion, tiny_model

    m = tiny_model(seed=7)
    d = diffusion(respacing="6")
    x_T = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    ours = bench_sample.reference_loop(d, m, x_T, torch.device("cpu"), torch.float32)
    torch.manual_seed(3)
    ref = d.p_sample_loop(m, (2, 3, 8, 8), noise=x_T)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """IDDPM_REF_PATH naming a stand-in 'checkout' whose modules are ours (same API): the
    reference-code rows' plumbing, in CI where no checkout of improved-diffusion is at hand.
    The real module names are put back afterwards."""
    import sys

    pkg = tmp_path / "checkout" / "improved_diffusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "unet.py").write_text("from iddpm_ext.unet import UNetModel  # noqa: F401\n")
    (pkg / "script_util.py").write_text(
        "from iddpm_ext.script_util import create_gaussian_diffusion  # noqa: F401\n"
    )
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "improved_diffusion"}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setenv("IDDPM_REF_PATH", str(pkg.parent))
    yield pkg.parent
    for k in [k for k in sys.modules if k.split(".")[0] == "improved_diffusion"]:
        del sys.modules[k]
    sys.modules.update(saved)
    if str(pkg.parent) in sys.path:
        sys.path.remove(str(pkg.parent))


def test_reference_code_rows_follow_each_reference_row(fake_checkout):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for device, argv in ((cuda, []), (cuda, ["--quick"]), (cpu, [])):
        grid = bench_sample.cases(_args(argv), device)
        refs = [i for i, c in enumerate(grid) if c[3] == "reference"]
        assert refs and all(grid[i + 1] == (*grid[i][:3], "reference-code") for i in refs)
        assert sum(c[3] == "reference-code" for c in grid) == len(refs)
    # an explicit --impls list is taken as given
    grid = bench_sample.cases(_args(["--impls", "reference,eager"]), cpu)
    assert {c[3] for c in grid} == {"reference", "eager"}


def test_reference_code_needs_a_checkout(monkeypatch):
    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    assert "reference-code" not in {c[3] for c in bench_sample.cases(_args([]), torch.device("cpu"))}
    with pytest.raises(
        SystemExit, match="reference-code runs openai/improved-diffusion's own code: set IDDPM_REF_PATH"
    ):
        bench_sample.cases(_args(["--impls", "reference-code"]), torch.device("cpu"))


def test_quick_cpu_run_with_reference_code_rows(tmp_path, fake_checkout):
    path = _quick_cpu_run(tmp_path)
    records = json.loads(path.read_text())["records"]
    assert [r["impl"] for r in records if r["dtype"] == "float32"] == [
        "reference",
        "reference-code",
        "eager",
        "inference",
        "inference-capture",
        "engine-eager",
        "inference-graph",
    ]
    code = {r["dtype"]: r["ms"] for r in records if r["impl"] == "reference-code"}
    assert set(code) == {"float32", "bfloat16"}
    for r in records:
        assert "error" not in r, r
        if r["impl"] != "reference":
            assert r["speedup_vs_ref_code"] == pytest.approx(code[r["dtype"]] / r["ms"], rel=2e-3)


@pytest.mark.skipif(
    not os.environ.get("IDDPM_REF_PATH"),
    reason="set IDDPM_REF_PATH to a checkout of openai/improved-diffusion",
)
def test_reference_code_is_the_same_sampler():
    """With the real checkout: the reference's own loop on its own UNet (our weights) gives our
    loop's samples for the same x_T and global RNG (fp32), so the rows time the same work."""
    from iddpm_ext.bench.unet import build_model
    from iddpm_ext.script_util import create_gaussian_diffusion

    torch.manual_seed(0)
    model, size = build_model("tiny")
    with torch.no_grad():
        torch.nn.init.normal_(model.out[-1].weight, std=1e-2)
    model.eval()
    d = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True, timestep_respacing="4"
    )
    x_T = torch.randn(2, 3, size, size)
    run = bench_sample._ReferenceCode(model, "tiny").loop(d, x_T, torch.device("cpu"), torch.float32)
    torch.manual_seed(5)
    theirs = run()
    torch.manual_seed(5)
    ours = d.p_sample_loop(model, tuple(x_T.shape), noise=x_T)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
