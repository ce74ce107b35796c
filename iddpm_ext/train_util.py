"""``improved_diffusion.train_util`` under its own name: ``TrainLoop`` (this library's
trainer, :mod:`iddpm_ext.training.loop`, which takes the reference's keyword arguments and,
as the reference, saves to the logger's folder unless ``out_dir`` is given) and the
reference's helper functions."""

from __future__ import annotations

import os

from . import logger
from .training.loop import TrainLoop
from .training.options import blob_logdir

__all__ = [
    "TrainLoop",
    "parse_resume_step_from_filename",
    "get_blob_logdir",
    "find_resume_checkpoint",
    "find_ema_checkpoint",
    "log_loss_dict",
]


def parse_resume_step_from_filename(filename) -> int:
    """The step in a checkpoint name like ``path/to/modelNNNNNN.pt`` (or ``.safetensors``);
    0 when the name carries none."""
    parts = str(filename).split("model")
    if len(parts) < 2:
        return 0
    digits = parts[-1].split(".")[0]
    try:
        return int(digits)
    except ValueError:
        return 0


def get_blob_logdir():
    """Where the reference's trainer saves checkpoints: ``$DIFFUSION_BLOB_LOGDIR`` when set,
    else the logger's folder."""
    return blob_logdir()


def find_resume_checkpoint():
    """Hook for automatic resumption (the reference's returns None too)."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """The EMA file saved beside ``main_checkpoint`` for ``step`` and ``rate``
    (``ema_{rate}_{step:06d}`` as .safetensors, this trainer's format, or .pt, the
    reference's), or None."""
    if main_checkpoint is None:
        return None
    folder = os.path.dirname(main_checkpoint)
    for ext in (".safetensors", ".pt"):
        path = os.path.join(folder, f"ema_{rate}_{step:06d}{ext}")
        if os.path.exists(path):
            return path
    return None


def log_loss_dict(diffusion, ts, losses):
    """logkv_mean of each loss term's mean and of its values per quarter of the timesteps
    (``{key}_q0`` .. ``{key}_q3``), as the reference logs them."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for t, v in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            logger.logkv_mean(f"{key}_q{int(4 * t / diffusion.num_timesteps)}", v)
