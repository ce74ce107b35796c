"""The run-folder lock: one training process per ``out_dir`` at a time.

A run folder holds a file ``.lock``. The process that trains into the folder holds an
exclusive POSIX record lock on it (``fcntl.lockf``) for the whole run and writes its pid
into it. The lock belongs to the process, not to the file: the kernel drops it when the
process ends in any way, SIGKILL included, so a killed run never leaves a stale lock and
the file itself is never removed (removing it would let two processes lock two different
files of the same name). A record lock, rather than ``flock``, because forked children
(DataLoader workers) do not inherit it: a killed trainer frees its folder at once, not
when its orphaned workers notice.

Under torchrun rank 0 takes the lock and every rank learns the outcome, so no rank goes on
into a folder rank 0 could not lock (:meth:`TrainLoop <iddpm_ext.training.loop.TrainLoop>`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from ..errors import RunFolderLockedError
from ..io import makedirs_and

LOCK_NAME = ".lock"

# The folders this process holds (a record lock cannot tell two holders in one process apart).
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class RunFolderLock:
    """The lock of one run folder, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(os.path.abspath(folder), LOCK_NAME)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunFolderLock:
        """Take the lock (creating the folder when needed), or raise RunFolderLockedError
        naming the folder and the holder's pid. Never waits."""
        if self._fd is not None:
            return self
        with _HELD_GUARD:
            if self.path in _HELD:
                raise RunFolderLockedError(self._busy_message(str(os.getpid()), same_process=True))
            # (made again if another process's out_dir check removes the new, empty folder)
            fd = makedirs_and(
                self.folder, lambda: os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            )
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunFolderLockedError(self._busy_message(holder)) from None
                raise OSError(
                    err.errno, f"{self.path}: cannot lock the run folder ({err.strerror})"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                os.close(fd)
                raise
            _HELD[self.path] = fd
            self._fd = fd
        return self

    def release(self):
        """Drop the lock (closing the file releases it). Safe to call more than once."""
        with _HELD_GUARD:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            _HELD.pop(self.path, None)
            os.close(fd)

    def _busy_message(self, holder: str, same_process: bool = False) -> str:
        who = f"pid {holder}" if holder else "a process whose pid is not written yet"
        if same_process:
            who += ", this process: another TrainLoop of it has not finished or been closed"
        return (
            f"{self.folder}: this run folder is in use by another training run ({who}); wait for it "
            "to finish or stop it, or choose another --out_dir"
        )

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
