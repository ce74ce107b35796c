"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one,
and a kill at any moment leaves at most a temporary file behind (``.{name}.*.tmp``, which
:func:`remove_stale_temporaries` clears). Used for checkpoints, logs, samples and reports."""

from __future__ import annotations

import os
import tempfile


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn, overwrite: bool = True):
    """Write ``path`` through ``write_fn(file)`` into a temporary file of the same folder,
    fsync it, then rename it over ``path`` (``overwrite=False``: fail with FileExistsError
    instead of replacing an existing file). Readers see the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and refuses to replace an existing file
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temporaries(folder: str) -> list:
    """Delete temporary files that a killed writer left in ``folder`` (ours only:
    ``.{name}.*.tmp``); returns their names."""
    removed = []
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = True):
    atomic_write(path, lambda f: f.write(data), overwrite)
