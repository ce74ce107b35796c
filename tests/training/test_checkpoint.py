"""Checkpoint files: atomic writes, safetensors + config metadata, reference .pt import,
config checks, resume resolution."""

import argparse
import os

import pytest
import torch

from helpers.training import tiny_config
from iddpm_ext.script_util import create_model_and_diffusion
from iddpm_ext.training import checkpoint as ckpt


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.bin")
    ckpt.atomic_write_bytes(path, b"good")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, boom)
    assert open(path, "rb").read() == b"good"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
    with pytest.raises(FileExistsError):
        ckpt.atomic_write_bytes(path, b"new", overwrite=False)
    assert open(path, "rb").read() == b"good" and os.listdir(tmp_path) == ["f.bin"]
    ckpt.atomic_write_bytes(path, b"new")
    assert open(path, "rb").read() == b"new"


def _tiny_model(**overrides):
    cfg = tiny_config(**overrides)
    model, _ = create_model_and_diffusion(**cfg)
    return model, cfg


def test_weights_roundtrip_with_config(tmp_path):
    model, cfg = _tiny_model()
    path = str(tmp_path / "model000007.safetensors")
    ckpt.save_weights(path, model.state_dict(), cfg, kind="model", step=7)
    state, config, meta = ckpt.load_weights(path)
    assert config == cfg and meta["step"] == "7" and meta["format"] == "iddpm_ext" and "version" in meta
    other, _ = _tiny_model()
    ckpt.load_into(other, state, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert ckpt.step_from_filename(path) == 7


def test_truncated_or_corrupt_weights_are_clear_errors(tmp_path):
    model, cfg = _tiny_model()
    path = str(tmp_path / "m.safetensors")
    ckpt.save_weights(path, model.state_dict(), cfg)
    data = open(path, "rb").read()
    for name, blob in (("trunc", data[: len(data) // 2]), ("head", data[:5]), ("junk", b"\x00" * 64)):
        bad = str(tmp_path / f"{name}.safetensors")
        open(bad, "wb").write(blob)
        with pytest.raises(
            ckpt.CheckpointError, match=rf"{name}\.safetensors: not a readable safetensors file"
        ):
            ckpt.load_weights(bad)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        ckpt.load_weights(str(tmp_path / "nope.safetensors"))


def test_reference_pt_state_dict_loads_weights_only(tmp_path):
    model, _ = _tiny_model()
    path = str(tmp_path / "model000042.pt")
    torch.save(model.state_dict(), path)
    state, config, _ = ckpt.load_weights(path)
    assert config is None
    other, _ = _tiny_model()
    ckpt.load_into(other, state, path)
    assert torch.equal(other.out[2].weight, model.out[2].weight)
    assert ckpt.resolve_resume(path)["step"] == 42

    evil = str(tmp_path / "evil.pt")
    torch.save({"x": argparse.Namespace(a=1)}, evil)  # any class outside weights_only's allow-list
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        ckpt.load_weights(evil)
    open(str(tmp_path / "cut.pt"), "wb").write(open(path, "rb").read()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"cut\.pt: cannot load"):
        ckpt.load_weights(str(tmp_path / "cut.pt"))


def test_load_into_lists_what_does_not_fit(tmp_path):
    model, _ = _tiny_model()
    bigger, _ = _tiny_model(num_channels=64)
    with pytest.raises(ckpt.CheckpointError, match="shape mismatches"):
        ckpt.load_into(model, bigger.state_dict(), "x")
    state = dict(model.state_dict())
    state.pop("out.2.weight")
    state["extra"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError, match=r"missing 1 tensors .*out\.2\.weight.*1 unexpected"):
        ckpt.load_into(model, state, "x")


def test_config_check():
    stored = tiny_config(learn_sigma=True)
    with pytest.raises(
        ckpt.CheckpointError, match="learn_sigma=True in the checkpoint but False from the flags"
    ):
        ckpt.check_config("c", stored, tiny_config(learn_sigma=False))
    # only the given flags are compared
    ckpt.check_config("c", stored, tiny_config(learn_sigma=False), explicit={"num_channels"})
    # flags that may change between training and use
    ckpt.check_config("c", stored, tiny_config(timestep_respacing="5", dropout=0.3, use_kl=True))
    # equivalent spellings
    a = tiny_config(image_size=32, attention_resolutions="16,8", channel_mult="")
    b = tiny_config(image_size=32, attention_resolutions="8,16", channel_mult="1,2,2,2")
    assert ckpt.config_differences(a, b) == []
    assert ckpt.config_differences(tiny_config(num_classes=5), tiny_config(num_classes=7)) == []
    assert ckpt.config_differences(
        tiny_config(class_cond=True, num_classes=5), tiny_config(class_cond=True, num_classes=7)
    ) == [("num_classes", 5, 7)]


def test_resolve_resume(tmp_path):
    model, cfg = _tiny_model()
    folder = str(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no latest.json"):
        ckpt.resolve_resume(folder)
    for s in (1, 2):
        ckpt.save_weights(os.path.join(folder, f"model{s:06d}.safetensors"), model.state_dict(), cfg)
        ckpt.save_weights(os.path.join(folder, f"ema_0.99_{s:06d}.safetensors"), model.state_dict(), cfg)
        ckpt.save_train_state(os.path.join(folder, f"opt{s:06d}.pt"), {"step": s})
    ckpt.write_latest(
        folder,
        2,
        {
            "model": "model000002.safetensors",
            "ema": {"0.99": "ema_0.99_000002.safetensors"},
            "opt": "opt000002.pt",
        },
    )
    files = ckpt.resolve_resume(folder)
    assert files["step"] == 2 and files["ema"] == {
        "0.99": os.path.join(folder, "ema_0.99_000002.safetensors")
    }
    assert ckpt.load_train_state(files["opt"]) == {"step": 2}
    one = ckpt.resolve_resume(os.path.join(folder, "model000001.safetensors"))
    assert one["step"] == 1 and one["opt"].endswith("opt000001.pt") and "0.99" in one["ema"]
    assert ckpt.model_path_from(folder).endswith("ema_0.99_000002.safetensors")
    os.remove(os.path.join(folder, "opt000002.pt"))
    with pytest.raises(ckpt.CheckpointError, match="opt000002.pt: listed by the checkpoint but missing"):
        ckpt.resolve_resume(folder)
    open(os.path.join(folder, "latest.json"), "w").write("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not a valid checkpoint pointer"):
        ckpt.resolve_resume(folder)


def test_atomic_write_gives_files_the_umask_mode(tmp_path):
    import os
    import stat

    from iddpm_ext.io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(str(tmp_path / "f.bin"), b"abc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.bin").st_mode) == 0o644
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
