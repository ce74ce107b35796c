"""Image data sets for training and evaluation, and a resumable, sharded batch stream.

Sources (``open_source(spec, ...)``):

* ``digits`` — the 1797 8×8 handwritten digits that scikit-learn ships (no network;
  ``pip install iddpm-ext[digits]``), values 0..16 scaled to 0..255 and resized to
  ``image_size`` with bilinear interpolation. Fixed split: a permutation by
  ``numpy.random.RandomState(0)``; its first 297 images are ``test``, the other 1500 ``train``.
* a ``.npz`` file: ``arr_0`` uint8 [N, H, W, C] images, optional ``arr_1`` [N] int labels
  (the format ``iddpm sample`` writes).
* a CIFAR-10 "python version" folder as downloaded (``cifar-10-batches-py`` with
  ``data_batch_1..5`` = ``train`` and ``test_batch`` = ``test``), or its parent folder.
* any other folder: images found recursively (.jpg, .jpeg, .png, .gif), in the reference's order; the
  class of a file is its name's prefix before the first ``_`` (as improved-diffusion).
  Each image is resized as the reference does (halve with a box filter while the short
  side is ≥ 2× the size, bicubic to make the short side the size, centre crop) —
  or, with ``resize="none"``, must already be size × size.

Every source gives uint8 [H, W, C] images of the asked size and channel count; the
:class:`BatchStream` turns them into float [B, C, H, W] batches in [-1, 1].
"""

from __future__ import annotations

import functools
import os
import pickle

import numpy as np
import torch

from ..errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif")  # the reference's set (first frame of a GIF)
DIGITS_TEST = 297  # held-out digits (of 1797)
RESIZE_MODES = ("crop", "none")


# -------------------------------------------------------------------------------------
# image helpers
# -------------------------------------------------------------------------------------


def _pil():
    from PIL import Image

    return Image


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [..., H, W, c] with c in (1, 3) -> [..., H, W, channels]."""
    c = arr.shape[-1]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if c == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's "L" mode
        gray = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"images: cannot convert {c} channels to {channels}")


def resize_center_crop(img, size: int):
    """A PIL image scaled so its short side is ``size`` (box-halving first, then bicubic),
    centre-cropped to size × size."""
    Image = _pil()
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """One image file -> uint8 [size, size, channels]; DataError naming the file on failure.

    In the reference's order: the image is scaled and cropped in its own mode (a palette or
    bilevel image with PIL's nearest-neighbour rule, RGBA with premultiplied alpha) and
    converted to RGB (or L) afterwards, so the pixels equal the reference's ``ImageDataset``'s.
    """
    Image = _pil()
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            img.load()
            if resize == "none":
                if img.size != (size, size):
                    raise DataError(
                        f"{path}: expected a {size}x{size} image (resize='none'), got "
                        f"{img.size[0]}x{img.size[1]}; images of mixed sizes need resize='crop'"
                    )
            else:
                img = resize_center_crop(img, size)
            img = img.convert(mode)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types; all mean "unreadable"
        raise DataError(f"{path}: cannot read this image ({type(err).__name__}: {err})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(size, size, channels)


# -------------------------------------------------------------------------------------
# sources
# -------------------------------------------------------------------------------------


class ImageSource:
    """N images of one size: ``get(i)`` -> (uint8 [H, W, C], label or -1)."""

    image_size: int
    channels: int
    labels: np.ndarray | None  # [N] int64, or None when the source has no classes
    class_names: list | None = None
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int):
        raise NotImplementedError

    def get_batch(self, indices) -> np.ndarray:
        """uint8 [B, H, W, C] for ``indices``."""
        return np.stack([self.get(int(i))[0] for i in indices])

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0


class ArraySource(ImageSource):
    """Images held in memory: images uint8 [N, H, W, C], labels [N] or None."""

    def __init__(self, images: np.ndarray, labels=None, description: str = "", class_names=None):
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.image_size = images.shape[1]
        self.channels = images.shape[3]
        self.description = description
        self.class_names = class_names

    def __len__(self):
        return self.images.shape[0]

    def get(self, i):
        return self.images[i], (-1 if self.labels is None else int(self.labels[i]))

    def get_batch(self, indices):
        return self.images[np.asarray(indices, dtype=np.int64)]


class FolderSource(ImageSource):
    """Image files read (and resized) when asked for."""

    def __init__(self, paths, labels, class_names, image_size, channels, resize, description):
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.image_size = image_size
        self.channels = channels
        self.resize = resize
        self.description = description

    def __len__(self):
        return len(self.paths)

    def get(self, i):
        img = load_image(self.paths[i], self.image_size, self.channels, self.resize)
        return img, (-1 if self.labels is None else int(self.labels[i]))


def list_image_files(data_dir: str) -> list:
    """Image files under ``data_dir``, in the reference's order: each folder's entries sorted
    by name, a subfolder's files where its name sorts (depth first); an entry is an image
    when its extension (after the last ".") is jpg, jpeg, png or gif, in any case."""
    found = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            found.extend(list_image_files(path))
        elif "." in name and "." + name.rsplit(".", 1)[1].lower() in IMAGE_EXTS:
            found.append(path)
    return found


def _resize_array(images: np.ndarray, size: int, resize: str, what: str) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, size, size, C] with the folder pipeline (or a check)."""
    n, h, w, c = images.shape
    if h == size and w == size:
        return images
    if resize == "none":
        raise DataError(f"{what}: expected {size}x{size} images (resize='none'), got {h}x{w}")
    Image = _pil()
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = np.asarray(resize_center_crop(img, size)).reshape(size, size, c)
    return out


def load_npz(path, image_size, channels, resize="crop") -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise DataError(f"{path}: expected an array 'arr_0' of images, found {f.files}")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip/format errors of a damaged file
        raise DataError(f"{path}: cannot read this .npz file ({type(err).__name__}: {err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        hint = (
            " (this looks like NCHW; expected NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        )
        raise DataError(
            f"{path}: expected arr_0 as uint8 [N, H, W, C] with C 1 or 3, got "
            f"{images.dtype} {list(images.shape)}{hint}"
        )
    if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
        raise DataError(
            f"{path}: expected arr_1 as {images.shape[0]} integer labels, got "
            f"{labels.dtype} {list(labels.shape)}"
        )
    if labels is not None and len(labels) and labels.min() < 0:
        raise DataError(f"{path}: expected labels >= 0 in arr_1, got {labels.min()}")
    images = _resize_array(_to_channels(images, channels), image_size, resize, path)
    return ArraySource(images, labels, description=f"{path} ({images.shape[0]} images)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    ALLOWED = {
        (core, name)
        for core in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_dir(path: str) -> str | None:
    for cand in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(cand, "data_batch_1")) or os.path.isfile(
            os.path.join(cand, "test_batch")
        ):
            return cand
    return None


def load_cifar10(folder, split, image_size, channels, resize="crop") -> ArraySource:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing CIFAR-10 batch file (the {split} split needs {names})")
        try:
            with open(path, "rb") as f:
                batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        except Exception as err:  # noqa: BLE001 - truncated or foreign pickles
            raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    meta = os.path.join(folder, "batches.meta")
    class_names = None
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                class_names = [
                    n.decode() for n in _NumpyOnlyUnpickler(f, encoding="bytes").load()[b"label_names"]
                ]
        except Exception:  # noqa: BLE001 - names are a nicety
            class_names = None
    arr = _resize_array(_to_channels(np.concatenate(images), channels), image_size, resize, folder)
    return ArraySource(
        arr,
        np.concatenate(labels),
        description=f"CIFAR-10 {split} ({arr.shape[0]} images)",
        class_names=class_names,
    )


def load_digits(split, image_size, channels) -> ArraySource:
    """scikit-learn's handwritten digits as uint8 [N, size, size, C] with labels 0..9."""
    images, labels = _digits_arrays(split, image_size)
    return ArraySource(
        _to_channels(images[..., None].copy(), channels),
        labels.copy(),
        description=f"digits {split} ({len(labels)} images)",
        class_names=[str(d) for d in range(10)],
    )


@functools.lru_cache(maxsize=8)
def _digits_arrays(split, image_size) -> tuple:
    """The split's uint8 [N, size, size] images and labels, read-only (made once per process:
    scikit-learn parses its file on every call, and the demo, reproduce and the tests ask
    for the same splits many times)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError(
            "digits: needs scikit-learn (pip install 'iddpm-ext[digits]' or scikit-learn)"
        ) from None
    bunch = sk_load_digits()
    order = np.random.RandomState(0).permutation(len(bunch.target))
    idx = order[:DIGITS_TEST] if split == "test" else order[DIGITS_TEST:]
    small = np.clip(np.rint(bunch.images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [N, 8, 8]
    Image = _pil()
    out = np.empty((len(idx), image_size, image_size), dtype=np.uint8)
    for i in range(len(idx)):
        img = Image.fromarray(small[i])
        if image_size != 8:
            img = img.resize((image_size, image_size), resample=Image.BILINEAR)
        out[i] = np.asarray(img)
    labels = bunch.target[idx]
    out.flags.writeable = False
    labels.flags.writeable = False
    return out, labels


def open_source(
    spec: str, *, image_size: int, image_channels: int = 3, split: str = "train", resize: str = "crop"
) -> ImageSource:
    """The data set named by ``spec`` ('digits', a .npz file, a CIFAR-10 folder, an image folder)."""
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    if resize not in RESIZE_MODES:
        raise DataError(f"resize: expected one of {list(RESIZE_MODES)}, got {resize!r}")
    if image_channels not in (1, 3):
        raise DataError(f"image_channels: expected 1 or 3, got {image_channels!r}")
    if not spec:
        raise DataError("data_dir: no data set given (a folder, a .npz file, or 'digits')")
    if spec == "digits":
        return load_digits(split, image_size, image_channels)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder")
    if os.path.isfile(spec):
        if spec.lower().endswith(".npz"):
            return load_npz(spec, image_size, image_channels, resize)
        raise DataError(f"{spec}: expected a folder, a .npz file or 'digits', got another kind of file")
    cifar = _cifar_dir(spec)
    if cifar is not None:
        return load_cifar10(cifar, split, image_size, image_channels, resize)
    paths = list_image_files(spec)
    if not paths:
        raise DataError(f"{spec}: no images found (looked recursively for {', '.join(IMAGE_EXTS)})")
    names = [os.path.basename(p).split("_")[0] for p in paths]
    class_names = sorted(set(names))
    index = {n: i for i, n in enumerate(class_names)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    return FolderSource(
        paths,
        labels,
        class_names,
        image_size,
        image_channels,
        resize,
        description=f"{spec} ({len(paths)} images, {len(class_names)} name prefixes)",
    )


# -------------------------------------------------------------------------------------
# batches
# -------------------------------------------------------------------------------------


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class BatchStream:
    """An endless, resumable stream of (x [B, C, H, W] float in [-1, 1], {"y": [B]}) batches.

    Epoch e visits a permutation of the data drawn from ``numpy.random.default_rng([seed,
    e])`` (the same on every rank); rank r takes every world-th entry of it (its shard),
    cut to whole batches. The order depends only on (seed, batch_size, rank, world) and the
    number of batches taken, which is the whole state: ``state_dict()`` / ``load_state_dict()``
    resume the stream exactly. ``random_flip`` mirrors half of the images (left-right),
    chosen by the same seeded generator.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        random_flip: bool = False,
        class_cond: bool = False,
        num_workers: int = 0,
        loader_rng_draws: bool = False,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size: expected a positive int, got {batch_size}")
        if class_cond and source.labels is None:
            raise DataError(f"class_cond: {source.description} has no class labels")
        self.source = source
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.seed = seed
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.class_cond = class_cond
        self.num_workers = num_workers
        # The reference's load_data is a torch DataLoader: each epoch's iterator draws one int64
        # from torch's global generator (its base seed), and a shuffling sampler one more. With
        # loader_rng_draws the stream draws the same at each epoch start, so later draws (the
        # training noise) are those of a seeded script run with the reference.
        self.loader_rng_draws = (2 if shuffle else 1) if loader_rng_draws else 0
        self.per_rank = len(source) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"batch_size: {source.description} has {len(source)} images, fewer than "
                f"batch_size {batch_size} × {world} process(es)"
            )
        self.position = 0  # batches handed out so far
        self._loader_iter = None

    # -- order ---------------------------------------------------------------------------
    def _epoch_order(self, epoch: int):
        n = len(self.source)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
            flips = rng.random(n) < 0.5
        else:
            perm, flips = np.arange(n), np.zeros(n, dtype=bool)
        mine = perm[self.rank :: self.world][: self.per_rank]
        return mine, flips[mine] if self.random_flip else np.zeros(len(mine), dtype=bool)

    def batch_indices(self, position: int):
        """(indices [B], flips [B]) of batch number ``position`` of this rank."""
        epoch, k = divmod(position, self.batches_per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached = self._epoch_order(epoch)
            self._cached_epoch = epoch
        mine, flips = self._cached
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        return mine[sl], flips[sl]

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world": self.world,
            "data_len": len(self.source),
        }

    def load_state_dict(self, state: dict):
        same = all(
            state.get(k) == v
            for k, v in (
                ("seed", self.seed),
                ("batch_size", self.batch_size),
                ("world", self.world),
                ("data_len", len(self.source)),
            )
        )
        if same:
            self.position = int(state["position"])
        else:  # another layout: continue after the same number of images, order not exact
            seen = int(state["position"]) * int(state.get("batch_size", 1)) * int(state.get("world", 1))
            self.position = seen // (self.batch_size * self.world)
        self._loader_iter = None
        return same

    # -- iteration -----------------------------------------------------------------------
    def _make_batch(self, images: np.ndarray, indices, flips):
        if flips.any():
            images = images.copy()
            images[flips] = images[flips][:, :, ::-1]
        x = to_model_input(images)
        cond = {}
        if self.class_cond:
            cond["y"] = torch.from_numpy(self.source.labels[np.asarray(indices)])
        return x, cond

    def __iter__(self):
        return self

    def __next__(self):
        if self.loader_rng_draws and self.position % self.batches_per_epoch == 0:
            for _ in range(self.loader_rng_draws):
                torch.empty((), dtype=torch.int64).random_()
        if self.num_workers > 0 and isinstance(self.source, FolderSource):
            if self._loader_iter is None:
                self._loader_iter = iter(self._worker_loader(self.position))
            item = next(self._loader_iter)
            if isinstance(item, _WorkerFailure):
                self._loader_iter = None
                raise item.error  # the worker's own error: one line, as without workers
            x, cond = item
        else:
            idx, flips = self.batch_indices(self.position)
            x, cond = self._make_batch(self.source.get_batch(idx), idx, flips)
        self.position += 1
        return x, cond

    def _worker_loader(self, start: int):
        stream = self

        class _Batches(torch.utils.data.IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
                pos = start + wid
                while True:  # worker w makes batches start+w, start+w+nw, ... (in order)
                    idx, flips = stream.batch_indices(pos)
                    try:
                        batch = stream._make_batch(stream.source.get_batch(idx), idx, flips)
                    except (DataError, OSError) as err:  # handed over, not wrapped in a traceback
                        yield _WorkerFailure(err)
                        return
                    yield batch
                    pos += nw

        # With an IterableDataset the loader takes one item from each worker in turn, so
        # the batches come out in position order.
        return torch.utils.data.DataLoader(
            _Batches(),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            worker_init_fn=_ignore_sigint,
        )


class _WorkerFailure:
    """A data error raised in a loader worker, carried to the main process as an item."""

    def __init__(self, error: BaseException):
        self.error = error


def _ignore_sigint(worker_id: int):
    """Loader workers leave Ctrl-C (SIGINT, sent to the whole process group) to the main
    process, which finishes its step and saves; they end when the main process stops them.
    (SIGTERM keeps its default: it is how the main process ends them at exit.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
