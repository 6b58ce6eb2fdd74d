"""Learning curves of the demo's two training stages, drawn from their metrics.jsonl files into
one PNG (PIL only: no plotting library is a dependency).

    read_series(metrics.jsonl, key)  -> [(step, value)], the rows that hold `key`
    plot_curves([Panel, ...], path)  -> a row of line plots, one per panel
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image, ImageDraw

from tatitok_fast.demo.report import load_font

__all__ = ["Panel", "read_series", "plot_curves"]


class Panel(NamedTuple):
    title: str  # e.g. "tokenizer: PSNR on held-out renders (dB)"
    points: Sequence[tuple[float, float]]  # (step, value), in step order
    reference: float | None = None  # a dashed horizontal line (e.g. the mean image's PSNR)
    reference_label: str = ""


def read_series(path: str | os.PathLike, key: str) -> list[tuple[float, float]]:
    """(step, value) of every row of a metrics.jsonl that holds a finite `key`."""
    points = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in row:
                points.append((float(row["step"]), float(v)))
    return points


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _draw_panel(panel: Panel, w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    font, small = load_font(14), load_font(11)
    d.text((10, 6), panel.title, fill=(0, 0, 0), font=font)
    left, right, top, bottom = 56, w - 14, 32, h - 30
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    pts = list(panel.points)
    if not pts:
        d.text((left + 10, (top + bottom) // 2), "no data", fill=(120, 120, 120), font=font)
        return im
    values = [v for _, v in pts] + ([panel.reference] if panel.reference is not None else [])
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    s0, s1 = pts[0][0], pts[-1][0]
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step: float, v: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    for v in _ticks(lo, hi):
        y = xy(s0, v)[1]
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((4, y - 7), f"{v:.3g}", fill=(0, 0, 0), font=small)
    for s in _ticks(s0, s1):
        x = xy(s, lo)[0]
        d.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        d.text((x - 12, bottom + 6), f"{s:.0f}", fill=(0, 0, 0), font=small)
    d.text((right - 30, bottom + 16), "step", fill=(0, 0, 0), font=small)
    if panel.reference is not None:
        y = xy(s0, panel.reference)[1]
        for x in range(left, right, 12):
            d.line([x, y, min(x + 6, right), y], fill=(200, 60, 60))
        d.text((left + 6, y - 15), panel.reference_label, fill=(200, 60, 60), font=small)
    line = [xy(s, v) for s, v in pts]
    if len(line) > 1:
        d.line(line, fill=(30, 80, 200), width=2)
    for x, y in line:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 80, 200))
    return im


def plot_curves(panels: Sequence[Panel], path: str | os.PathLike, *, panel_size: tuple[int, int] = (420, 260)
                ) -> Path:
    """Draw the panels side by side into path (PNG)."""
    if not panels:
        raise ValueError("panels: expected at least one panel to draw")
    w, h = panel_size
    canvas = Image.new("RGB", (w * len(panels), h), (255, 255, 255))
    for i, panel in enumerate(panels):
        canvas.paste(_draw_panel(panel, w, h), (i * w, 0))
    path = Path(path)
    canvas.save(path)
    return path
