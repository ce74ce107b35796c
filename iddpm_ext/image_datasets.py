"""``improved_diffusion.image_datasets`` under its own name: ``load_data`` as the reference's
training scripts call it, over this library's data sources (docs/training.md, "Data").

``data_dir`` may be anything ``iddpm train --data_dir`` takes: an image folder (recursive
jpg/jpeg/png/gif, class = file-name prefix before the first ``_``), a ``.npz`` (uint8 NHWC
``arr_0``, labels ``arr_1``), a CIFAR-10 python-batches folder, or ``digits``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import dist_util
from .training.data import BatchStream, DataError, list_image_files, load_image, open_source

__all__ = ["load_data", "list_image_files", "ImageDataset"]

# The reference's private name, which scripts built on it import.
_list_image_files_recursively = list_image_files


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    image_channels=3,
    random_flip=False,
    seed=0,
):
    """An endless iterator of ``(images, kwargs)``: images float32 [B, C, H, W] in [-1, 1],
    kwargs ``{"y": int64 [B]}`` when ``class_cond`` else ``{}``.

    As the reference: resize + center crop to ``image_size``, each process (rank) reads its
    own shard, whole batches only, shuffled unless ``deterministic``. Additions (keyword
    only, defaults = the reference's behaviour): ``image_channels`` (1 or 3), ``random_flip``,
    ``seed`` of the shuffle order. The iterator has ``state_dict`` / ``load_state_dict`` for
    exact resumption. At each epoch start it draws from torch's global generator what the
    reference's DataLoader draws (one int64, two when shuffling), so a seeded script gets the
    reference's noise afterwards.
    """
    if not data_dir:
        raise DataError("data_dir: unspecified data directory (a folder, a .npz file, or 'digits')")
    source = open_source(str(data_dir), image_size=image_size, image_channels=image_channels)
    return BatchStream(
        source,
        batch_size,
        rank=dist_util.get_rank(),
        world=dist_util.get_world_size(),
        seed=seed,
        shuffle=not deterministic,
        random_flip=random_flip,
        class_cond=class_cond,
        loader_rng_draws=True,
    )


class ImageDataset(torch.utils.data.Dataset):
    """The reference's map-style dataset over image files, for code that builds its own
    ``DataLoader``: item ``i`` is (float32 [3, resolution, resolution] in [-1, 1],
    ``{"y": int64 array}`` when ``classes`` is given else ``{}``); this process's shard is
    ``image_paths[shard::num_shards]``. Pixels as ``load_data``'s (box halving, bicubic,
    centre crop, RGB)."""

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        arr = load_image(self.local_images[idx], self.resolution, 3).astype(np.float32) / 127.5 - 1
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict
