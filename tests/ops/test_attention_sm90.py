"""The switch and build facts of the Hopper (sm_90a) attention forward, on any machine: it is
reported by build_info(), never chosen for CPU tensors, and its switch (IDDPM_ATTENTION_SM90)
is set and restored by attention_sm90. Its numerics are tested under the CPU emulator
(test_attention_sm90_emulation.py) and on a card (test_attention_sm90_gpu.py)."""

from __future__ import annotations

import os

import pytest
import torch

import iddpm_ext
from iddpm_ext.ops import attention as A
from iddpm_ext.ops import loader

pytestmark = pytest.mark.skipif(not loader.available(), reason="needs iddpm_ext._C")


def test_build_info_reports_the_sm90_kernel():
    info = iddpm_ext.build_info()
    assert isinstance(info["attention_sm90"], bool)
    if not info["cuda"]:
        assert info["attention_sm90"] is False
    assert A.sm90_built() == info["attention_sm90"]


def test_sm90_never_for_cpu_or_other_dtypes():
    qkv = torch.zeros(1, 3 * 2 * 64, 16, dtype=torch.float16)
    assert not A.sm90_supported(qkv, 2)
    assert not A.sm90_supported(qkv.float(), 2)


def test_attention_sm90_sets_and_restores_the_switch(monkeypatch):
    monkeypatch.delenv(A.SM90_ENV, raising=False)
    with A.attention_sm90():
        assert os.environ[A.SM90_ENV] == "1"
        with A.attention_sm90(False):
            assert A.SM90_ENV not in os.environ
        assert os.environ[A.SM90_ENV] == "1"
    assert A.SM90_ENV not in os.environ
    monkeypatch.setenv(A.SM90_ENV, "0")
    with A.attention_sm90():
        assert os.environ[A.SM90_ENV] == "1"
    assert os.environ[A.SM90_ENV] == "0"


def test_the_switch_changes_nothing_on_cpu():
    qkv = torch.randn(1, 3 * 2 * 64, 40, dtype=torch.float16)
    out = A.qkv_attention_fused(qkv, 2)
    with A.attention_sm90():
        assert torch.equal(A.qkv_attention_fused_sm90(qkv, 2), out)
