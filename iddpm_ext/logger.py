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
averages them over MPI ranks at ``dumpkvs``; here too when ``configure`` or ``set_comm`` is
given an mpi4py-style communicator: :func:`mpi_weighted_mean`). The reference's format classes
(``HumanOutputFormat``, ``CSVOutputFormat``, ``JSONOutputFormat``, ``TensorBoardOutputFormat``,
their bases ``KVWriter`` / ``SeqWriter``) and ``make_output_format`` are these formats, for code
that builds a ``Logger`` itself; a file they are given by name is continued too. ``TrainLoop``
dumps its per-interval means (already averaged over processes) here as well as into its
``progress.jsonl`` (docs/training.md).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager

from .errors import ArgumentError, MissingDependencyError
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
    "set_comm",
    "Logger",
    "KVWriter",
    "SeqWriter",
    "HumanOutputFormat",
    "CSVOutputFormat",
    "JSONOutputFormat",
    "TensorBoardOutputFormat",
    "make_output_format",
    "mpi_weighted_mean",
    "get_rank_without_mpi_import",
    "DEBUG",
    "INFO",
    "WARN",
    "ERROR",
    "DISABLED",
]


def _fmt(v) -> str:
    return f"{v:<8.3g}" if hasattr(v, "__float__") and not isinstance(v, (int, str)) else str(v)


class KVWriter:
    """A format that takes the key-value dumps (``writekvs(kvs)``; the reference's base class)."""

    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self):
        pass


class SeqWriter:
    """A format that takes ``log()``'s lines (``writeseq(seq)``; the reference's base class)."""

    def writeseq(self, seq):
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """stdout / log.txt: a boxed key | value table per dump, plain lines for log().
    ``filename_or_file``: a path (opened for appending, closed by ``close()``) or an open text
    file (written to, left open)."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, (str, os.PathLike)):
            self.file, self.owns = open(filename_or_file, "a"), True
        elif hasattr(filename_or_file, "write"):
            self.file, self.owns = filename_or_file, False
        else:
            raise ArgumentError(
                f"filename_or_file: expected a path or a writable text file, got "
                f"{type(filename_or_file).__name__}"
            )

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


class CSVOutputFormat(KVWriter):
    """progress.csv: one row per dump under a header of every key seen. An existing file is
    continued (its header kept), so a resumed run's rows follow the earlier ones."""

    def __init__(self, filename):
        path = os.fspath(filename)
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


class JSONOutputFormat(KVWriter):
    """progress.json: one JSON object per dump, appended."""

    def __init__(self, filename):
        self.path = os.fspath(filename)
        open(self.path, "a").close()

    def writekvs(self, kvs: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (float(v) if hasattr(v, "dtype") else v) for k, v in kvs.items()}) + "\n")


class TensorBoardOutputFormat(KVWriter):
    """Scalars of every dump as TensorBoard events in the folder ``dir`` (torch.utils.tensorboard's
    SummaryWriter; the reference wrote them through TensorFlow)."""

    def __init__(self, dir):
        self.writer = _summary_writer_class()(log_dir=os.fspath(dir))
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


def make_output_format(format, ev_dir, log_suffix=""):
    """The format named ``format`` (one of :data:`FORMATS`) writing into the folder ``ev_dir``
    (made if missing): ``log{log_suffix}.txt``, ``progress{log_suffix}.csv`` / ``.json``,
    ``tb{log_suffix}/``, or stdout."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if format == "tensorboard":
        _summary_writer_class()  # (before the folder is made)
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))


def get_rank_without_mpi_import() -> int:
    """This process's rank as its launcher's environment gives it (MPI's ``PMI_RANK`` or
    ``OMPI_COMM_WORLD_RANK``, as the reference reads, then torchrun's ``RANK``), else 0."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def mpi_weighted_mean(comm, local_name2valcount):
    """Per name, the mean over ``comm``'s ranks of their values weighted by their counts: every
    rank passes ``{name: (value, count)}``; rank 0 gets ``{name: mean}``, the others ``{}``.
    ``comm``: an mpi4py-style communicator (``gather(obj, root=0)``, ``rank``). A value that is not
    a number is left out with a warning, a name whose counts sum to 0 left out."""
    gathered = comm.gather(local_name2valcount, root=0)
    if comm.rank != 0:
        return {}
    sums, counts = {}, {}
    for part in gathered:
        for name, (value, count) in part.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                warnings.warn(
                    f"mpi_weighted_mean: {name} = {value!r} is not a number, left out", stacklevel=2
                )
                continue
            sums[name] = sums.get(name, 0.0) + value * count
            counts[name] = counts.get(name, 0.0) + count
    return {name: sums[name] / counts[name] for name in sums if counts[name] != 0}


class Logger:
    """Key-value diagnostics written to ``output_formats`` at every ``dumpkvs``. With ``comm``
    (an mpi4py-style communicator), ``dumpkvs`` averages the values over its ranks
    (:func:`mpi_weighted_mean`, weighted by each rank's ``logkv_mean`` count) and rank 0 writes
    them. ``Logger.CURRENT`` / ``Logger.DEFAULT`` are the current and the default logger, as in
    the reference."""

    CURRENT: Logger | None = None
    DEFAULT: Logger | None = None

    def __init__(self, dir, output_formats, comm=None):
        self.dir, self.output_formats = dir, list(output_formats)
        self.name2val, self.name2cnt = {}, {}
        self.level = INFO
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        n = self.name2cnt.get(key, 0)
        old = self.name2val.get(key, 0.0)
        self.name2val[key] = old * n / (n + 1) + val / (n + 1)
        self.name2cnt[key] = n + 1

    def dumpkvs(self) -> dict:
        if self.comm is None:
            out = dict(self.name2val)
        else:
            local = {name: (val, self.name2cnt.get(name, 1)) for name, val in self.name2val.items()}
            out = mpi_weighted_mean(self.comm, local)
        for fmt in self.output_formats:
            if hasattr(fmt, "writekvs"):
                fmt.writekvs(dict(out))
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

    def set_comm(self, comm):
        self.comm = comm

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
    formats = [make_output_format(name, dir, log_suffix) for name in names]
    if _current is not None and _current is not _default:
        _current.close()
    _current = Logger.CURRENT = Logger(dir, formats, comm=comm)
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
        _default = Logger.DEFAULT = _current
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
        _current = Logger.CURRENT = _default
        if _current is not None:
            _current.log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    global _current
    previous = _current
    _current = Logger.CURRENT = None
    try:
        yield configure(dir=dir, format_strs=format_strs, comm=comm)
    finally:
        if _current is not None and _current is not _default:
            _current.close()
        _current = Logger.CURRENT = previous


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


def set_comm(comm):
    """Average the current logger's values over ``comm``'s ranks at each ``dumpkvs`` (an
    mpi4py-style communicator; None: this process's values only)."""
    get_current().set_comm(comm)


def get_dir():
    return get_current().get_dir()


def prints_table() -> bool:
    """True when the current logger prints its key tables to stdout (the ``stdout`` format);
    the trainer then shows no progress bar unless asked."""
    return _current is not None and any(
        isinstance(f, HumanOutputFormat) and not f.owns for f in _current.output_formats
    )
