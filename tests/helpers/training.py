"""Training and command-line cases: a tiny model configuration (as a config and as flags),
small data sets, and ``python -m iddpm_ext`` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

from helpers import REPO

# An 8x8 grayscale UNet with 32 channels, one res block, attention at 4x4, learned sigma,
# 10 diffusion steps: a training step takes a few milliseconds on a CPU.
TINY = dict(
    image_size=8,
    image_channels=1,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_heads=2,
    learn_sigma=True,
    diffusion_steps=10,
    noise_schedule="cosine",
    dropout=0.0,
)


def argv(template: str, **values) -> list:
    """Command-line words: the template split at spaces, then each word formatted with
    ``values`` (so values may hold spaces): argv("train --out_dir {out}", out=d)."""
    return [word.format(**values) for word in template.split()]


def main(template: str, **values) -> int:
    """``iddpm`` in this process: the exit status of iddpm_ext.cli.main(argv(template, **values))."""
    from iddpm_ext.cli import main as cli_main

    return cli_main(argv(template, **values))


def train(template: str, **values) -> int:
    """``iddpm train`` of the tiny model in this process: main("train " + template) with TINY's flags."""
    from iddpm_ext.cli import main as cli_main

    return cli_main(argv("train " + template, **values) + tiny_flags())


def tiny_flags(**overrides) -> list:
    """TINY (with overrides) as command-line flags."""
    cfg = {**TINY, **overrides}
    out = []
    for k, v in cfg.items():
        out += [f"--{k}", str(v)]
    return out


def tiny_config(**overrides) -> dict:
    from iddpm_ext.script_util import model_and_diffusion_defaults

    cfg = model_and_diffusion_defaults()
    cfg.update(TINY)
    cfg.update(overrides)
    return cfg


def blob_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> tuple:
    """uint8 [n, size, size, channels] images of a bright square at a random place, and
    labels 0..2 (the square's size class)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 3, size=n)
    for i in range(n):
        s = 2 + int(labels[i])
        y, x = rng.integers(0, size - s + 1, size=2)
        images[i, y : y + s, x : x + s] = 200
    return images, labels


def write_npz(path: str, n: int = 64, size: int = 8, channels: int = 1, labels: bool = True) -> str:
    images, y = blob_images(n, size, channels)
    if labels:
        np.savez(path, images, y)
    else:
        np.savez(path, images)
    return path


def run_cli(args: list, timeout: float = 240, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m iddpm_ext ARGS`` in a subprocess (this checkout first on the path)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "iddpm_ext", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


def run_group(cmd: list, env: dict, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own, output captured; on timeout the whole process group
    is killed (torchrun's ranks and loader workers included, which a plain
    ``subprocess.run(timeout=...)`` leaves running) and the test fails with the output so far."""
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        cmd, stdout=pipe, stderr=pipe, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {cmd}\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mixed_mode_image_folder(root):
    """Images in PIL modes the reference scales before converting (palette, RGBA, LA, L, a GIF),
    with files and subfolders interleaved by name."""
    from PIL import Image

    rng = np.random.default_rng(3)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    (root / "b_sub" / "inner").mkdir(parents=True)
    Image.fromarray(rgb(40, 50)).save(root / "a_0.png")
    Image.fromarray(rgb(37, 29)).convert("P", palette=Image.ADAPTIVE).save(root / "c_1.png")
    rgba = np.concatenate([rgb(33, 45), rng.integers(0, 256, (33, 45, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "b_sub" / "d_2.png")
    Image.fromarray(rgb(64, 64)[..., 0]).save(root / "b_sub" / "inner" / "a_3.png")
    Image.fromarray(rgb(20, 30)).save(root / "e_4.jpg")
    Image.fromarray(rgb(20, 30)).convert("P").save(root / "f_5.gif")
    Image.fromarray(rgb(30, 20)).save(root / "b_sub" / "z_6.JPEG")
    la = np.stack([rgb(25, 25)[..., 0], rng.integers(0, 256, (25, 25), dtype=np.uint8)], -1)
    Image.fromarray(la, "LA").save(root / "g_7.png")
    (root / "notes.txt").write_text("not an image")
    return root


def forget_logger():
    """Close iddpm_ext.logger's current and default loggers and drop them: the logger's state
    in a fresh process (the next logging call configures the default one again)."""
    from iddpm_ext import logger

    current, default = logger._current, logger._default
    if current is not None:
        current.close()
    if default is not None and default is not current:
        default.close()
    logger._current = logger._default = None


def fake_tensorboard(monkeypatch) -> list:
    """Installs a stand-in ``torch.utils.tensorboard`` whose SummaryWriter records what it is
    given (("dir", log_dir), (tag, value, step) per scalar, "closed") into the returned list."""
    import types

    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    return written
