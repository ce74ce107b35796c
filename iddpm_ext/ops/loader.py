"""Loading of the compiled extension ``iddpm_ext._C``.

``_C`` registers the ``iddpm`` torch ops (schemas in python/schemas.cpp, CPU/CUDA kernels in
csrc/). This module loads it and checks that it was built against the running torch; the
per-op Python wrappers, fake (meta) implementations and autograd formulas live beside it in
:mod:`iddpm_ext.ops`. When ``_C`` is missing or unusable the pure-Python parts of the
library keep working and every op wrapper raises :class:`ExtensionUnavailableError`
that says what happened and the one command that rebuilds.
"""

from __future__ import annotations

import os

import torch

from ..errors import ExtensionUnavailableError

REBUILD_COMMAND = "make build   (or: pip install --no-build-isolation --no-deps -e .)"
_PACKAGE = __package__.rpartition(".")[0]  # iddpm_ext

_C = None
_LOAD_ERROR: str | None = None


def _load():
    global _C, _LOAD_ERROR
    if os.environ.get("IDDPM_EXT_DISABLE_C", "") == "1":
        _LOAD_ERROR = "iddpm_ext._C was disabled by IDDPM_EXT_DISABLE_C=1"
        return
    import importlib.util

    if importlib.util.find_spec(_PACKAGE + "._C") is None:
        _LOAD_ERROR = (
            "iddpm_ext._C is not built, so the fused kernels are unavailable. "
            f"Build it with: {REBUILD_COMMAND}"
        )
        return
    try:
        mod = importlib.import_module(_PACKAGE + "._C")  # torch is imported above, as _C requires
    except ImportError as exc:
        _LOAD_ERROR = (
            f"iddpm_ext._C failed to load ({exc}). This usually means it was built against a "
            f"different torch than the running torch {torch.__version__}. "
            f"Rebuild with: {REBUILD_COMMAND}"
        )
        return
    info = mod.build_info()
    _LOAD_ERROR = version_mismatch(info["torch_version"], torch.__version__)
    if _LOAD_ERROR is None:
        _C = mod
        warn_missing_cuda_kernels(info)


def warn_missing_cuda_kernels(info: dict) -> bool:
    """Warn (once per process) when a GPU is visible but ``_C`` was built without CUDA
    kernels: by default they are built only where a GPU is visible, so a build made in a
    container build or on a login node and run on a GPU machine would otherwise fall back to
    the readable PyTorch paths silently. Returns whether it warned."""
    if info.get("cuda") or not torch.cuda.is_available():
        return False
    import warnings

    reason = info.get("cuda_reason") or "unknown"
    warnings.warn(
        f"iddpm_ext._C has no CUDA kernels ({reason}), so CUDA tensors take the readable PyTorch "
        f"paths. Rebuild on this machine ({REBUILD_COMMAND}) or with IDDPM_EXT_CUDA=1.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def version_mismatch(built: str, running: str) -> str | None:
    """The error text when _C was built against another torch than the running one."""
    if built == running:
        return None
    return (
        f"iddpm_ext._C was built against torch {built} but torch {running} is running; "
        f"its kernels are disabled. Rebuild with: {REBUILD_COMMAND}"
    )


_load()


def available() -> bool:
    """True when the compiled kernels can be used."""
    return _C is not None


def load_error() -> str | None:
    """Why the compiled kernels are unavailable (None when they are available)."""
    return _LOAD_ERROR


def require():
    """Raise :class:`ExtensionUnavailableError` unless the compiled kernels are usable."""
    if _C is None:
        raise ExtensionUnavailableError(_LOAD_ERROR)
    return _C


def build_info() -> dict:
    """How iddpm_ext._C was built: version, torch_version, cuda, cuda_version,
    arch_list, cuda_reason (why CUDA was not built; "" when it was), compiler, build_type,
    attention_sm90 (the Hopper attention forward compiled in: only for an arch list with 9.0).
    Raises ExtensionUnavailableError without _C."""
    return dict(require().build_info())


def has_kernel(device: torch.device | str) -> bool:
    """True when ``_C`` has kernels for tensors on ``device``."""
    if _C is None:
        return False
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return bool(_C.build_info()["cuda"])
    return False


_cpu_has_amx = None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (asked once; torch's private probe, False where it is
    absent). Where it has them, torch's own bf16 kernels (oneDNN convs, CPU flash attention) run on
    them, and "auto" keeps bf16 convs and attention on torch's."""
    global _cpu_has_amx
    if _cpu_has_amx is None:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        _cpu_has_amx = bool(probe()) if probe is not None else False
    return _cpu_has_amx


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


_CAPABILITY_OPS = ("step", "attention", "group_norm", "winograd", "attention_bf16")


def capabilities() -> dict:
    """What the kernels of ``_C`` accept, as ``_C.capabilities()`` reports it from the same
    C++ constants its argument checks use, with dtype names turned into torch dtypes::

        {"ops": [...], "step": {"cpu": {"dtypes": (...)}, "cuda": ... or None},
         "attention": {"cpu": {"dtypes": (...), "head_dims": "any"},
                       "cuda": {"dtypes": (...), "head_dims": (8, 16, ..., 256), "head_dim_step": 8,
                                "max_head_dim": 256, "max_positions": N, ...} or None},
         "group_norm": {"cpu": {"dtypes": (...), "isa": "avx512"}, "cuda": {"dtypes": (...)} or None},
         "winograd": {"cpu": {"dtypes": (torch.float32, torch.bfloat16), "isa": "avx512",
                              "packed": True}, "cuda": None},
         "attention_bf16": {"cpu": {"dtypes": (torch.bfloat16,), "head_dims": "any",
                                    "isa": "avx512_bf16"}, "cuda": None}}

    Without ``_C``: no ops and None for every device."""
    if _C is None:
        return {"ops": [], **{op: {"cpu": None, "cuda": None} for op in _CAPABILITY_OPS}}
    caps = _C.capabilities()

    def convert(entry):
        if entry is None:
            return None
        out = dict(entry)
        out["dtypes"] = tuple(_DTYPES[n] for n in entry["dtypes"])
        if isinstance(entry.get("head_dims"), list):
            out["head_dims"] = tuple(entry["head_dims"])
        return out

    return {
        "ops": list(caps["ops"]),
        # (an op a stale _C predates: no kernel on either device, rather than a KeyError)
        **{op: {d: convert(caps.get(op, {}).get(d)) for d in ("cpu", "cuda")} for op in _CAPABILITY_OPS},
    }
