"""The TrainLoop's option parsing and the reference's environment hooks (``$DIFFUSION_BLOB_LOGDIR``,
``$DIFFUSION_TRAINING_TEST``)."""

from __future__ import annotations

import os

from .. import logger

# TrainLoop(compile=...): "none" or a torch.compile mode ("reduce-overhead" and "max-autotune"
# add CUDA graphs on CUDA).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def uses_cudagraphs(compile_kwargs: dict | None) -> bool:
    """Whether torch.compile with these keyword arguments runs CUDA graphs (its mode's or its
    options' ``triton.cudagraphs``): then each training step must be marked as a new one."""
    if not compile_kwargs:
        return False
    options = dict(compile_kwargs.get("options") or {})
    if "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    mode = compile_kwargs.get("mode")
    if not mode:
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def blob_logdir():
    """Where the reference's trainer saves: ``$DIFFUSION_BLOB_LOGDIR`` when set, else the
    logger's folder (the default logger's, made now, when none was configured)."""
    return os.environ.get("DIFFUSION_BLOB_LOGDIR") or logger.get_dir()


def training_test_mode() -> bool:
    """The reference's hook for integration tests: with ``$DIFFUSION_TRAINING_TEST`` set (to
    anything non-empty), ``run_loop`` returns after its first checkpoint."""
    return bool(os.environ.get("DIFFUSION_TRAINING_TEST", ""))


def parse_ema_rates(ema_rate) -> list:
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    else:
        try:
            rates = [float(x) for x in str(ema_rate).split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"ema_rate: expected comma-separated floats like '0.9999', got {ema_rate!r}"
            ) from None
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ema_rate: expected rates in [0, 1), got {r}")
    return rates


def compile_options(compile) -> dict | None:
    """``TrainLoop(compile=...)`` as keyword arguments of ``torch.compile`` (None: not compiled).

    ``"none"``/None/False: eager; a mode of COMPILE_MODES; or a dict of ``torch.compile``
    keyword arguments (e.g. ``{"backend": "aot_eager"}``). Shapes are static unless the dict
    says otherwise (a training run has one or two batch shapes)."""
    if compile is None or compile is False or compile == "none":
        return None
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected one of {list(COMPILE_MODES)}, got {compile!r}")
        return {"mode": compile, "dynamic": False}
    if isinstance(compile, dict):
        return {"dynamic": False, **compile}
    raise ValueError(
        f"compile: expected one of {list(COMPILE_MODES)} or a dict of torch.compile arguments, "
        f"got {compile!r}"
    )
