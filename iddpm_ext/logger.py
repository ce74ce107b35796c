"""``improved_diffusion.logger`` under its own name: the key-value logger the reference's
scripts call (``configure``, ``logkv``, ``logkv_mean``, ``dumpkvs``, ``log``, ``get_dir``).

Formats: ``stdout`` (a table), ``log`` (the same into ``log.txt``), ``csv``
(``progress.csv``; the header grows when new keys appear), ``json`` (``progress.json``, one
object per dump), ``tensorboard`` (event files in ``tb/`` through ``torch.utils.tensorboard``;
needs the optional ``tensorboard`` package; the x axis is the dumped ``step`` when there is
one, else the dump count). ``configure()`` without a ``dir`` uses ``$OPENAI_LOGDIR`` or a
fresh folder under the system temp dir, and ``$OPENAI_LOG_FORMAT`` (default
``stdout,log,csv``) on rank 0; other ranks write only ``log{suffix}.txt`` with their rank in
the suffix. As in the reference, the first logging call (or ``get_dir()``) before any
``configure()`` configures that default logger, and ``reset()`` returns to it. Differences: a
folder's ``log.txt``, ``progress.csv`` and ``progress.json`` are continued by a later
``configure()`` (the reference starts them afresh), so rerunning a training script into its
folder keeps the history; ``logkv_mean`` values are averaged per process (the reference also
averages them over MPI ranks at ``dumpkvs``). ``TrainLoop`` dumps its per-interval means
(already averaged over processes) here as well as into its ``progress.jsonl``
(docs/training.md).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager

from .errors import MissingDependencyError
from .io import atomic_write_bytes

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50

__all__ = [
    "configure",
    "is_configured",
    "reset",
    "scoped_configure",
    "logkv",
    "logkv_mean",
    "logkvs",
    "dumpkvs",
    "getkvs",
    "record_tabular",
    "dump_tabular",
    "profile_kv",
    "profile",
    "log",
    "debug",
    "info",
    "warn",
    "error",
    "set_level",
    "get_dir",
    "get_current",
    "prints_table",
    "check_formats",
    "Logger",
    "DEBUG",
    "INFO",
    "WARN",
    "ERROR",
    "DISABLED",
]


def _fmt(v) -> str:
    return f"{v:<8.3g}" if hasattr(v, "__float__") and not isinstance(v, (int, str)) else str(v)


class _Table:
    """stdout / log.txt: a boxed key | value table per dump, plain lines for log()."""

    def __init__(self, file, owns: bool):
        self.file, self.owns = file, owns

    def writekvs(self, kvs: dict):
        if not kvs:
            return
        rows = [(str(k)[:30], _fmt(v)[:30]) for k, v in sorted(kvs.items())]
        kw, vw = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
        bar = "-" * (kw + vw + 7)
        lines = [bar] + [f"| {k}{' ' * (kw - len(k))} | {v}{' ' * (vw - len(v))} |" for k, v in rows] + [bar]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, args):
        self.file.write(" ".join(map(str, args)) + "\n")
        self.file.flush()

    def close(self):
        if self.owns:
            self.file.close()


class _Csv:
    """progress.csv: one row per dump under a header of every key seen. An existing file is
    continued (its header kept), so a resumed run's rows follow the earlier ones."""

    def __init__(self, path: str):
        self.path, self.keys = path, []
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                self.keys = f.readline().rstrip("\n").split(",")
        else:
            open(path, "w").close()

    def writekvs(self, kvs: dict):
        new = [k for k in sorted(kvs) if k not in self.keys]
        if new:  # the wider header, old rows padded, written atomically
            with open(self.path) as f:
                old = f.read().splitlines()[1:]
            self.keys += new
            lines = [",".join(self.keys)] + [line + "," * len(new) for line in old]
            atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())
        with open(self.path, "a") as f:
            f.write(",".join("" if kvs.get(k) is None else str(kvs[k]) for k in self.keys) + "\n")

    def close(self):
        pass


class _Json:
    """progress.json: one JSON object per dump, appended."""

    def __init__(self, path: str):
        self.path = path
        open(path, "a").close()

    def writekvs(self, kvs: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (float(v) if hasattr(v, "dtype") else v) for k, v in kvs.items()}) + "\n")

    def close(self):
        pass


class _TensorBoard:
    """Scalars of every dump as TensorBoard events (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, path: str):
        self.writer = _summary_writer_class()(log_dir=path)
        self.dumps = 0

    def writekvs(self, kvs: dict):
        step = kvs.get("step", self.dumps)
        step = int(step) if isinstance(step, (int, float)) else self.dumps
        for key, value in kvs.items():
            if key != "step" and hasattr(value, "__float__") and not isinstance(value, str):
                self.writer.add_scalar(str(key), float(value), step)
        self.writer.flush()
        self.dumps += 1

    def close(self):
        self.writer.close()


def _summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter; a MissingDependencyError naming the package
    when tensorboard is not installed (it is not a dependency of iddpm_ext)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependencyError(
            f"tensorboard: the TensorBoard log format needs the tensorboard package, which is not "
            f"installed ({err}); pip install tensorboard, or leave the format out"
        ) from None
    return SummaryWriter


FORMATS = ("stdout", "log", "csv", "json", "tensorboard")


def check_formats(format_strs) -> list:
    """The format names of ``format_strs`` (blanks dropped), checked: a ValueError for an unknown
    name, a MissingDependencyError for tensorboard without its package. Nothing is created."""
    names = [str(f).strip() for f in format_strs if str(f).strip()]
    for name in names:
        if name not in FORMATS:
            raise ValueError(f"format_strs: expected names from {list(FORMATS)}, got {name!r}")
    if "tensorboard" in names:
        _summary_writer_class()
    return names


def _make_format(name: str, directory: str, suffix: str):
    os.makedirs(directory, exist_ok=True)
    if name == "stdout":
        return _Table(sys.stdout, owns=False)
    if name == "log":
        return _Table(open(os.path.join(directory, f"log{suffix}.txt"), "a"), owns=True)
    if name == "csv":
        return _Csv(os.path.join(directory, f"progress{suffix}.csv"))
    if name == "json":
        return _Json(os.path.join(directory, f"progress{suffix}.json"))
    if name == "tensorboard":
        return _TensorBoard(os.path.join(directory, f"tb{suffix}"))
    raise ValueError(f"format_strs: expected names from {list(FORMATS)}, got {name!r}")


class Logger:
    def __init__(self, dir, output_formats):
        self.dir, self.output_formats = dir, list(output_formats)
        self.name2val, self.name2cnt = {}, {}
        self.level = INFO

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        n = self.name2cnt.get(key, 0)
        old = self.name2val.get(key, 0.0)
        self.name2val[key] = old * n / (n + 1) + val / (n + 1)
        self.name2cnt[key] = n + 1

    def dumpkvs(self) -> dict:
        out = dict(self.name2val)
        for fmt in self.output_formats:
            fmt.writekvs(out)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if hasattr(fmt, "writeseq"):
                    fmt.writeseq(args)

    def set_level(self, level):
        self.level = level

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


_current: Logger | None = None
_default: Logger | None = None


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Start logging to ``dir`` in the given formats (see the module docstring)."""
    global _current
    from . import dist_util

    del comm  # no MPI here; ranks come from torch.distributed
    dir = (
        dir
        or os.getenv("OPENAI_LOGDIR")
        or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        )
    )
    dir = os.path.expanduser(dir)
    rank = dist_util.get_rank()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        format_strs = (
            os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv")
            if rank == 0
            else os.getenv("OPENAI_LOG_FORMAT_MPI", "log")
        ).split(",")
    names = check_formats(format_strs)  # before any folder or file is made
    os.makedirs(dir, exist_ok=True)
    formats = [_make_format(name, dir, log_suffix) for name in names]
    if _current is not None and _current is not _default:
        _current.close()
    _current = Logger(dir, formats)
    if formats:
        _current.log(f"Logging to {dir}")
    return _current


def get_current() -> Logger:
    """The current logger. Before any ``configure()``, the first call configures the default
    one as the reference does: ``configure()`` with no arguments (``$OPENAI_LOGDIR`` or a new
    folder under the system temp dir, ``$OPENAI_LOG_FORMAT``), which ``reset()`` returns to."""
    global _default
    if _current is None:
        configure()
        _default = _current
    return _current


def is_configured() -> bool:
    """True once ``configure()`` ran or a logging call made the default logger (the library
    asks this where it logs only into a logger the user set up)."""
    return _current is not None


def reset():
    """Back to the default logger (closing the current one), as the reference's; where none
    was made yet, the next logging call makes it."""
    global _current
    if _current is not _default:
        if _current is not None:
            _current.close()
        _current = _default
        if _current is not None:
            _current.log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    global _current
    previous = _current
    _current = None
    try:
        yield configure(dir=dir, format_strs=format_strs, comm=comm)
    finally:
        if _current is not None and _current is not _default:
            _current.close()
        _current = previous


def logkv(key, val):
    get_current().logkv(key, val)


def logkv_mean(key, val):
    get_current().logkv_mean(key, val)


def logkvs(d):
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    return get_current().dumpkvs()


# The reference's older names for logkv / dumpkvs.
record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """Adds the wall time spent in the ``with`` block to the key ``wait_<scopename>`` of the
    current logger (summed until the next ``dumpkvs``), as the reference's."""
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        kvs = get_current().name2val
        kvs[key] = kvs.get(key, 0.0) + time.time() - start


def profile(n):
    """A decorator that times every call of the function with ``profile_kv(n)``."""

    def decorate(func):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    get_current().set_level(level)


def get_dir():
    return get_current().get_dir()


def prints_table() -> bool:
    """True when the current logger prints its key tables to stdout (the ``stdout`` format);
    the trainer then shows no progress bar unless asked."""
    return _current is not None and any(isinstance(f, _Table) and not f.owns for f in _current.output_formats)
