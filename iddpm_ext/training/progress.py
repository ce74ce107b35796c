"""Progress bars of the long-running commands (train, sample, nll, demo, reproduce, fid):
tqdm on stderr, with the rate and the time left, on the main process only; ``--progress
False`` turns them off (a disabled bar: every method does nothing)."""

from __future__ import annotations

from .. import dist_util


def progress_bar(enabled: bool, total, desc: str, unit: str = "it", **kwargs):
    """A tqdm bar of ``total`` ``unit``s on stderr when ``enabled`` and this is the main
    process; otherwise a disabled one (``bar.disable`` is True)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not (enabled and dist_util.is_main()), **kwargs)  # fmt: skip


def bar_safe(log):
    """``log``, except that ``print`` becomes a print that clears and redraws this process's
    active bars around the line (tqdm.write), so log lines and bars do not tear each other."""
    if log is not print:
        return log

    def write(*args, **_kwargs):
        import sys

        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()

    return write
