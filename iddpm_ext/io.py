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
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
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
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError) and err.errno is not None:
            # One error naming the file (a full disk fails the write, then the close again).
            why = f"{path}: cannot write it ({err.strerror}); the previous file, if any, is unchanged"
            raise OSError(err.errno, why) from None
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


_VANISHED_RETRIES = 5  # a folder removed under us by a concurrent check: make it again


def makedirs_and(folder: str, action):
    """``os.makedirs(folder, exist_ok=True)``, then ``action()``; again (a few times) when
    ``action`` finds the folder gone: a concurrent :func:`check_writable_dir` that created it
    removes it again when it finds it empty."""
    for attempt in range(_VANISHED_RETRIES):
        os.makedirs(folder, exist_ok=True)
        try:
            return action()
        except FileNotFoundError:
            if attempt + 1 == _VANISHED_RETRIES:
                raise


def check_writable_dir(folder: str, flag: str = "out_dir") -> str:
    """Probe that files can be written in ``folder`` before any work whose results go there:
    create it (and missing parents), write and remove a probe file, then remove the folders
    it created, so a check leaves nothing behind. A ValueError naming ``flag`` and the folder
    when it cannot be used (under a regular file, no permission, read-only, ...)."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        created.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        # (two runs started together into one new folder: the other's check may remove it)
        fd, probe = makedirs_and(
            folder, lambda: tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        )
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            why = "a file is in the way: the path or one of its parents is not a folder"
        raise ValueError(f"{flag}: cannot write to {folder!r} ({why})") from None
    finally:
        for path in created:  # deepest first; one that another process filled meanwhile stays
            try:
                os.rmdir(path)
            except OSError:
                break
    return folder
