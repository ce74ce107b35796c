"""``iddpm bench gather_coefs`` (alias ``gather``): iddpm::gather_coefs against torch indexing
of the same table."""

from __future__ import annotations

import torch

from .. import ops
from ..script_util import create_gaussian_diffusion
from . import common


def run(args) -> list:
    device = torch.device(args.device)
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    table = diffusion.coef_table(device)
    records = []
    for batch in (64,) if args.quick else (1, 64, 4096):
        t = torch.randint(0, 1000, (batch,), device=device)
        moved = batch * table.shape[1] * 4 * 2 + batch * 8
        impls = {"torch indexing": lambda: table[t]}
        if ops.has_kernel(device):
            impls["iddpm::gather_coefs"] = lambda: ops.gather_coefs(table, t)
        base = None
        for impl, fn in impls.items():
            ms = common.time_ms(fn, device, args.warmup, args.iters, flush_l2=False)
            base = base or ms
            records.append(
                common.emit(
                    args,
                    common.record(
                        "gather_coefs",
                        impl,
                        [batch, table.shape[1]],
                        torch.float32,
                        device,
                        ms,
                        bytes_moved=moved,
                        speedup=round(base / ms, 2),
                    ),
                )
            )
    return records
