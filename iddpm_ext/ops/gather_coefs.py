"""iddpm::gather_coefs — rows of a per-timestep coefficient table (csrc/ops/gather_coefs.cpp)."""

from __future__ import annotations

import torch

from . import loader


def gather_coefs(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows of a per-timestep coefficient table: ``out[b] = table[t[b]]``.

    table: [T, K] float32; t: [B] int64/int32 on table's device -> [B, K] float32.
    On CPU an out-of-range ``t`` raises ValueError; on CUDA it gives NaN rows (no sync).
    """
    loader.require()
    return torch.ops.iddpm.gather_coefs(table, t)


if loader.available():

    @torch.library.register_fake("iddpm::gather_coefs")
    def _gather_coefs_fake(table, t):
        torch._check(table.dim() == 2, lambda: "table: expected a 2-D tensor [T, K]")
        torch._check(t.dim() == 1, lambda: "t: expected a 1-D tensor [B]")
        return table.new_empty((t.shape[0], table.shape[1]))
