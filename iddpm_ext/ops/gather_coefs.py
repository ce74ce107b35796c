"""iddpm::gather_coefs — rows of a per-timestep coefficient table (csrc/ops/gather_coefs.cpp)."""

from __future__ import annotations

import torch

from . import checks, loader


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
        # The checks of csrc/ops/gather_coefs.cpp, in its order (meta mixed with CPU lands here).
        checks.dim(table, "table", 2, "[T, K]")
        checks.dtype_in(table, "table", (torch.float32,))
        checks.dim(t, "t", 1, "[B]")
        checks.index_dtype(t, "t")
        checks.same_device(t, "t", table, "table")
        torch._check_value(
            table.shape[0] >= 1 or t.shape[0] == 0,
            lambda: (
                f"table: expected at least one row (T >= 1) to gather {t.shape[0]} timesteps from, "
                f"got shape {list(table.shape)}"
            ),
        )
        return table.new_empty((t.shape[0], table.shape[1]))
