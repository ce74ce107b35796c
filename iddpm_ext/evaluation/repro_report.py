"""The report of ``iddpm reproduce``: the paper's expected directions checked against the
numbers, a Markdown table, and PNG figures drawn with Pillow (no matplotlib):
``quality_vs_steps.png`` (FD vs sampling steps per run), ``nll.png`` (bits/dim per run
with standard errors) and ``samples.png`` (the same seeds at every step count)."""

from __future__ import annotations

import math
import os

import numpy as np

COLORS = {
    "simple_cosine": (31, 119, 180),
    "hybrid_cosine": (214, 39, 40),
    "vlb_cosine": (44, 160, 44),
    "hybrid_linear": (255, 127, 14),
    "simple_linear": (23, 190, 207),
}
SHORT = {
    "simple_cosine": "L_simple, fixed sigma, cosine",
    "hybrid_cosine": "L_hybrid, learned sigma, cosine",
    "vlb_cosine": "L_vlb, learned sigma, cosine",
    "hybrid_linear": "L_hybrid, learned sigma, linear",
    "simple_linear": "L_simple, fixed sigma, linear",
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


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _dashed(draw, p, q, fill, width=2, dash=7):
    (x0, y0), (x1, y1) = p, q
    length = math.hypot(x1 - x0, y1 - y0)
    n = max(1, int(length // dash))
    for i in range(0, n, 2):
        a, b = i / n, min(1.0, (i + 1) / n)
        draw.line(
            [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
            fill=fill,
            width=width,
        )


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == 0 else f"{v:.2g}"


def _save(img, path):
    img.save(path, format="PNG", optimize=True)


def plot_quality(results: dict, path: str, width=720, height=440):
    """FD vs sampling steps (log x), one line per run, the real-vs-real floor dashed."""
    from PIL import Image, ImageDraw

    steps = sorted(results["settings"]["sample_steps"])
    series = {}
    for name, r in results["runs"].items():
        by = r.get("samples", {}).get("by_steps", {})
        pts = [(k, by[str(k)]["fd"], by[str(k)]["fd_bootstrap_std"]) for k in steps if str(k) in by]
        if pts:
            series[name] = pts
    floor = results["classifier"]["real_floor_fd"]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(12)
    left, right, top, bottom = 70, width - 250, 40, height - 50
    d.text((left, 10), "sample quality vs sampling steps (lower is better)", fill=(0, 0, 0), font=f)
    d.rectangle([left, top, right, bottom], outline=(150, 150, 150))
    ys = [y + e for pts in series.values() for _, y, e in pts] + [floor]
    ymax = max(ys) * 1.08 if ys else 1.0
    lx = [math.log(k) for k in steps]
    xlo, xhi = min(lx), max(lx)
    xhi = xhi if xhi > xlo else xlo + 1
    px = lambda k: left + 20 + (math.log(k) - xlo) / (xhi - xlo) * (right - left - 40)  # noqa: E731
    py = lambda y: bottom - y / ymax * (bottom - top)  # noqa: E731
    for i in range(6):
        v = ymax * i / 5
        d.line([left - 4, py(v), left, py(v)], fill=(120, 120, 120))
        d.text((8, py(v) - 7), _tick(v), fill=(60, 60, 60), font=fs)
    for k in steps:
        d.line([px(k), bottom, px(k), bottom + 4], fill=(120, 120, 120))
        d.text((px(k) - 10, bottom + 8), str(k), fill=(60, 60, 60), font=fs)
    d.text(((left + right) // 2 - 90, height - 22), "sampling steps (log scale)", fill=(0, 0, 0), font=fs)
    d.text((8, top - 20), "FD", fill=(0, 0, 0), font=fs)
    _dashed(d, (left, py(floor)), (right, py(floor)), (130, 130, 130), width=1)
    for name, pts in series.items():
        color = COLORS.get(name, (0, 0, 0))
        xy = [(px(k), py(y)) for k, y, _ in pts]
        for a, b in zip(xy, xy[1:]):
            (_dashed(d, a, b, color) if name.endswith("linear") else d.line([a, b], fill=color, width=2))
        for (_k, y, e), (x, yy) in zip(pts, xy):
            d.line([x, py(y - e), x, py(y + e)], fill=color, width=1)
            d.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=color)
    ly = top
    for name in series:
        color = COLORS.get(name, (0, 0, 0))
        if name.endswith("linear"):
            _dashed(d, (right + 15, ly + 8), (right + 45, ly + 8), color)
        else:
            d.line([right + 15, ly + 8, right + 45, ly + 8], fill=color, width=2)
        d.text((right + 52, ly), SHORT.get(name, name), fill=(0, 0, 0), font=fs)
        ly += 22
    _dashed(d, (right + 15, ly + 8), (right + 45, ly + 8), (130, 130, 130), width=1)
    d.text((right + 52, ly), "real digits vs test (floor)", fill=(0, 0, 0), font=fs)
    d.text((right + 15, ly + 26), "bars: bootstrap std", fill=(90, 90, 90), font=fs)
    _save(img, path)


def plot_nll(results: dict, path: str, width=720, row=34):
    """Held-out bits/dim per run: horizontal bars with ± 1 standard error."""
    from PIL import Image, ImageDraw

    rows = [(n, r["nll"]["bpd"], r["nll"]["stderr"]) for n, r in results["runs"].items() if "nll" in r]
    height = 80 + row * max(1, len(rows))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(12)
    T = results["settings"]["diffusion_steps"]
    d.text((10, 10), f"held-out NLL, bits/dim (full {T}-step bound; lower is better)", fill=(0, 0, 0), font=f)
    left, right = 240, width - 90
    vmax = max([b + (e if math.isfinite(e) else 0) for _, b, e in rows], default=1.0) * 1.05
    px = lambda v: left + v / vmax * (right - left)  # noqa: E731
    for i, (name, b, e) in enumerate(rows):
        y = 45 + i * row
        color = COLORS.get(name, (100, 100, 100))
        d.text((10, y + 6), SHORT.get(name, name), fill=(0, 0, 0), font=fs)
        d.rectangle([left, y + 4, px(b), y + row - 8], fill=color)
        if math.isfinite(e):
            d.line([px(b - e), y + row // 2 - 2, px(b + e), y + row // 2 - 2], fill=(0, 0, 0), width=2)
        d.text((px(b + (e if math.isfinite(e) else 0)) + 6, y + 6), f"{b:.3f}", fill=(0, 0, 0), font=fs)
    d.line([left, height - 30, right, height - 30], fill=(120, 120, 120))
    for i in range(5):
        v = vmax * i / 4
        d.text((px(v) - 10, height - 25), f"{v:.2f}", fill=(60, 60, 60), font=fs)
    _save(img, path)


def plot_samples(results: dict, out_dir: str, path: str, scale=4, pad=2):
    """Rows: runs; columns: step counts; each cell the first ``grid_samples`` samples (the
    same per-sample seeds in every cell)."""
    from PIL import Image, ImageDraw

    s = results["settings"]
    steps, n = s["sample_steps"], s["grid_samples"]
    ncol = max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    size = s["image_size"] * scale
    cell_w, cell_h = ncol * (size + pad) + pad, nrow * (size + pad) + pad
    label_w, head_h, gap = 210, 26, 10
    names = [name for name in results["runs"] if "samples" in results["runs"][name]]
    fs = _font(12)
    heads = [f"{k} steps" + (" (full)" if k == s["diffusion_steps"] else "") for k in steps]
    col_w = max([cell_w] + [int(fs.getlength(h)) + 6 for h in heads]) + gap
    width = label_w + len(steps) * col_w
    height = head_h + len(names) * (cell_h + gap)
    img = Image.new("L", (width, height), 255)
    d = ImageDraw.Draw(img)
    for j, text in enumerate(heads):
        d.text((label_w + j * col_w + 2, 6), text, fill=0, font=fs)
    for i, name in enumerate(names):
        y = head_h + i * (cell_h + gap)
        d.text((6, y + cell_h // 2 - 8), SHORT.get(name, name), fill=0, font=fs)
        for j, k in enumerate(steps):
            npz = os.path.join(out_dir, name, f"samples_{k}steps.npz")
            if not os.path.isfile(npz):
                continue
            with np.load(npz) as z:
                images = z["arr_0"][:n, :, :, 0]
            x0 = label_w + j * col_w
            d.rectangle([x0, y, x0 + cell_w - 1, y + cell_h - 1], fill=200)
            for q, im in enumerate(images):
                r, c = divmod(q, ncol)
                tile = Image.fromarray(im).resize((size, size), Image.NEAREST)
                img.paste(tile, (x0 + pad + c * (size + pad), y + pad + r * (size + pad)))
    _save(img, path)


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
