"""Timing, peak numbers, table printing and JSON output shared by the benchmarks.

``ms`` is always the median of timed runs after warm-up. On CUDA each run is timed with
CUDA events and the L2 cache is flushed before it (by writing a buffer larger than L2),
so memory-bound kernels are measured from HBM, not from cache.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch

# Dense peak numbers of cards we may meet: HBM bytes/s, and bf16/fp16 tensor-core FLOP/s.
_PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100 SXM": (3.35e12, 989e12),
    "H100 80GB HBM3": (3.35e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100 NVL": (3.9e12, 835e12),
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100-SXM4-40GB": (1.555e12, 312e12),
    "A100 80GB PCIe": (1.935e12, 312e12),
    "L40S": (0.864e12, 362e12),
}


class BenchArgumentError(ValueError):
    """A benchmark argument with a bad value; ``iddpm bench`` prints it as one error line."""


def parse_shapes(text: str, flag: str, dims: int, example: str) -> list:
    """``"64x4x64x256,1x4x64x64"`` -> [(64, 4, 64, 256), (1, 4, 64, 64)]; each shape has
    ``dims`` positive ints, else a :class:`BenchArgumentError` naming ``flag``."""
    shapes = []
    for c in text.split(","):
        parts = c.strip().lower().split("x")
        if len(parts) != dims or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BenchArgumentError(
                f"{flag}: expected {dims} positive ints joined by 'x' (e.g. {example}), got {c.strip()!r}"
            )
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_names(text: str, allowed, flag: str) -> list:
    """``"a,b"`` -> ["a", "b"], each one of ``allowed``, else a :class:`BenchArgumentError`
    naming ``--flag``."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    for t in out:
        if t not in allowed:
            raise BenchArgumentError(f"--{flag}: expected names from {list(allowed)}, got {t!r}")
    return out


def setup(args):
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None) is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if getattr(args, "warmup", None) is None:
        args.warmup = 2 if args.quick else 5
    if getattr(args, "iters", None) is None:
        args.iters = 3 if args.quick else 20


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_bandwidth(device) -> float | None:
    """HBM bytes/s of the card, or None when unknown (and on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bw, _) in _PEAKS.items():
        if key in name:
            return bw
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", None)  # kHz
    width = getattr(props, "memory_bus_width", None)  # bits
    if clock and width:
        return 2 * clock * 1e3 * width / 8
    return None


def peak_tensor_flops(device) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (_, flops) in _PEAKS.items():
        if key in name:
            return flops
    return None


_L2_FLUSH = {}


def _flush_l2(device):
    buf = _L2_FLUSH.get(str(device))
    if buf is None:
        props = torch.cuda.get_device_properties(device)
        size = max(2 * getattr(props, "L2_cache_size", 64 << 20), 128 << 20)
        buf = torch.empty(size // 4, dtype=torch.int32, device=device)
        _L2_FLUSH[str(device)] = buf
    buf.zero_()


def time_ms(fn, device, warmup: int = 5, iters: int = 20, flush_l2: bool = True) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            if flush_l2:
                _flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(fn, device, warmup: int = 5, iters: int = 20, calls: int = 20) -> float:
    """Median host microseconds per call of ``fn()``: the time the calling thread spends
    issuing it (on CUDA the launches are not waited for; the queue is drained between
    timed runs, so it never fills). On the CPU this is the whole call."""
    device = torch.device(device)

    def drain():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    drain()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
        drain()
    return statistics.median(times)


def cuda_events(fn, device=None) -> tuple:
    """(kernels launched, host-to-device copies) during one call of ``fn()`` on CUDA, as
    torch.profiler sees them (memsets are not counted as kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = h2d = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        if "memcpy" in name:
            h2d += "htod" in name
        elif "memset" not in name:
            kernels += 1
    return kernels, h2d


def launches(fn, device) -> dict:
    """What one call of ``fn()`` dispatches: ``ops_per_call``, the torch ops (aten and
    custom) seen by a dispatch-mode counter, and on CUDA ``kernels_per_call`` and
    ``h2d_per_call`` (host-to-device copies), seen by torch.profiler. Empty when counting
    fails (best effort: counting must not end a benchmark)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    try:
        fn()
        with _Count():
            fn()
        out["ops_per_call"] = _Count.n
        device = torch.device(device)
        if device.type == "cuda":
            kernels, h2d = cuda_events(fn, device)
            out.update(kernels_per_call=kernels, h2d_per_call=h2d)
    except Exception as exc:  # noqa: BLE001 - best effort
        out["launches_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def reference_module(name: str):
    """The module ``improved_diffusion.<name>`` of openai/improved-diffusion from a local checkout
    named by IDDPM_REF_PATH (the folder holding the package, as tests/compat uses it), or None
    when the variable is unset. Never part of this project: benchmarks only compare against it."""
    import importlib
    import sys

    path = os.environ.get("IDDPM_REF_PATH")
    if not path:
        return None
    if not os.path.isdir(os.path.join(path, "improved_diffusion")):
        raise BenchArgumentError(
            f"IDDPM_REF_PATH: expected a checkout of openai/improved-diffusion (a folder holding "
            f"improved_diffusion/), got {path!r}"
        )
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(f"improved_diffusion.{name}")


def emit(args, rec: dict) -> dict:
    """Print one record as a line now (flushed, so a run cut short still shows its cases)
    and, with --json, rewrite the JSON file with every record so far; returns ``rec``."""
    fields = [rec["op"], rec["impl"], _fmt(rec["shape"]), rec["dtype"], f"{rec['ms']:.4g} ms"]
    for key, unit in (("host_us", " us host"), ("ops_per_call", " ops"), ("kernels_per_call", " kernels"),
                      ("gbps", " GB/s"), ("tflops", " TFLOP/s"), ("speedup", "x")):  # fmt: skip
        if rec.get(key) is not None:
            fields.append(f"{_fmt(rec[key])}{unit}")
    print("  " + " | ".join(str(f) for f in fields), flush=True)
    sink = getattr(args, "record_sink", None)
    if sink is not None:
        sink.append(rec)
        if getattr(args, "json", None):
            write_json(args.json, sink)
    return rec


def record(op, impl, shape, dtype, device, ms, bytes_moved=None, flops=None, **extra) -> dict:
    """One benchmark record; GB/s and % of peak bandwidth from ``bytes_moved``,
    TFLOP/s (and % of tensor-core peak) from ``flops``."""
    rec = {
        "op": op,
        "impl": impl,
        "shape": list(shape) if not isinstance(shape, str) else shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device),
        "ms": round(ms, 5),
    }
    if bytes_moved is not None and ms > 0:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        rec["gbps"] = round(gbps, 2)
        peak = peak_bandwidth(device)
        if peak:
            rec["pct_peak"] = round(100 * gbps * 1e9 / peak, 1)
    if flops is not None and ms > 0:
        tflops = flops / (ms * 1e-3) / 1e12
        rec["tflops"] = round(tflops, 3)
        peak = peak_tensor_flops(device)
        if peak and "pct_peak" not in rec:
            rec["pct_peak"] = round(100 * tflops * 1e12 / peak, 1)
    rec.update(extra)
    return rec


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), so that numbers from different hosts can be told apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    """What decides which CPU kernels run (and how fast): torch's vector capability ("AVX512",
    "AVX2", ...) and whether the CPU has AVX-512-BF16 and AMX tiles (torch's probes; None where
    a probe is missing). The same VM name has been hosts with and without AMX."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    out = {"capability": torch.backends.cpu.get_cpu_capability()}
    for key, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        try:
            out[key] = bool(probe()) if probe is not None else None
        except Exception:  # noqa: BLE001 - a fact, best effort
            out[key] = None
    return out


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from .. import ops as _ops

        env["iddpm_ext_build"] = _ops.build_info() if _ops.available() else None
    except Exception:  # noqa: BLE001 - environment facts are best effort
        env["iddpm_ext_build"] = None
    return env


def print_table(records: list, title: str = ""):
    if not records:
        return
    cols = ["op", "impl", "shape", "dtype", "ms", "host_us", "ops_per_call", "kernels_per_call", "gbps",
            "tflops", "pct_peak", "speedup"]  # fmt: skip
    cols = [c for c in cols if any(c in r for r in records)]
    rows = [[_fmt(r.get(c, "")) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title} — {records[0].get('device', '')}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def write_json(path: str, records: list):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), "records": records}, f, indent=1)
