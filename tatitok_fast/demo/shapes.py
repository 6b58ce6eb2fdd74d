"""Procedural captioned images: one or two flat shapes on white, their captions and ground
truth, written as webdataset shards, deterministic from a seed.

Images are `size` x `size` RGB (64 by default), white background, drawn without
anti-aliasing so that every shape pixel has exactly its palette colour:

    one shape   "a red circle"                  position "center", size 20..34 px (at 64)
    two shapes  "a blue square on the left and a yellow triangle on the right"
                left centre x in 13..20, right in 44..51 px, sizes 14..22 px: never touching

Shapes: circle (disc), square (axis-aligned), triangle (isosceles, apex up, base = height).

Held-out compositions: of the 6 x 3 = 18 colour-shape pairs, HELD_OUT_PAIRS (red square,
green triangle, blue circle, purple square) never appear in training images. Every colour
and every shape still appears in training, so held-out prompts test composition, not new
words. `test_prompts("seen")` uses only training pairs, `test_prompts("held_out")` puts at
least one held-out pair in every prompt.

Sample i of a set depends only on (seed, i), not on how many samples are written.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "ALL_PAIRS", "HELD_OUT_PAIRS", "TRAIN_PAIRS", "AES_SCORE", "caption",
           "parse_caption", "render", "sample_objects", "make_sample", "iter_samples", "write_shards",
           "test_prompts"]

# palette (sRGB): far from white and from each other
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 0),
    "purple": (140, 40, 180),
    "orange": (250, 135, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "square"), ("green", "triangle"), ("blue", "circle"),
                                               ("purple", "square"))
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
AES_SCORE = 6.0  # the aesthetic-score micro-condition written into every sample's json
BACKGROUND = (255, 255, 255)
POSITIONS = ("center", "left", "right")

# geometry at 64 px; scaled linearly for other sizes
_ONE_SIZE = (20, 34)
_TWO_SIZE = (14, 22)
_TWO_X = {"left": (13, 20), "right": (44, 51)}
_REF = 64


# ---------------------------------------------------------------------------------------
# Captions

def _name(o: dict) -> str:
    return f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}"


def caption(objects: Sequence[dict]) -> str:
    """Caption of one object ("a red circle", "an orange square") or of a left/right pair."""
    if len(objects) == 1:
        return _name(objects[0])
    if len(objects) == 2:
        left, right = sorted(objects, key=lambda o: o["position"] != "left")
        if (left["position"], right["position"]) != ("left", "right"):
            raise ValueError(f"objects: two objects must be on the left and the right, got "
                             f"{[o['position'] for o in objects]}")
        return f"{_name(left)} on the left and {_name(right)} on the right"
    raise ValueError(f"objects: expected one or two objects, got {len(objects)}")


_WORD = r"(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")"
_ONE = re.compile(rf"^an? {_WORD}$")
_TWO = re.compile(rf"^an? {_WORD} on the left and an? {_WORD} on the right$")


def parse_caption(text: str) -> list[dict]:
    """The objects a caption of this grammar names: [{"color", "shape", "position"}, ...]."""
    if not isinstance(text, str):
        raise TypeError(f"caption: expected a str, got {type(text).__name__}")
    t = " ".join(text.lower().split())
    if m := _ONE.match(t):
        return [{"color": m[1], "shape": m[2], "position": "center"}]
    if m := _TWO.match(t):
        return [{"color": m[1], "shape": m[2], "position": "left"},
                {"color": m[3], "shape": m[4], "position": "right"}]
    raise ValueError(f"caption: {text!r} is not 'a COLOR SHAPE' or 'a COLOR SHAPE on the left and a COLOR SHAPE "
                     f"on the right' (colours {list(COLORS)}, shapes {list(SHAPES)})")


# ---------------------------------------------------------------------------------------
# Rendering

def _check_object(o: dict) -> None:
    if o.get("color") not in COLORS:
        raise ValueError(f"objects: color must be one of {list(COLORS)}, got {o.get('color')!r}")
    if o.get("shape") not in SHAPES:
        raise ValueError(f"objects: shape must be one of {list(SHAPES)}, got {o.get('shape')!r}")
    if not isinstance(o.get("bbox"), (list, tuple)) or len(o["bbox"]) != 4:
        raise ValueError(f"objects: bbox must be [x0, y0, x1, y1] (inclusive pixels), got {o.get('bbox')!r}")


def render(objects: Sequence[dict], size: int = 64) -> Image.Image:
    """Draw objects ({"color", "shape", "bbox": [x0, y0, x1, y1] inclusive}) on white, no
    anti-aliasing."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: expected an int >= 16, got {size!r}")
    im = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for o in objects:
        _check_object(o)
        x0, y0, x1, y1 = (int(v) for v in o["bbox"])
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return im


def _scaled(lo_hi: tuple[int, int], size: int) -> tuple[int, int]:
    return round(lo_hi[0] * size / _REF), round(lo_hi[1] * size / _REF)


def _place(rng: np.random.Generator, color: str, shape: str, position: str, size: int) -> dict:
    """One object with jittered size and position (all geometry in integer pixels)."""
    lo, hi = _scaled(_ONE_SIZE if position == "center" else _TWO_SIZE, size)
    s = int(rng.integers(lo, hi + 1))
    margin = max(1, round(2 * size / _REF))
    if position == "center":
        cx = int(rng.integers(margin + s // 2, size - margin - (s - s // 2) + 1))
    else:
        lo_x, hi_x = _scaled(_TWO_X[position], size)
        cx = int(rng.integers(lo_x, hi_x + 1))
    cy = int(rng.integers(margin + s // 2, size - margin - (s - s // 2) + 1))
    x0, y0 = cx - s // 2, cy - s // 2
    return {"color": color, "shape": shape, "position": position, "size": s,
            "center": [x0 + (s - 1) / 2, y0 + (s - 1) / 2], "bbox": [x0, y0, x0 + s - 1, y0 + s - 1]}


def sample_objects(rng: np.random.Generator, pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS, size: int = 64,
                   p_two: float = 0.5) -> list[dict]:
    """One or two objects (probability p_two of two) with colour-shape pairs drawn from `pairs`."""
    if not pairs:
        raise ValueError("pairs: expected at least one (color, shape) pair")
    if rng.random() < p_two:
        a, b = rng.integers(len(pairs), size=2)
        return [_place(rng, *pairs[a], "left", size), _place(rng, *pairs[b], "right", size)]
    return [_place(rng, *pairs[int(rng.integers(len(pairs)))], "center", size)]


def make_sample(seed: int, index: int, *, pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS, size: int = 64,
                p_two: float = 0.5) -> tuple[Image.Image, dict]:
    """Sample `index` of the set made from `seed`: (image, ground truth)."""
    rng = np.random.default_rng([seed, index])
    objects = sample_objects(rng, pairs, size, p_two)
    truth = {"caption": caption(objects), "objects": objects, "size": size, "aes_score": AES_SCORE,
             "seed": seed, "index": index}
    return render(objects, size), truth


def iter_samples(num: int, seed: int = 0, *, start: int = 0, **kwargs) -> Iterator[tuple[Image.Image, dict]]:
    """Samples start..start+num-1 of the set made from `seed` (kwargs: see make_sample)."""
    for i in range(start, start + num):
        yield make_sample(seed, i, **kwargs)


# ---------------------------------------------------------------------------------------
# Webdataset shards

def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=False)
    else:
        im.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def write_shards(out_dir: str | os.PathLike, num: int, seed: int = 0, *, shard_size: int = 1000,
                 image_format: str = "png", prefix: str = "shapes", pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS,
                 size: int = 64, p_two: float = 0.5, progress=None) -> list[Path]:
    """Write `num` samples as webdataset shards `<prefix>-000000.tar`, ... in `out_dir`.

    Each sample: `png` (or `jpg`), `txt` (the caption), `json` (the ground truth: caption,
    objects with colour, shape, position, size, centre, bbox; aes_score). Same arguments,
    same bytes. `progress`: a callable given the number of samples written so far.
    Returns the shard paths.
    """
    import webdataset as wds

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected an int >= 1, got {num!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected an int >= 1, got {shard_size!r}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format: expected 'png' or 'jpg', got {image_format!r}")
    bad = [p for p in pairs if tuple(p) not in ALL_PAIRS]
    if bad or not pairs:
        raise ValueError(f"pairs: expected (color, shape) pairs from {list(COLORS)} x {list(SHAPES)}, got {bad or pairs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for i, (im, truth) in enumerate(iter_samples(num, seed, pairs=pairs, size=size, p_two=p_two)):
            sink.write({"__key__": f"{i:08d}", image_format: _encode(im, image_format), "txt": truth["caption"],
                        "json": json.dumps(truth, sort_keys=True)})
            if progress is not None:
                progress(i + 1)
    return [out / (f"{prefix}-%06d.tar" % k) for k in range((num + shard_size - 1) // shard_size)]


# ---------------------------------------------------------------------------------------
# Test prompts

def test_prompts(split: str, seed: int = 0) -> list[dict]:
    """Prompts with their ground truth, [{"caption", "objects": [{"color", "shape", "position"}]}].

    "seen":     every training pair alone (14), then 14 left/right prompts of training pairs.
    "held_out": every held-out pair alone (4), then 4 left/right prompts each pairing a
                held-out pair (left twice, right twice) with a training pair.
    Deterministic from `seed`.
    """
    if split not in ("seen", "held_out"):
        raise ValueError(f"split: expected 'seen' or 'held_out', got {split!r}")
    rng = np.random.default_rng([seed, 1 if split == "seen" else 2])
    if split == "seen":
        singles = list(TRAIN_PAIRS)
        doubles = [(TRAIN_PAIRS[a], TRAIN_PAIRS[b]) for a, b in rng.integers(len(TRAIN_PAIRS), size=(14, 2))]
    else:
        singles = list(HELD_OUT_PAIRS)
        others = [TRAIN_PAIRS[k] for k in rng.integers(len(TRAIN_PAIRS), size=len(HELD_OUT_PAIRS))]
        doubles = [(h, o) if k % 2 == 0 else (o, h) for k, (h, o) in enumerate(zip(HELD_OUT_PAIRS, others))]
    out = []
    for c, s in singles:
        objects = [{"color": c, "shape": s, "position": "center"}]
        out.append({"caption": caption(objects), "objects": objects})
    for (c1, s1), (c2, s2) in doubles:
        objects = [{"color": c1, "shape": s1, "position": "left"}, {"color": c2, "shape": s2, "position": "right"}]
        out.append({"caption": caption(objects), "objects": objects})
    return out


test_prompts.__test__ = False  # a data helper, not a pytest test
