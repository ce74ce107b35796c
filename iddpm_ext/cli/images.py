"""Sample files: ``samples_NxHxWxC.npz`` (the reference's format: arr_0 uint8 [N, H, W, C],
arr_1 labels), PNG grids (Pillow) and trajectory figures (matplotlib), written atomically."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch

from ..io import atomic_write, atomic_write_bytes


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C] (as the reference's image_sample)."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def samples_filename(images: np.ndarray) -> str:
    return "samples_" + "x".join(str(s) for s in images.shape) + ".npz"


def save_npz(path: str, images: np.ndarray, labels=None, overwrite: bool = False):
    """arr_0 = images uint8 [N, H, W, C], arr_1 = labels (when given); atomic, and an
    existing file is an error unless ``overwrite``."""
    arrays = [images] if labels is None else [images, labels]
    atomic_write(path, lambda f: np.savez(f, *arrays), overwrite=overwrite)


def grid_image(images: np.ndarray, ncol: int | None = None, scale: int = 1, pad: int = 2):
    """A PIL image tiling uint8 [N, H, W, C] images (C 1 or 3), ``scale``× nearest."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    return img


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def default_scale(h: int) -> int:
    return max(1, 96 // max(h, 1))


def save_grid(path: str, images: np.ndarray, ncol=None, scale=None, overwrite: bool = False):
    scale = scale or default_scale(images.shape[1])
    atomic_write_bytes(path, _png_bytes(grid_image(images, ncol, scale)), overwrite=overwrite)


def save_trajectory(path: str, trajectory, overwrite: bool = False, diffusion=None, cell_px: int = 48):
    """A figure of x_t along the chain: one row per sample, one column per kept step (noisy to
    clean), each column labelled with its timestep t: the sample right after the denoising
    step at t, in the original process's numbering when ``diffusion`` (respaced or not) is
    given. Returns the matplotlib Figure (None for an empty trajectory)."""
    from ..training.plots import image_grid_figure, png_bytes

    if not trajectory:
        return None
    frames = [to_uint8(f).numpy() for _, f in trajectory]  # each [k, H, W, C]
    ts = [int(t) for t, _ in trajectory]
    steps = getattr(diffusion, "timestep_map", None)
    if steps is not None:
        ts = [int(steps[t]) for t in ts]
    T = getattr(diffusion, "original_num_steps", getattr(diffusion, "num_timesteps", None))
    k = frames[0].shape[0]
    cells = [[f[i] for f in frames] for i in range(k)]
    fig = image_grid_figure(
        cells,
        None,
        row_labels=[str(i) for i in range(k)],
        col_labels=[f"t={t}" for t in ts],
        title=f"Denoising trajectories of the first {k} samples",
        xlabel="the sample after the denoising step at timestep t" + (f" (of T = {T})" if T else ""),
        ylabel="sample",
        cell_px=cell_px,
    )
    atomic_write_bytes(path, png_bytes(fig), overwrite=overwrite)
    return fig


def check_outputs_free(paths):
    """FileExistsError naming the first path that exists (checked before any work)."""
    for p in paths:
        if p and os.path.exists(p):
            raise FileExistsError(f"{p}: already exists; choose another --out_dir or pass --overwrite True")
