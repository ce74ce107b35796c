"""Checkpoint files: atomic writes, safetensors weights with their config, training state.

A training run's folder holds, for each saved step S (names as improved-diffusion's,
with safetensors in place of pickles):

    model{S:06d}.safetensors         model weights; metadata: config, step, version
    ema_{rate}_{S:06d}.safetensors   EMA weights for each rate (same metadata + rate)
    opt{S:06d}.pt                    optimizer, AMP scaler, step, RNG states of every rank,
                                     timestep-sampler history, data position (tensors and
                                     plain Python values only: loads with weights_only=True)
    latest.json                      the newest complete step and its files, written last

Every file is written to a temporary file in the same folder, fsync'ed and renamed over
its name, and ``latest.json`` only after all files of its step exist, so a kill at any
moment leaves the previous ``latest.json`` pointing at a complete, loadable set.

``config`` is the JSON of :func:`iddpm_ext.script_util.model_and_diffusion_defaults`'s
keys (the arguments of ``create_model_and_diffusion``). Reference ``.pt`` state dicts
(improved-diffusion's ``model*.pt`` / ``ema_*.pt``) load with ``torch.load(...,
weights_only=True)``; their config comes from the flags.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .. import script_util
from ..errors import CheckpointError, CheckpointNotFoundError
from ..io import atomic_write, atomic_write_bytes, remove_stale_temporaries  # noqa: F401

FORMAT = "iddpm_ext"
LATEST = "latest.json"

# Keys that change what a set of weights means: a checkpoint and the flags must agree on
# these. Others (timestep_respacing, dropout, use_checkpoint, use_kl, ...) may differ.
CHECKED_KEYS = (
    "image_size",
    "image_channels",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_heads_upsample",
    "attention_resolutions",
    "channel_mult",
    "learn_sigma",
    "class_cond",
    "num_classes",
    "use_scale_shift_norm",
    "diffusion_steps",
    "noise_schedule",
    "predict_xstart",
    "rescale_timesteps",
    "sigma_small",
)


# -------------------------------------------------------------------------------------
# configs
# -------------------------------------------------------------------------------------


def normalize_config(config: dict) -> dict:
    """Comparable values: attention sizes as a sorted list, channel_mult resolved from
    the image size, num_heads_upsample resolved, num_classes only when class_cond."""
    c = dict(config)
    if "attention_resolutions" in c:
        a = c["attention_resolutions"]
        parts = a.split(",") if isinstance(a, str) else a
        c["attention_resolutions"] = sorted(int(p) for p in parts if str(p).strip())
    if "channel_mult" in c:
        try:
            c["channel_mult"] = list(
                script_util._channel_mult(c["channel_mult"], c.get("image_size"), "image_size")
            )
        except ValueError:
            pass
    if c.get("num_heads_upsample", None) == -1:
        c["num_heads_upsample"] = c.get("num_heads")
    if "class_cond" in c and not c["class_cond"]:
        c.pop("num_classes", None)
    return c


def config_differences(stored: dict, wanted: dict, keys=CHECKED_KEYS) -> list:
    """[(key, stored value, wanted value)] for the checked keys that disagree."""
    a, b = normalize_config(stored), normalize_config(wanted)
    return [(k, a.get(k), b.get(k)) for k in keys if k in a and k in b and a[k] != b[k]]


def check_config(path: str, stored: dict, wanted: dict, explicit=None):
    """Raise a CheckpointError when the flags in ``explicit`` (all when None) disagree with
    the checkpoint's config."""
    keys = [k for k in CHECKED_KEYS if explicit is None or k in explicit]
    diffs = config_differences(stored, wanted, keys)
    if diffs:
        what = ", ".join(f"{k}={s!r} in the checkpoint but {w!r} from the flags" for k, s, w in diffs)
        raise CheckpointError(
            f"{path}: the checkpoint's config disagrees with the flags: {what}. "
            "Drop those flags (the checkpoint's values are used) or pass a matching checkpoint."
        )


# -------------------------------------------------------------------------------------
# weights
# -------------------------------------------------------------------------------------


def save_weights(path: str, state_dict: dict, config: dict, **meta):
    """Weights [name -> tensor] as safetensors with ``config`` (JSON) and ``meta`` in the header."""
    from safetensors.torch import save

    from ..version import __version__

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "version": __version__, "config": json.dumps(config, sort_keys=True)}
    metadata.update({k: str(v) for k, v in meta.items()})
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def check_exists(path: str):
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file")


def load_weights(path: str):
    """(state_dict, config or None, metadata) from a .safetensors or a reference .pt file."""
    check_exists(path)
    if path.endswith(".pt") or path.endswith(".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated zip, pickle refused, ...
            raise CheckpointError(
                f"{path}: cannot load this .pt file with weights_only=True ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors (a model*.pt / ema_*.pt file)")
        return state, None, {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError
        raise CheckpointError(
            f"{path}: not a readable safetensors file, truncated or corrupt? ({type(err).__name__}: {err})"
        ) from None
    config = None
    if "config" in metadata:
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: its config metadata is not valid JSON ({err})") from None
    return state, config, metadata


def check_step(path: str, metadata: dict, step: int):
    """CheckpointError when the step stored in a checkpoint file (its metadata's ``step``;
    reference files store none) is not the step it was taken for: a hand-edited or mixed-up
    latest.json, or a renamed file."""
    stored = (metadata or {}).get("step")
    if stored is None:
        return
    try:
        stored = int(stored)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: its step metadata is not an int ({stored!r})") from None
    if stored != int(step):
        raise CheckpointError(
            f"{path}: holds step {stored}, but is used as step {step} (latest.json or the file name "
            "says so); refusing to mix the files of different steps"
        )


def load_into(model: torch.nn.Module, state: dict, path: str):
    """Strict load with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model, e.g. {shapes[:3]})")
        raise CheckpointError(
            f"{path}: the weights do not fit the model built from the flags: " + "; ".join(parts)
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# -------------------------------------------------------------------------------------
# training state
# -------------------------------------------------------------------------------------


def save_train_state(path: str, state: dict):
    """A dict of tensors and plain values (loadable with weights_only=True), atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_train_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot load the training state ({type(err).__name__}: {err})"
        ) from None


def write_latest(folder: str, step: int, files: dict):
    from ..version import __version__

    record = {"step": int(step), "version": __version__, **files}
    atomic_write_bytes(os.path.join(folder, LATEST), (json.dumps(record, indent=1) + "\n").encode())


def read_latest(folder: str) -> dict | None:
    path = os.path.join(folder, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        int(record["step"])
        record["model"]
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: not a valid checkpoint pointer ({type(err).__name__}: {err})"
        ) from None
    return record


_STEP_RE = re.compile(r"(?:model|ema_[0-9.]+_|opt)(\d+)\.(?:safetensors|pt)$")


def step_from_filename(path: str) -> int:
    """The step of ``model000100.safetensors`` / ``ema_0.9999_000100.pt`` etc., or 0."""
    m = _STEP_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else 0


def resolve_resume(path: str) -> dict:
    """The files of a checkpoint to resume from.

    ``path``: a run folder or its latest.json (the newest complete step), or one
    ``model{S}.safetensors`` / reference ``model{S}.pt`` file (siblings of step S are used
    when present). Returns {"step", "model", "ema": {rate: path}, "opt": path or None}.
    """
    if os.path.isdir(path) or os.path.basename(path) == LATEST:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        latest = read_latest(folder)
        if latest is None:
            raise CheckpointError(f"{path}: no {LATEST} here (not a training run folder, or it never saved)")
        files = {
            "step": latest["step"],
            "model": os.path.join(folder, latest["model"]),
            "ema": {r: os.path.join(folder, p) for r, p in latest.get("ema", {}).items()},
            "opt": os.path.join(folder, latest["opt"]) if latest.get("opt") else None,
        }
    else:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such checkpoint file or folder")
        folder, step = os.path.dirname(path), step_from_filename(path)
        ext = os.path.splitext(path)[1]
        ema = {}
        prefix = "ema_"
        for name in sorted(os.listdir(folder or ".")):
            if name.startswith(prefix) and name.endswith(f"_{step:06d}{ext}"):
                ema[name[len(prefix) : -len(f"_{step:06d}{ext}")]] = os.path.join(folder, name)
        opt = os.path.join(folder, f"opt{step:06d}.pt")
        files = {"step": step, "model": path, "ema": ema, "opt": opt if os.path.isfile(opt) else None}
    for p in [files["model"], *files["ema"].values()] + ([files["opt"]] if files["opt"] else []):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: listed by the checkpoint but missing")
    return files


def model_path_from(path: str, prefer_ema: bool = True) -> str:
    """A weights file from ``path``: itself, or for a run folder its latest EMA (or model)."""
    if os.path.isdir(path) or os.path.basename(path) == LATEST:
        files = resolve_resume(path)
        if prefer_ema and files["ema"]:
            return next(iter(files["ema"].values()))  # the first --ema_rate
        return files["model"]
    return path
