"""What the demo reports: report.json, report.md and grid.png, and the two tokenizer
metrics they show (reconstruction PSNR, codebook usage).

`results` (what run.py collects; every key optional except "adherence"):

    {"seed": 0, "quick": False, "text_encoder": {...}, "total_seconds": 512.3,
     "stages": {"data": 3.1, "train tokenizer": 201.0, ...},          # seconds, in run order
     "tokenizer": {"psnr": 24.3, "mean_image_psnr": 13.6, "codes_used": 51, "codebook_size": 64,
                   "num_images": 64, "detector_on_reconstructions": {"color_acc": 1.0, "shape_acc": 0.8, ...}},
     "detector_on_data": {"color_acc": 1.0, "shape_acc": 1.0, ...},   # sanity check on renders
     "adherence": {"trained":   {"seen": SCORE, "held_out": SCORE},
                   "untrained": {"seen": SCORE, "held_out": SCORE}}}  # SCORE: detector.score(...)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["psnr", "codebook_usage", "write_report", "render_markdown", "demo_grid"]

SPLITS = {"seen": "seen", "held_out": "held-out"}
GENERATORS = {"trained": "trained", "untrained": "untrained (chance)"}
_SCORE_KEYS = ("color_acc", "shape_acc", "object_acc", "count_acc", "num_images", "num_objects")


# ---------------------------------------------------------------------------------------
# Tokenizer metrics

def psnr(originals, reconstructions) -> float:
    """Mean over images of the PSNR (dB) between (B, 3, H, W) images in [0, 1] (tensors or
    arrays); an exact copy counts as 100 dB."""
    a = np.asarray(originals.detach().float().cpu() if hasattr(originals, "detach") else originals, dtype=np.float64)
    b = np.asarray(reconstructions.detach().float().cpu() if hasattr(reconstructions, "detach") else reconstructions,
                   dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr: expected two (B, 3, H, W) batches of the same shape, got {a.shape} and {b.shape}")
    mse = ((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2).reshape(a.shape[0], -1).mean(1)
    return float(np.mean([100.0 if m == 0 else min(100.0, -10.0 * math.log10(m)) for m in mse]))


def codebook_usage(ids, codebook_size: int) -> dict:
    """{"codes_used", "codebook_size", "usage" (fraction), "perplexity"} of VQ token ids."""
    ids = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids).reshape(-1).astype(np.int64)
    if ids.size == 0:
        raise ValueError("ids: expected at least one token id")
    if ids.min() < 0 or ids.max() >= codebook_size:
        raise ValueError(f"ids: expected values in [0, {codebook_size}), got [{ids.min()}, {ids.max()}]")
    counts = np.bincount(ids, minlength=codebook_size)
    p = counts[counts > 0] / ids.size
    used = int((counts > 0).sum())
    return {"codes_used": used, "codebook_size": int(codebook_size), "usage": used / codebook_size,
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


# ---------------------------------------------------------------------------------------
# report.json / report.md

def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render_markdown(results: dict) -> str:
    """report.md from `results` (see the module doc)."""
    adherence = results.get("adherence")
    if not isinstance(adherence, dict) or not adherence:
        raise ValueError("results: expected an 'adherence' dict {generator: {split: score}}")
    lines = ["# tatitok-fast demo", ""]
    facts = []
    if "seed" in results:
        facts.append(f"seed {results['seed']}")
    if "quick" in results:
        facts.append("quick mode" if results["quick"] else "full mode")
    if "total_seconds" in results:
        facts.append(f"total {_fmt_seconds(results['total_seconds'])}")
    if "text_encoder" in results:
        facts.append(f"text encoder {json.dumps(results['text_encoder'])}")
    if facts:
        lines += [", ".join(facts) + ".", ""]

    lines += ["## Prompt adherence", "",
              "| generator | prompts | colour acc | shape acc | object acc | count acc | images |",
              "|---|---|---|---|---|---|---|"]
    for gen, by_split in adherence.items():
        for split, sc in by_split.items():
            lines.append(f"| {GENERATORS.get(gen, gen)} | {SPLITS.get(split, split)} | {_pct(sc.get('color_acc'))} | "
                         f"{_pct(sc.get('shape_acc'))} | {_pct(sc.get('object_acc'))} | {_pct(sc.get('count_acc'))} | "
                         f"{sc.get('num_images', '–')} |")
    lines += ["", "Per object a prompt names, the detector's object at that place (one-object prompts: the largest "
              "object anywhere; left/right prompts: the largest object on that side) has the prompt's colour "
              "(colour acc), its shape (shape acc), both (object acc). Count acc: images with exactly as many "
              "objects as the prompt names. Held-out prompts contain colour-shape pairs never seen in training. "
              "The untrained generator (random weights) gives the chance level.", ""]

    det = results.get("detector_on_data")
    if det:
        lines += [f"Detector on ground-truth renders: colour {_pct(det.get('color_acc'))}, "
                  f"shape {_pct(det.get('shape_acc'))} ({det.get('num_images', '?')} images).", ""]

    tok = results.get("tokenizer")
    if tok:
        lines += ["## Tokenizer", "", "| reconstruction PSNR | the mean image's PSNR | codebook usage | images |",
                  "|---|---|---|---|"]
        usage = (f"{tok['codes_used']} / {tok['codebook_size']} codes ({_pct(tok['codes_used'] / tok['codebook_size'])})"
                 if "codes_used" in tok and tok.get("codebook_size") else "–")
        psnr_s, mean_s = (f"{tok[k]:.2f} dB" if k in tok else "–" for k in ("psnr", "mean_image_psnr"))
        lines += [f"| {psnr_s} | {mean_s} | {usage} | {tok.get('num_images', '–')} |", "",
                  "Fresh renders of every colour-shape pair, held-out pairs included. The mean image (the "
                  "training set's average, what a tokenizer whose tokens carry nothing outputs) is the bar to "
                  "clear. Learning curves: curves.png.", ""]
        on_recon = tok.get("detector_on_reconstructions")
        if on_recon:
            lines += [f"Detector on these reconstructions: colour {_pct(on_recon.get('color_acc'))}, shape "
                      f"{_pct(on_recon.get('shape_acc'))}, count {_pct(on_recon.get('count_acc'))}: what a generator "
                      "that reproduced the renders' exact tokens would score: roughly the ceiling on the generator's "
                      "shape scores through this tokenizer's decoder.", ""]

    stages = results.get("stages")
    if stages:
        lines += ["## Time per stage", "", "| stage | time |", "|---|---|"]
        lines += [f"| {name} | {_fmt_seconds(sec)} |" for name, sec in stages.items()]
        lines.append("")
    return "\n".join(lines)


def _json_safe(results: dict) -> dict:
    """Drop per-image details (kept out of report.json) and make numpy scalars plain."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k != "per_image"}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x
    return clean(results)


def write_report(out_dir: str | os.PathLike, results: dict) -> tuple[Path, Path]:
    """Write report.json and report.md into `out_dir`; returns their paths."""
    out = Path(out_dir)
    md = render_markdown(results)  # validates before anything is written
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(md, encoding="utf-8")
    return json_path, md_path


# ---------------------------------------------------------------------------------------
# grid.png

def load_font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _text_block(lines: Sequence[str], width: int, height: int, font, color=(0, 0, 0)) -> Image.Image:
    im = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    line_h = font.getbbox("Ag")[3] + 3
    y = max(0, (height - line_h * len(lines)) // 2)
    for ln in lines:
        draw.text((4, y), ln, fill=color, font=font)
        y += line_h
    return im


def _wrap(text: str, font, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if cur and font.getlength(trial) > width - 8:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def demo_grid(prompt_rows: Sequence[tuple[str, Sequence[Image.Image]]],
              recon_pairs: Sequence[tuple[Image.Image, Image.Image]] = (), *, scale: int = 2,
              label_width: int = 300, pairs_per_row: int = 4) -> Image.Image:
    """One picture of the demo: a section of rows "prompt label | its generated images", then a
    section of original | reconstruction pairs. Images are enlarged `scale` times (nearest)."""
    if not prompt_rows and not recon_pairs:
        raise ValueError("demo_grid: nothing to draw (no prompt rows, no reconstruction pairs)")
    cell = None
    for _, ims in prompt_rows:
        cell = cell or (ims[0].size if ims else None)
    cell = cell or recon_pairs[0][0].size
    cw, ch = cell[0] * scale, cell[1] * scale
    pad = 4
    font, title_font = load_font(14), load_font(18)

    def big(im: Image.Image) -> Image.Image:  # enlarged, with a grey frame (the images are white-on-white)
        im = im.convert("RGB")
        im = im.resize((cw, ch), Image.NEAREST) if im.size != (cw, ch) else im.copy()
        ImageDraw.Draw(im).rectangle([0, 0, cw - 1, ch - 1], outline=(190, 190, 190))
        return im

    ncols = max([len(ims) for _, ims in prompt_rows] + [0])
    width = max(label_width + ncols * (cw + pad), pairs_per_row * (2 * cw + 3 * pad)) + pad
    blocks: list[Image.Image] = []
    if prompt_rows:
        blocks.append(_text_block(["Generated images (prompt: samples)"], width, 30, title_font))
        for label, ims in prompt_rows:
            row = Image.new("RGB", (width, ch + pad), (255, 255, 255))
            row.paste(_text_block(_wrap(label, font, label_width), label_width, ch, font), (0, 0))
            for j, im in enumerate(ims):
                row.paste(big(im), (label_width + j * (cw + pad), 0))
            blocks.append(row)
    if recon_pairs:
        blocks.append(_text_block(["Tokenizer: original | reconstruction"], width, 30, title_font))
        for i in range(0, len(recon_pairs), pairs_per_row):
            row = Image.new("RGB", (width, ch + pad), (255, 255, 255))
            for j, (orig, rec) in enumerate(recon_pairs[i:i + pairs_per_row]):
                x = pad + j * (2 * cw + 3 * pad)
                row.paste(big(orig), (x, 0))
                row.paste(big(rec), (x + cw + pad // 2, 0))
            blocks.append(row)
    grid = Image.new("RGB", (width, sum(b.height for b in blocks) + pad), (255, 255, 255))
    y = pad
    for b in blocks:
        grid.paste(b, (0, y))
        y += b.height
    return grid
