"""Mixed precision of the network alone: the autocast modes the trainer and the sampling and
likelihood commands take (``--amp none|bf16|fp16``), and the wrapper that runs a model under
``torch.autocast`` while the diffusion around it (losses, sampling steps, bounds) stays float32."""

from __future__ import annotations

import torch

AMP_MODES = ("none", "bf16", "fp16")


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` in AMP_MODES (None for "none")."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp: expected one of {list(AMP_MODES)}, got {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class AutocastModel:
    """Calls ``model`` under ``torch.autocast(device_type, dtype)`` and returns its output as
    float32, so only the network runs in low precision. Attribute reads fall through to the
    model (``num_classes``, ``iddpm_config``)."""

    def __init__(self, model, device_type: str, dtype: torch.dtype):
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.model(*args, **kwargs)
        return out.float()

    def __getattr__(self, name):
        # Not the wrapper's own fields (not yet set while copy / pickle rebuild it) nor dunders
        # (on Python 3.10 object has no __getstate__: the model's would be taken).
        if name.startswith("__") or name in ("model", "device_type", "dtype"):
            raise AttributeError(name)
        return getattr(self.model, name)


def with_amp(model, amp: str, device):
    """``model`` itself for amp "none", else :class:`AutocastModel` on ``device``'s type."""
    dtype = amp_dtype(amp)
    return model if dtype is None else AutocastModel(model, torch.device(device).type, dtype)
