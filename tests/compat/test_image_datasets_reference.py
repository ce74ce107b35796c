"""Parity with openai/improved-diffusion's image_datasets (dev-time check, not run in CI).

Skipped unless IDDPM_REF_PATH names a checkout of improved-diffusion. The reference's module
needs blobfile and mpi4py; local-file stand-ins for the few calls it makes (one process)
are put in sys.modules for the test only. Compares the file list, the deterministic batches
of load_data and ImageDataset items on a folder of images in mixed PIL modes, pixel for pixel.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch

from helpers.training import mixed_mode_image_folder
from iddpm_ext import image_datasets as ours

REF_PATH = os.environ.get("IDDPM_REF_PATH")
pytestmark = pytest.mark.skipif(
    not REF_PATH or not os.path.isdir(os.path.join(REF_PATH, "improved_diffusion")),
    reason="set IDDPM_REF_PATH to a checkout of openai/improved-diffusion",
)


@pytest.fixture
def ref(monkeypatch):
    bf = types.ModuleType("blobfile")
    bf.BlobFile = open
    bf.listdir, bf.join, bf.isdir, bf.basename = os.listdir, os.path.join, os.path.isdir, os.path.basename
    world = types.SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 1)
    mpi = types.ModuleType("mpi4py")
    mpi.MPI = types.SimpleNamespace(COMM_WORLD=world)
    monkeypatch.setitem(sys.modules, "blobfile", bf)
    monkeypatch.setitem(sys.modules, "mpi4py", mpi)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi.MPI)
    monkeypatch.syspath_prepend(REF_PATH)
    monkeypatch.delitem(sys.modules, "improved_diffusion.image_datasets", raising=False)
    return importlib.import_module("improved_diffusion.image_datasets")


def test_same_files_batches_and_items(ref, tmp_path):
    root = str(mixed_mode_image_folder(tmp_path / "imgs"))
    files = ref._list_image_files_recursively(root)
    assert ours._list_image_files_recursively(root) == files and len(files) == 8
    kw = dict(data_dir=root, batch_size=4, image_size=16, class_cond=True, deterministic=True)
    theirs_it, ours_it = ref.load_data(**kw), ours.load_data(**kw)
    for _ in range(3):  # two batches per pass, into the second pass
        (x_ref, c_ref), (x, c) = next(theirs_it), next(ours_it)
        assert x.dtype == x_ref.dtype and torch.equal(x, x_ref)
        assert torch.equal(c["y"], c_ref["y"])
    for shard in (0, 2):
        a = ref.ImageDataset(12, files, classes=list(range(8)), shard=shard, num_shards=3)
        b = ours.ImageDataset(12, files, classes=list(range(8)), shard=shard, num_shards=3)
        assert len(a) == len(b)
        for i in range(len(a)):
            (arr_ref, out_ref), (arr, out) = a[i], b[i]
            assert arr.dtype == arr_ref.dtype and np.array_equal(arr, arr_ref)
            assert out["y"].dtype == out_ref["y"].dtype and out["y"] == out_ref["y"]
