"""Training metrics: a JSONL log (one record per logged step) and a PNG plot of the curves
drawn with Pillow (no matplotlib), refreshed as training runs."""

from __future__ import annotations

import io
import json
import math
import os

from ..io import atomic_write_bytes

# (panel title, main key, thin extra keys, log scale)
PANELS = (
    ("loss", "loss", ("loss_q0", "loss_q1", "loss_q2", "loss_q3"), True),
    ("mse", "mse", ("mse_q0", "mse_q1", "mse_q2", "mse_q3"), True),
    ("vb", "vb", ("vb_q0", "vb_q1", "vb_q2", "vb_q3"), True),
    ("grad norm", "grad_norm", (), True),
)
QUARTILE_COLORS = ((120, 170, 230), (90, 190, 120), (230, 170, 60), (220, 90, 90))


def read_jsonl(path: str) -> list:
    """The records of a JSONL log (a torn last line, from a kill mid-write, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Appends records to ``jsonl_path`` and redraws ``png_path`` from them."""

    def __init__(self, jsonl_path: str, png_path: str | None = None, resume_step: int | None = None):
        self.jsonl_path = jsonl_path
        self.png_path = png_path
        self.records = []
        if resume_step is not None and os.path.isfile(jsonl_path):
            # Keep what the checkpoint covers; later lines belong to the interrupted run.
            self.records = [r for r in read_jsonl(jsonl_path) if r.get("step", 0) <= resume_step]
            data = "".join(json.dumps(r) + "\n" for r in self.records).encode()
            atomic_write_bytes(jsonl_path, data)
        elif os.path.exists(jsonl_path):
            os.remove(jsonl_path)

    def append(self, record: dict):
        self.records.append(record)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title: str = ""):
        if self.png_path and self.records:
            plot_curves(self.records, self.png_path, title=title)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _panel(draw, box, title, series, log_scale, xs_all):
    """One plot: series = [(xs, ys, color, width)] in box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 10, y0 + 22, y1 - 24
    draw.rectangle([left, top, right, bottom], outline=(150, 150, 150))
    draw.text((left, y0 + 4), title, fill=(0, 0, 0))
    ys_all = [
        y
        for _, ys, _, _ in series
        for y in ys
        if y is not None and math.isfinite(y) and (y > 0 or not log_scale)
    ]
    if not ys_all or not xs_all:
        draw.text((left + 8, top + 8), "no data", fill=(120, 120, 120))
        return
    tf = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    lo, hi = min(map(tf, ys_all)), max(map(tf, ys_all))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = min(xs_all), max(xs_all)
    xhi = xhi if xhi > xlo else xlo + 1

    def px(x):
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y):
        return bottom - (tf(y) - lo) / (hi - lo) * (bottom - top)

    for i in range(5):  # y ticks
        v = lo + (hi - lo) * i / 4
        yy = bottom - (bottom - top) * i / 4
        draw.line([left - 3, yy, left, yy], fill=(120, 120, 120))
        draw.text((x0 + 2, yy - 6), _fmt(10**v if log_scale else v), fill=(60, 60, 60))
    for i in range(3):  # x ticks
        v = xlo + (xhi - xlo) * i / 2
        xx = px(v)
        draw.line([xx, bottom, xx, bottom + 3], fill=(120, 120, 120))
        label = f"{int(round(v))}"
        width = draw.textlength(label)
        draw.text((min(max(xx - width / 2, left), right - width), bottom + 6), label, fill=(60, 60, 60))
    for xs, ys, color, width in series:
        pts = [
            (px(x), py(y))
            for x, y in zip(xs, ys)
            if y is not None and math.isfinite(y) and (y > 0 or not log_scale)
        ]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        elif pts:
            draw.line(pts, fill=color, width=width)


def plot_curves(records: list, path: str, title: str = "", width: int = 900, panel_h: int = 220):
    """Draw the loss / mse / vb (with their per-quartile-of-t curves) and grad-norm
    panels of ``records`` (dicts with a "step") into a PNG at ``path`` (atomically)."""
    from PIL import Image, ImageDraw

    panels = [p for p in PANELS if any(p[1] in r for r in records)]
    if not panels:
        panels = PANELS[:1]
    head = 24 if title else 0
    img = Image.new("RGB", (width, head + panel_h * len(panels) + 18), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 6), title, fill=(0, 0, 0))
    xs_all = [r["step"] for r in records if "step" in r]
    for i, (name, key, extras, log_scale) in enumerate(panels):
        series = []
        for q, extra in enumerate(extras):
            pts = [(r["step"], r.get(extra)) for r in records if "step" in r and extra in r]
            if pts:
                series.append(([p[0] for p in pts], [p[1] for p in pts], QUARTILE_COLORS[q], 1))
        pts = [(r["step"], r.get(key)) for r in records if "step" in r and key in r]
        series.append(([p[0] for p in pts], [p[1] for p in pts], (20, 20, 20), 2))
        label = name + (" (thin: quartiles of t, q0 = smallest t)" if len(series) > 1 else "")
        box = (0, head + i * panel_h, width, head + (i + 1) * panel_h)
        _panel(draw, box, label + (", log scale" if log_scale else ""), series, log_scale, xs_all)
    draw.text((width // 2 - 20, img.height - 16), "step", fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
