"""The extension is built, matches the running torch, and its absence is handled."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import iddpm_ext
from helpers import REPO
from iddpm_ext.ops import loader


def test_extension_loads_and_reports_build_facts():
    assert loader.available(), loader.load_error()
    info = iddpm_ext.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_version", "arch_list", "compiler"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__
    assert info["version"] == iddpm_ext.__version__
    if info["cuda"]:
        assert info["cuda_version"] and info["arch_list"]
        assert info["cuda_reason"] == ""
    else:
        assert info["cuda_version"] is None
        assert info["cuda_reason"]  # the build says why it has no CUDA kernels


def test_gpu_without_cuda_kernels_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = {"cuda": False, "cuda_reason": "no GPU was visible at build time"}
    with pytest.warns(RuntimeWarning, match="no GPU was visible at build time.*IDDPM_EXT_CUDA=1"):
        assert loader.warn_missing_cuda_kernels(info)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not loader.warn_missing_cuda_kernels({"cuda": True, "cuda_reason": ""})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert not loader.warn_missing_cuda_kernels(info)


@pytest.mark.skipif(
    os.environ.get("IDDPM_EXT_EXPECT_CUDA_BUILD") != "1",
    reason="only where the build must include CUDA (CI sets IDDPM_EXT_EXPECT_CUDA_BUILD=1)",
)
def test_cuda_sources_were_compiled():
    info = iddpm_ext.build_info()
    assert info["cuda"] is True
    assert torch.version.cuda is not None
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_cuda_kernels_registered_when_built():
    has_cuda_impl = torch._C._dispatch_has_kernel_for_dispatch_key("iddpm::gather_coefs", "CUDA")
    assert has_cuda_impl == iddpm_ext.build_info()["cuda"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("iddpm::gather_coefs", "CPU")


def _run(code, **env):
    full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300
    )


def test_without_extension_the_core_works_and_ops_raise_with_rebuild_command():
    code = """
import torch, iddpm_ext
from iddpm_ext import ops
assert not iddpm_ext.extension_available()
d = iddpm_ext.create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine")
x = torch.zeros(2, 3, 4, 4)
out = d.p_sample(lambda x, t: torch.zeros(2, 6, 4, 4), x, torch.tensor([3, 0]))
assert out["sample"].shape == x.shape
try:
    iddpm_ext.build_info()
except iddpm_ext.ExtensionUnavailableError as e:
    print("ERR", e)
try:
    ops.gather_coefs(torch.zeros(3, 2), torch.tensor([0]))
except iddpm_ext.ExtensionUnavailableError as e:
    print("ERR2", e)
"""
    res = _run(code, IDDPM_EXT_DISABLE_C="1")
    assert res.returncode == 0, res.stderr
    assert "ERR iddpm_ext._C was disabled" in res.stdout
    assert "ERR2" in res.stdout


def test_version_mismatch_message_names_both_versions_and_the_rebuild_command():
    assert loader.version_mismatch("2.14.1", "2.14.1") is None
    msg = loader.version_mismatch("2.11.0+cu130", "2.14.1+cu130")
    assert "2.11.0+cu130" in msg and "2.14.1+cu130" in msg
    assert "make build" in msg and "pip install --no-build-isolation" in msg


@pytest.mark.slow
def test_missing_module_message(tmp_path):
    # A copy of the Python package without the compiled module: the error says it is not built.
    import shutil

    pkg = tmp_path / "iddpm_ext"
    shutil.copytree(
        os.path.join(REPO, "iddpm_ext"), pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__")
    )
    code = "import iddpm_ext, iddpm_ext.ops.loader as o; print(o.load_error())"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    site_packages = [p for p in sys.path if "site-packages" in p]
    res = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path[:0]=[{str(tmp_path)!r}] + {site_packages!r}; " + code,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "not built" in res.stdout and "make build" in res.stdout


_TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def test_capabilities_match_what_the_ops_accept():
    from iddpm_ext import _C

    caps = _C.capabilities()
    assert set(caps) == {"cuda", "ops", "step", "attention", "group_norm", "winograd", "attention_bf16"}
    assert caps["cuda"] == iddpm_ext.build_info()["cuda"]
    registered = {
        n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("iddpm::")
    }
    assert set(caps["ops"]) == registered
    for op in ("step", "attention", "group_norm"):
        assert set(caps[op]) == {"cpu", "cuda"}
        assert (caps[op]["cuda"] is None) == (not caps["cuda"])
    assert caps["attention"]["cpu"]["head_dims"] == "any"
    # The step's exp and sqrt are torch's own wherever torch computes them with oneMKL (its
    # x86-64 builds), so the bit-for-bit step tests cannot be skipped there unnoticed.
    mkl_x86 = torch.backends.mkl.is_available() and platform.machine() == "x86_64" and sys.platform == "linux"
    assert caps["step"]["cpu"]["torch_exp_sqrt"] is mkl_x86
    assert caps["group_norm"]["cpu"]["isa"] in ("avx512", "avx2", "default")
    isa, packed = caps["winograd"]["cpu"]["isa"], caps["winograd"]["cpu"]["packed"]
    assert caps["winograd"] == {
        "cpu": {"dtypes": ["float32", "bfloat16"], "isa": isa, "packed": packed},
        "cuda": None,
    }
    assert isa in ("avx512", "avx2", "default") and isinstance(packed, bool)
    bf16 = caps["attention_bf16"]
    if "IDDPM_ATTN_CPU_ISA" not in os.environ:  # both need AVX512-BF16 (and AVX-512 F/BW)
        assert packed == (bf16["cpu"]["isa"] == "avx512_bf16")
    assert (
        bf16["cuda"] is None and bf16["cpu"]["dtypes"] == ["bfloat16"] and bf16["cpu"]["head_dims"] == "any"
    )
    assert bf16["cpu"]["isa"] in ("avx512_bf16", "avx512", "avx2", "generic")
    for name, dtype in _TORCH_DTYPES.items():  # the listed dtype runs, every other is a ValueError
        qkv = torch.randn(1, 3 * 2 * 5, 7).to(dtype)
        if name in bf16["cpu"]["dtypes"]:
            assert torch.ops.iddpm.qkv_attention_bf16(qkv, 2).dtype == dtype
        else:
            with pytest.raises(ValueError, match="qkv: expected dtype bfloat16"):
                torch.ops.iddpm.qkv_attention_bf16(qkv, 2)
    if caps["cuda"]:
        cuda = caps["attention"]["cuda"]
        assert cuda["head_dims"] and all(isinstance(c, int) for c in cuda["head_dims"])
        # Every multiple of the step up to the largest, all listed (the checks' rule).
        step, top = cuda["head_dim_step"], cuda["max_head_dim"]
        assert cuda["head_dims"] == list(range(step, top + 1, step)) and top == 256
        assert set(cuda["dtypes"]) <= set(_TORCH_DTYPES) and cuda["max_positions"] > 0
        assert set(caps["step"]["cuda"]["dtypes"]) <= set(_TORCH_DTYPES)

    # CPU attention: every listed dtype runs (any head dim), every other one is a ValueError.
    listed = caps["attention"]["cpu"]["dtypes"]
    for name, dtype in _TORCH_DTYPES.items():
        qkv = torch.randn(1, 3 * 2 * 5, 7).to(dtype)  # 2 heads of head dim 5
        if name in listed:
            out, lse = torch.ops.iddpm.qkv_attention(qkv, 2)
            assert out.dtype == dtype and out.shape == (1, 10, 7)
        else:
            with pytest.raises(ValueError, match="qkv: expected dtype"):
                torch.ops.iddpm.qkv_attention(qkv, 2)
    with pytest.raises(ValueError, match="qkv: expected dtype"):
        torch.ops.iddpm.qkv_attention(torch.ones(1, 6, 3, dtype=torch.int64), 1)

    # CPU step: the same for x's dtype.
    listed = caps["step"]["cpu"]["dtypes"]
    table = torch.rand(10, 20)  # [T, K] coefficient table (K >= the 18 columns the kernels read)
    for name, dtype in _TORCH_DTYPES.items():
        x = torch.randn(2, 3, 4, 4).to(dtype)
        args = (x, torch.randn(2, 3, 4, 4), torch.tensor([0, 5]), table, "epsilon", "fixed_small", True)
        if name in listed:
            sample, _ = torch.ops.iddpm.p_sample_step(*args)
            assert sample.dtype == dtype
        else:
            with pytest.raises(ValueError, match="x: expected dtype"):
                torch.ops.iddpm.p_sample_step(*args)


@pytest.mark.gpu
def test_cuda_capabilities_match_what_the_ops_accept():
    from iddpm_ext import _C

    cuda = _C.capabilities()["attention"]["cuda"]
    # Unsupported head dims too: the first H100 run crashed on head dim 96 (issue 13, then
    # without a kernel).
    for name, dtype in _TORCH_DTYPES.items():
        for head_dim in (*cuda["head_dims"], 4, 100, 264):
            qkv = torch.randn(1, 3 * head_dim, 64, device="cuda").to(dtype)
            if name in cuda["dtypes"] and head_dim in cuda["head_dims"]:
                out, _ = torch.ops.iddpm.qkv_attention(qkv, 1)
                assert out.dtype == dtype
            else:
                with pytest.raises(ValueError, match="qkv: expected"):
                    torch.ops.iddpm.qkv_attention(qkv, 1)


def test_default_cuda_arch_list_follows_the_visible_gpus(monkeypatch):
    """cmake/torch_info.py tells CMake the visible GPUs' architectures (the default arch list;
    none visible, or CUDA failing to initialise: CMakeLists falls back to 9.0+PTX)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_info", os.path.join(REPO, "cmake", "torch_info.py"))
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    caps = {0: (9, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    assert info._visible_cuda_archs() == ["8.0", "9.0"]

    def broken(i):
        raise RuntimeError("driver")

    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    assert info._visible_cuda_archs() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert info._visible_cuda_archs() == []
    text = open(os.path.join(REPO, "CMakeLists.txt")).read()
    assert 'set(IDDPM_NO_GPU_ARCH_LIST "9.0+PTX")' in text and "elseif(VISIBLE_CUDA_ARCHS)" in text


@pytest.mark.slow
def test_cuda_is_built_only_where_a_gpu_is_visible(tmp_path):
    """Configure (no build) with IDDPM_EXT_CUDA unset and no GPU visible: CPU only, and the
    configure output says why and how to build the CUDA kernels anyway."""
    import shutil

    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    env = {k: v for k, v in os.environ.items() if k != "IDDPM_EXT_CUDA"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    proc = subprocess.run(
        [cmake, "-S", REPO, "-B", str(tmp_path), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if torch.version.cuda:
        expected = "building CPU only (no GPU was visible at build time: IDDPM_EXT_CUDA=1 builds"
    else:
        expected = "building CPU only (the installed torch"
    assert expected in proc.stdout, proc.stdout


def _nvcc():
    from helpers.emulation import cuda_include

    inc = cuda_include()
    nvcc = inc is not None and (inc.parent / "bin" / "nvcc")
    return str(nvcc) if nvcc and nvcc.exists() else shutil.which("nvcc")


# Every CUDA source but the sm_90a one (built for sm_90a alone), as CMakeLists.txt compiles them.
TURING_SOURCES = ["attention_fwd.cu", "attention_bwd.cu", "step.cu", "gather_coefs.cu", "group_norm.cu"]


@pytest.mark.skipif(
    os.environ.get("IDDPM_EXT_EXPECT_CUDA_BUILD") != "1" and _nvcc() is None,
    reason="needs nvcc (CI has it: IDDPM_EXT_EXPECT_CUDA_BUILD=1)",
)
@pytest.mark.parametrize("source", TURING_SOURCES)
def test_cuda_sources_compile_for_turing(source, tmp_path):
    # CI builds for 9.0 only; a T4 user's TORCH_CUDA_ARCH_LIST=7.5 must build too: the attention
    # kernels need sm_80 (cp.async, bf16/TF32 mma) and compile with empty bodies there, the
    # other kernels in full. CUDA 13's oldest target is 7.5.
    nvcc = _nvcc()
    assert nvcc is not None, "IDDPM_EXT_EXPECT_CUDA_BUILD=1 but no nvcc"
    csrc = os.path.join(REPO, "csrc")
    cmd = [nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-Wno-deprecated-gpu-targets", "-Werror",
           "all-warnings", f"-I{csrc}",
           "-gencode", "arch=compute_75,code=sm_75", "-c", os.path.join(csrc, "cuda", source),
           "-o", str(tmp_path / "k.o")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
