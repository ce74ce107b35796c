"""The report of ``iddpm reproduce``: the paper's expected directions checked against the
numbers, a Markdown table, and PNG figures (matplotlib, :mod:`iddpm_ext.training.plots`):
``quality_vs_steps.png`` (FD vs sampling steps per run), ``nll.png`` (bits/dim per run
with standard errors) and ``samples.png`` (the same seeds at every step count)."""

from __future__ import annotations

import math
import os

import numpy as np

# The runs' colours and names in the figures (a linear schedule's lines are dashed).
COLORS = {
    "simple_cosine": "#1f77b4",
    "hybrid_cosine": "#d62728",
    "vlb_cosine": "#2ca02c",
    "hybrid_linear": "#ff7f0e",
    "simple_linear": "#17becf",
}
SHORT = {
    "simple_cosine": "L_simple, fixed σ, cosine",
    "hybrid_cosine": "L_hybrid, learned σ, cosine",
    "vlb_cosine": "L_vlb, learned σ, cosine",
    "hybrid_linear": "L_hybrid, learned σ, linear",
    "simple_linear": "L_simple, fixed σ, linear",
}


# -------------------------------------------------------------------------------------
# numbers
# -------------------------------------------------------------------------------------


def _fd(results, run, k):
    s = results["runs"].get(run, {}).get("samples", {}).get("by_steps", {}).get(str(k))
    return None if s is None else (s["fd"], s["fd_bootstrap_std"])


def _paired_nll(out_dir, a, b):
    """(mean, stderr) of per-image bits/dim differences a - b (same images, same noise)."""
    try:
        xa = np.load(os.path.join(out_dir, a, "bpd.npz"))["total_bpd"]
        xb = np.load(os.path.join(out_dir, b, "bpd.npz"))["total_bpd"]
    except (OSError, KeyError):
        return None
    if xa.shape != xb.shape or len(xa) < 2:
        return None
    d = xa.astype(np.float64) - xb
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def _beyond(diff):
    """A paired difference more than 2 standard errors from 0 (None: unknown)."""
    return None if not diff or not math.isfinite(diff[1]) else bool(abs(diff[0]) > 2 * diff[1])


def expected_directions(results: dict, out_dir: str) -> list:
    """The paper's expected directions, each with what was measured and whether it holds
    here (None: the runs needed were not part of this reproduction)."""
    runs, settings = results["runs"], results["settings"]
    T = settings["diffusion_steps"]
    checks = []

    def nll(r):
        return runs.get(r, {}).get("nll", {}).get("bpd")

    # 1. L_hybrid reaches a lower NLL than L_simple (learned σ tightens the bound).
    for sched in ("cosine", "linear"):
        h, s = f"hybrid_{sched}", f"simple_{sched}"
        if nll(h) is None or nll(s) is None:
            continue
        diff = _paired_nll(out_dir, h, s)
        detail = f"{nll(h):.3f} vs {nll(s):.3f} bits/dim"
        if diff:
            detail += f"; paired difference {diff[0]:+.3f} ± {diff[1]:.3f}"
        checks.append(
            {
                "claim": f"hybrid NLL below simple NLL ({sched})",
                "holds": bool(nll(h) < nll(s)),
                "beyond_noise": _beyond(diff),
                "detail": detail,
                "difference": diff,
            }
        )
    # 2. Learned σ loses less quality than fixed σ when the steps drop to 50 and 25.
    for sched in ("cosine", "linear"):
        h, s = f"hybrid_{sched}", f"simple_{sched}"
        for k in (50, 25):
            fh, fs, fh0, fs0 = _fd(results, h, k), _fd(results, s, k), _fd(results, h, T), _fd(results, s, T)
            if None in (fh, fs, fh0, fs0) or k >= T:
                continue
            lost_h, lost_s = fh[0] - fh0[0], fs[0] - fs0[0]
            noise = 2 * math.hypot(fh[1], fs[1])
            checks.append(
                {
                    "claim": f"learned sigma loses less quality than fixed sigma at {k} steps ({sched})",
                    "holds": bool(lost_h < lost_s),
                    "beyond_noise": bool(abs(fh[0] - fs[0]) > noise),
                    "detail": f"FD {T}->{k} steps: hybrid {fh0[0]:.1f}->{fh[0]:.1f} ({lost_h:+.1f}), "
                    f"simple {fs0[0]:.1f}->{fs[0]:.1f} ({lost_s:+.1f}); FD gap at {k} steps "
                    f"{fh[0] - fs[0]:+.1f} vs 2 bootstrap std {noise:.1f}",
                    "fd_increase": {"learned": lost_h, "fixed": lost_s},
                }
            )
    # 3. The cosine schedule is not worse than the linear one.
    for obj in ("hybrid", "simple"):
        c, lin = f"{obj}_cosine", f"{obj}_linear"
        if nll(c) is None or nll(lin) is None:
            continue
        diff = _paired_nll(out_dir, c, lin)
        tol = 2 * diff[1] if diff else 0.0
        checks.append(
            {
                "claim": f"cosine NLL not worse than linear ({obj})",
                "holds": bool(nll(c) <= nll(lin) + tol),
                "beyond_noise": _beyond(diff),
                "detail": f"{nll(c):.3f} vs {nll(lin):.3f} bits/dim"
                + (f"; paired difference {diff[0]:+.3f} ± {diff[1]:.3f}" if diff else ""),
                "difference": diff,
            }
        )
        worse = []
        for k in settings["sample_steps"]:
            fc, fl = _fd(results, c, k), _fd(results, lin, k)
            if fc and fl:
                worse.append((k, fc[0], fl[0], fc[0] > fl[0] + 2 * math.hypot(fc[1], fl[1])))
        if worse:
            checks.append(
                {
                    "claim": f"cosine sample quality not worse than linear ({obj})",
                    "holds": not any(w[3] for w in worse),
                    "detail": "; ".join(f"{k} steps: FD {a:.1f} vs {b:.1f}" for k, a, b, _ in worse)
                    + " (worse = more than 2 bootstrap std above)",
                }
            )
    # 4. L_vlb: the best NLL, worse samples than L_hybrid (the paper's Tables 1 and 2).
    if nll("vlb_cosine") is not None and nll("hybrid_cosine") is not None:
        diff = _paired_nll(out_dir, "vlb_cosine", "hybrid_cosine")
        checks.append(
            {
                "claim": "vlb NLL below hybrid NLL (cosine)",
                "holds": bool(nll("vlb_cosine") < nll("hybrid_cosine")),
                "beyond_noise": _beyond(diff),
                "detail": f"{nll('vlb_cosine'):.3f} vs {nll('hybrid_cosine'):.3f} bits/dim"
                + (f"; paired difference {diff[0]:+.3f} ± {diff[1]:.3f}" if diff else ""),
                "difference": diff,
            }
        )
        fv, fh = _fd(results, "vlb_cosine", T), _fd(results, "hybrid_cosine", T)
        if fv and fh:
            checks.append(
                {
                    "claim": f"vlb samples worse than hybrid samples ({T} steps, cosine)",
                    "holds": bool(fv[0] > fh[0]),
                    "beyond_noise": bool(abs(fv[0] - fh[0]) > 2 * math.hypot(fv[1], fh[1])),
                    "detail": f"FD {fv[0]:.1f} vs {fh[0]:.1f}",
                }
            )
    return checks


def _f(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def table_markdown(results: dict) -> str:
    """The results table (Markdown): one row per run."""
    s, T = results["settings"], results["settings"]["diffusion_steps"]
    steps = s["sample_steps"]
    head = ["run", "objective", "σ", "schedule", "NLL (bits/dim)"]
    head += [f"FD {k}{' (full)' if k == T else ''} steps" for k in steps] + ["train s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["runs"].items():
        spec = r.get("spec", {})
        n = r.get("nll", {})
        cells = [
            f"`{name}`",
            spec.get("objective", ""),
            "learned" if spec.get("learn_sigma") else "fixed β_t",
            spec.get("noise_schedule", ""),
            f"{_f(n.get('bpd'), 3)} ± {_f(n.get('stderr'), 3)}" if n else "—",
        ]
        by = r.get("samples", {}).get("by_steps", {})
        for k in steps:
            e = by.get(str(k))
            cells.append(f"{e['fd']:.1f} ± {e['fd_bootstrap_std']:.1f}" if e else "—")
        ev = (n.get("seconds") or 0) + (r.get("samples", {}).get("seconds") or 0)
        cells += [f"{r.get('train', {}).get('seconds', 0):.0f}", f"{ev:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    c = results["classifier"]
    lines.append("")
    lines.append(
        f"FD: Fréchet distance in the {c['feature_dim']}-d penultimate-layer features of a digits "
        f"classifier (test accuracy {100 * c['test_accuracy']:.1f}%), {s['num_samples']} samples vs "
        f"the {c.get('test_images', '?')} test digits; ± = bootstrap std over the samples. "
        f"Not Inception FID. Real-vs-real floor ({c['real_floor_images']} training digits vs test): "
        f"{c['real_floor_fd']:.1f} ± {_f(c.get('real_floor_fd_std'), 1)}. NLL: mean ± standard error over "
        f"{s['nll_images']} test digits, full {T}-step bound."
    )
    return "\n".join(lines)


def checks_markdown(results: dict) -> str:
    out = []
    for c in results.get("checks", []):
        mark = {True: "yes", False: "**no**", None: "n/a"}[c["holds"]]
        noise = {True: "", False: " (within noise)", None: ""}[c.get("beyond_noise")]
        out.append(f"- {c['claim']}: {mark}{noise} — {c['detail']}")
    return "\n".join(out)


# -------------------------------------------------------------------------------------
# figures
# -------------------------------------------------------------------------------------


def _color(name: str) -> str:
    return COLORS.get(name, "#646464")


def plot_quality(results: dict, path: str | None = None):
    """FD vs sampling steps (log x), one line per run with bootstrap error bars (the linear
    schedule's runs dashed), the real-vs-real floor dotted; returns the matplotlib Figure."""
    from ..training.plots import errorbar_figure

    steps = sorted(results["settings"]["sample_steps"])
    series = []
    for name, r in results["runs"].items():
        by = r.get("samples", {}).get("by_steps", {})
        pts = [(k, by[str(k)]["fd"], by[str(k)]["fd_bootstrap_std"]) for k in steps if str(k) in by]
        if pts:
            style = {"color": _color(name), "ls": "--" if name.endswith("linear") else "-"}
            series.append((SHORT.get(name, name), *map(list, zip(*pts)), style))
    c = results["classifier"]
    floor = [(c["real_floor_fd"], f"floor: {c.get('real_floor_images', '')} real digits vs test digits", {})]
    n = results["settings"]["num_samples"]
    return errorbar_figure(
        series,
        path,
        title="Sample quality vs sampling steps (lower is better)",
        xlabel=f"sampling steps (log scale; {results['settings']['diffusion_steps']} = the full chain)",
        ylabel="FD in digits-classifier features",
        xticks=steps,
        hlines=floor,
        note=f"error bars: bootstrap std ({n} samples)",
    )


def plot_nll(results: dict, path: str | None = None):
    """Held-out bits/dim per run: horizontal bars with ± 1 standard error, on an axis zoomed
    to the values; returns the matplotlib Figure."""
    from ..training.plots import bar_figure

    rows = [
        (SHORT.get(n, n), r["nll"]["bpd"], r["nll"]["stderr"], _color(n))
        for n, r in results["runs"].items()
        if "nll" in r
    ]
    images = next((r["nll"].get("images") for r in results["runs"].values() if "nll" in r), None)
    T = results["settings"]["diffusion_steps"]
    return bar_figure(
        rows,
        path,
        title=f"Held-out NLL: the full {T}-step bound (lower is better)",
        xlabel="bits/dim",
        err_label=f"± 1 standard error ({images} test digits)" if images else "± 1 standard error",
    )


def plot_samples(results: dict, out_dir: str, path: str | None = None):
    """Rows: runs; columns: step counts; each cell the first ``grid_samples`` samples (the
    same per-sample seeds in every cell); returns the matplotlib Figure (None: no samples)."""
    from ..training.plots import image_grid_figure, montage

    s = results["settings"]
    steps, n, size = s["sample_steps"], s["grid_samples"], s["image_size"]
    ncol = max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    blank = np.full((size, size, 1), 200, dtype=np.uint8)
    cells, labels = [], []
    for name, r in results["runs"].items():
        if "samples" not in r:
            continue
        row = []
        for k in steps:
            npz = os.path.join(out_dir, name, f"samples_{k}steps.npz")
            images = []
            if os.path.isfile(npz):
                with np.load(npz) as z:
                    images = list(z["arr_0"][:n])
            tiles = images + [blank] * (nrow * ncol - len(images))
            row.append(montage([tiles[i : i + ncol] for i in range(0, len(tiles), ncol)], pad=1, fill=128))
        cells.append(row)
        labels.append(SHORT.get(name, name))
    if not cells:
        return None
    heads = [f"{k} steps" + (" (full)" if k == s["diffusion_steps"] else "") for k in steps]
    return image_grid_figure(
        cells,
        path,
        row_labels=labels,
        col_labels=heads,
        title=f"The first {n} samples of each run (the same seeds in every cell)",
        xlabel="sampling steps",
        cell_px=4 * (ncol * (size + 1) + 1),
        pad=6,
    )


def write_all(results: dict, out_dir: str):
    """table.md, quality_vs_steps.png, nll.png, samples.png in ``out_dir``."""
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(
            table_markdown(results)
            + "\n\nExpected directions (the paper) vs this run:\n\n"
            + checks_markdown(results)
            + "\n"
        )
    plot_quality(results, os.path.join(out_dir, "quality_vs_steps.png"))
    plot_nll(results, os.path.join(out_dir, "nll.png"))
    plot_samples(results, out_dir, os.path.join(out_dir, "samples.png"))
