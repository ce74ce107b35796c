"""Data sets (image folders, .npz, CIFAR-10 batches, digits) and the batch stream."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.training import blob_images, write_npz
from iddpm_ext.training.data import (
    BatchStream,
    DataError,
    FolderSource,
    list_image_files,
    open_source,
    resize_center_crop,
    to_model_input,
)


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    _png(str(root / "cat_001.png"), rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    _png(str(root / "dog_a_002.png"), rng.integers(0, 255, (20, 10, 3), dtype=np.uint8))
    _png(str(root / "sub" / "deeper" / "cat_003.jpg"), rng.integers(0, 255, (9, 30, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
        str(root / "sub" / "bird_4.JPEG"), format="JPEG"
    )
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_recursive_labels_and_sizes(tmp_path):
    root = _folder(tmp_path)
    files = list_image_files(str(root))
    assert [os.path.basename(f) for f in files] == [
        "cat_001.png",
        "dog_a_002.png",
        "bird_4.JPEG",
        "cat_003.jpg",
    ]
    src = open_source(str(root), image_size=8, image_channels=3)
    assert isinstance(src, FolderSource) and len(src) == 4
    assert src.class_names == ["bird", "cat", "dog"]  # prefix before the first "_", sorted
    assert src.labels.tolist() == [1, 2, 0, 1]
    for i in range(4):  # mixed sizes are scaled and centre-cropped
        img, label = src.get(i)
        assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and label == src.labels[i]
    gray = open_source(str(root), image_size=8, image_channels=1)
    assert gray.get(0)[0].shape == (8, 8, 1)


def test_resize_center_crop_keeps_the_middle():
    # 40 wide x 20 high: left third black, middle white, right third black -> the centre
    # crop of the short-side-8 image is mostly white in the middle columns.
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 14:26] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 8))
    assert out.shape == (8, 8)
    assert out[:, 3:5].mean() > 200 and out[:, 0].mean() < 60 and out[:, 7].mean() < 60


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_source(str(tmp_path / "missing"), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(str(tmp_path / "empty"), image_size=8)
    with pytest.raises(DataError, match="no data set given"):
        open_source("", image_size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = open_source(str(bad), image_size=8)
    with pytest.raises(DataError, match=r"x_1\.png: cannot read this image"):
        src.get(0)


def test_mixed_sizes_without_resize_name_the_file(tmp_path):
    root = tmp_path / "mixed"
    _png(str(root / "a_1.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    _png(str(root / "a_2.png"), np.zeros((8, 9, 3), dtype=np.uint8))
    src = open_source(str(root), image_size=8, resize="none")
    assert src.get(0)[0].shape == (8, 8, 3)
    with pytest.raises(DataError, match=r"a_2\.png: expected a 8x8 image .* got 9x8"):
        src.get(1)


def test_npz_roundtrip_and_errors(tmp_path):
    path = write_npz(str(tmp_path / "d.npz"), n=10, size=8, channels=1)
    src = open_source(path, image_size=8, image_channels=1)
    images, labels = blob_images(10, 8, 1)
    assert np.array_equal(src.images, images) and np.array_equal(src.labels, labels)
    rgb = open_source(path, image_size=8, image_channels=3)
    assert rgb.images.shape == (10, 8, 8, 3) and np.array_equal(rgb.images[..., 2], images[..., 0])
    up = open_source(path, image_size=16, image_channels=1)
    assert up.images.shape == (10, 16, 16, 1)
    with pytest.raises(DataError, match="resize='none'"):
        open_source(path, image_size=16, image_channels=1, resize="none")

    np.savez(str(tmp_path / "nchw.npz"), np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="looks like NCHW"):
        open_source(str(tmp_path / "nchw.npz"), image_size=8)
    np.savez(str(tmp_path / "float.npz"), np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        open_source(str(tmp_path / "float.npz"), image_size=8)
    np.savez(
        str(tmp_path / "badlab.npz"), np.zeros((4, 8, 8, 3), dtype=np.uint8), np.zeros(3, dtype=np.int64)
    )
    with pytest.raises(DataError, match="arr_1"):
        open_source(str(tmp_path / "badlab.npz"), image_size=8)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"broken\.npz: cannot read"):
        open_source(str(tmp_path / "broken.npz"), image_size=8)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="another kind of file"):
        open_source(str(tmp_path / "x.bin"), image_size=8)


def _cifar(folder, n=4):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar10_batches(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    _cifar(folder)
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        first = pickle.load(f, encoding="bytes")
    for spec in (folder, str(tmp_path)):  # the folder itself or its parent
        src = open_source(spec, image_size=32, image_channels=3, split="train")
        assert src.images.shape == (20, 32, 32, 3) and len(src.labels) == 20
        assert np.array_equal(src.images[0], first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
        assert src.class_names[3] == "c3"
    assert len(open_source(folder, image_size=32, split="test")) == 4


def test_cifar10_refuses_foreign_pickles_and_missing_files(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    _cifar(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR-10 batch .*refusing"):
        open_source(folder, image_size=32)
    os.remove(os.path.join(folder, "data_batch_2"))
    with pytest.raises(DataError, match="data_batch_2: missing CIFAR-10 batch file"):
        open_source(folder, image_size=32)


def test_digits_fixed_split():
    pytest.importorskip("sklearn")
    train = open_source("digits", image_size=16, image_channels=1, split="train")
    test = open_source("digits", image_size=16, image_channels=1, split="test")
    assert len(train) == 1500 and len(test) == 297
    assert train.images.shape == (1500, 16, 16, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    again = open_source("digits", image_size=16, image_channels=1, split="test")
    assert np.array_equal(again.images, test.images)  # the split is fixed
    native = open_source("digits", image_size=8, image_channels=3, split="test")
    assert native.images.shape == (297, 8, 8, 3)


def test_to_model_input_range():
    x = to_model_input(np.array([[[[0], [255]]]], dtype=np.uint8))
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32
    assert x.flatten().tolist() == [-1.0, 1.0]


def _arrays_source(n=40):
    from iddpm_ext.training.data import ArraySource

    images, labels = blob_images(n, 8, 1)
    images[:, 0, 0, 0] = np.arange(n)  # tag each image with its index
    return ArraySource(images, labels, description="tagged")


def _ids(x):
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_stream_shards_are_disjoint_and_resume_exactly():
    src = _arrays_source(40)
    per_rank = [BatchStream(src, 5, rank=r, world=2, seed=3) for r in range(2)]
    seen = [sum((_ids(next(s)[0]) for _ in range(4)), []) for s in per_rank]  # one epoch each
    assert sorted(seen[0] + seen[1]) == list(range(40))  # disjoint, covering
    a = BatchStream(src, 6, seed=1, class_cond=True)
    for _ in range(9):  # into the second epoch (6 batches per epoch)
        next(a)
    b = BatchStream(src, 6, seed=1, class_cond=True)
    assert b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ca), (xb, cb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])
    c = BatchStream(src, 6, seed=2)
    assert _ids(next(c)[0]) != _ids(next(BatchStream(src, 6, seed=1))[0])


def test_stream_random_flip_and_errors():
    src = _arrays_source(40)
    plain = BatchStream(src, 40, seed=0)
    flipped = BatchStream(src, 40, seed=0, random_flip=True)
    x, xf = next(plain)[0], next(flipped)[0]
    same = [torch.equal(x[i], xf[i]) for i in range(40)]
    mirrored = [torch.equal(x[i].flip(-1), xf[i]) for i in range(40)]
    assert all(s or m for s, m in zip(same, mirrored)) and 5 < sum(mirrored) < 35
    with pytest.raises(DataError, match="fewer than batch_size"):
        BatchStream(src, 41)
    from iddpm_ext.training.data import ArraySource

    with pytest.raises(DataError, match="no class labels"):
        BatchStream(ArraySource(src.images), 4, class_cond=True)


def test_folder_stream_with_workers_matches_in_process(tmp_path):
    root = tmp_path / "w"
    for i in range(12):
        _png(str(root / f"k{i % 3}_{i:02d}.png"), np.full((10, 10, 3), i * 20, dtype=np.uint8))
    src = open_source(str(root), image_size=8, image_channels=3)
    a = BatchStream(src, 3, seed=0, class_cond=True)
    b = BatchStream(src, 3, seed=0, class_cond=True, num_workers=2)
    for _ in range(6):
        (xa, ca), (xb, cb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])
