"""A non-learned detector for the demo's shapes, and prompt-adherence scores.

detect(image) finds the coloured objects on a white background:
  1. foreground = pixels whose darkest channel is below 255 - FOREGROUND (not white, not a
     pale blend with white), cleaned by a 3x3 opening (thin JPEG / blur fringes, speckle
     noise) and hole filling;
  2. connected components (4-connected) of at least MIN_AREA pixels (at 64 px, scaled
     with the image area) and at most MAX_EXTENT of the image's width and height (the
     largest demo shape spans 34/64: anything larger is a non-white background);
  3. colour: median colour of the component's eroded core, nearest palette colour by the
     distance to the segment white -> palette colour (a colour blended with white is still
     that colour);
  4. shape: nearest prototype in (fill ratio of the bounding box, mean fill of its four
     corner blocks): square ~ (1.0, 1.0), circle ~ (0.79, 0.2), triangle ~ (0.5, 0.4);
  5. position: left / right of the image centre by the component's centroid.

score(images, truths) matches every object a prompt names with one detection: for a
one-object prompt the largest detection anywhere, for a left/right prompt the largest
detection whose centroid is on that side. An object counts for colour accuracy when its
match has its colour, for shape accuracy when its match has its shape (no match: wrong
on both). Accuracies are over prompt objects; count accuracy is over images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tatitok_fast.demo.shapes import COLORS, SHAPES, parse_caption

__all__ = ["detect", "score", "SHAPE_PROTOTYPES"]

FOREGROUND = 80  # darkest channel must be below 255 - FOREGROUND
MIN_AREA = 30  # pixels at 64 x 64 (the smallest demo shape has ~100)
MAX_EXTENT = 0.8  # a component wider or taller than this fraction of the image is background, not a shape
# (fill ratio, mean corner-block fill) of each shape, measured on exact renders
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {"circle": (0.79, 0.21), "square": (1.0, 1.0),
                                                    "triangle": (0.52, 0.39)}
_WHITE = np.array([255.0, 255.0, 255.0])
_PALETTE = np.array([COLORS[c] for c in COLORS], dtype=np.float64)  # (C, 3)
_NAMES = list(COLORS)


def require_scipy():
    """scipy.ndimage, or an ImportError saying how to get it (scipy is in the test/eval extras)."""
    try:
        from scipy import ndimage
    except ImportError as exc:
        raise ImportError("the demo's detector needs scipy: pip install scipy") from exc
    return ndimage


def _as_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1] -> (H, W, 3) float64."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch tensor
        t = image.detach().float().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"images: expected (3, H, W) tensors, got shape {tuple(t.shape)}")
        return (t.clamp(0, 1) * 255.0).round().permute(1, 2, 0).numpy().astype(np.float64)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images: expected (H, W, 3) arrays, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 arrays (0..255), got {image.dtype}")
        return image.astype(np.float64)
    raise TypeError(f"images: expected PIL images, (H, W, 3) uint8 arrays or (3, H, W) tensors, "
                    f"got {type(image).__name__}")


def classify_color(rgb: np.ndarray) -> str:
    """Nearest palette colour of one RGB value, by distance to each segment white -> colour."""
    d = _PALETTE - _WHITE  # (C, 3)
    t = np.clip(((rgb - _WHITE) @ d.T) / (d * d).sum(1), 0.0, 1.0)  # (C,)
    residual = np.linalg.norm(rgb - (_WHITE + t[:, None] * d), axis=1)
    return _NAMES[int(residual.argmin())]


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, mean fill of the four corner blocks, each a quarter of
    the box's width and height) of a boolean mask cropped to its bounding box."""
    h, w = mask.shape
    bh, bw = max(1, h // 4), max(1, w // 4)
    corners = [mask[:bh, :bw], mask[:bh, -bw:], mask[-bh:, :bw], mask[-bh:, -bw:]]
    return float(mask.mean()), float(np.mean([c.mean() for c in corners]))


def classify_shape(mask: np.ndarray) -> str:
    fill, corner = shape_features(mask)
    return min(SHAPES, key=lambda s: (fill - SHAPE_PROTOTYPES[s][0]) ** 2 + (corner - SHAPE_PROTOTYPES[s][1]) ** 2)


def _half_level_mask(nd, deficit: np.ndarray, comp: np.ndarray, inside: float) -> np.ndarray:
    """The object's outline at half its contrast with white (where a blurred edge really is),
    near the component `comp`; falls back to `comp` when that level gives nothing."""
    near = nd.binary_dilation(comp, structure=np.ones((3, 3), bool), iterations=2)
    mask = nd.binary_fill_holes(near & (deficit >= 0.5 * inside))
    labels, n = nd.label(mask)
    if n == 0:
        return comp
    sizes = nd.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def detect(image) -> list[dict]:
    """Objects in one image, largest first: [{"color", "shape", "position" ("left"/"right"),
    "bbox" [x0, y0, x1, y1] inclusive, "center" [x, y], "area"}]."""
    nd = require_scipy()
    rgb = _as_array(image)
    h, w = rgb.shape[:2]
    deficit = 255.0 - rgb.min(axis=2)  # 0 on white, ~200+ inside a palette colour
    fg = deficit > FOREGROUND
    fg = nd.binary_fill_holes(nd.binary_opening(fg, structure=np.ones((3, 3), bool)))
    labels, n = nd.label(fg)
    min_area = MIN_AREA * h * w / (64 * 64)
    out = []
    for k, sl in enumerate(nd.find_objects(labels), start=1):
        comp = labels[sl] == k
        area = int(comp.sum())
        if area < min_area or comp.shape[0] > MAX_EXTENT * h or comp.shape[1] > MAX_EXTENT * w:
            continue
        core = nd.binary_erosion(comp, structure=np.ones((3, 3), bool))
        pick = core if core.sum() >= 0.2 * area else comp
        color = classify_color(np.median(rgb[sl][pick], axis=0))
        shape_mask = _half_level_mask(nd, deficit, labels == k, float(np.median(deficit[sl][pick])))
        ys, xs = np.nonzero(shape_mask)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        cx, cy = float(xs.mean()), float(ys.mean())
        out.append({"color": color, "shape": classify_shape(shape_mask[y0:y1 + 1, x0:x1 + 1]),
                    "position": "left" if cx < w / 2 else "right", "bbox": [int(x0), int(y0), int(x1), int(y1)],
                    "center": [cx, cy], "area": area})
    out.sort(key=lambda d: -d["area"])
    return out


# ---------------------------------------------------------------------------------------
# Scores

def _objects(truth) -> list[dict]:
    """A caption, a {"objects": [...]} / {"caption": ...} dict or a list of objects -> objects."""
    if isinstance(truth, str):
        return parse_caption(truth)
    if isinstance(truth, dict):
        if "objects" in truth:
            return list(truth["objects"])
        if "caption" in truth:
            return parse_caption(truth["caption"])
    if isinstance(truth, (list, tuple)) and truth and all(isinstance(o, dict) for o in truth):
        return list(truth)
    raise TypeError(f"truths: expected captions, dicts with 'objects' or 'caption', or lists of objects; "
                    f"got {type(truth).__name__}")


def match(detections: list[dict], objects: list[dict]) -> list[dict | None]:
    """For each prompt object, its detection (see the module doc) or None."""
    if len(objects) == 1:
        return [detections[0] if detections else None]
    out = []
    for o in objects:
        side = [d for d in detections if d["position"] == o["position"]]
        out.append(side[0] if side else None)  # detections are sorted largest first
    return out


def _images_list(images) -> list:
    if hasattr(images, "detach") and images.dim() == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"images: expected a list of images or a (B, 3, H, W) tensor, got {type(images).__name__}")


def score(images, truths: Sequence, *, details: bool = False) -> dict:
    """Prompt adherence of `images` to `truths` (one per image: caption, ground-truth dict or
    object list). Returns {"color_acc", "shape_acc", "object_acc" (colour and shape both
    right), "count_acc" (as many detections as prompt objects), "num_images", "num_objects"}
    and, with details=True, "per_image": [{"caption"?, "detections", "matched"}]."""
    images = _images_list(images)
    truths = list(truths)
    if len(images) != len(truths):
        raise ValueError(f"truths: expected one per image ({len(images)}), got {len(truths)}")
    if not images:
        raise ValueError("images: expected at least one image")
    color = shape = both = count = n_obj = 0
    per_image = []
    for image, truth in zip(images, truths):
        objects = _objects(truth)
        dets = detect(image)
        matched = match(dets, objects)
        for o, d in zip(objects, matched):
            ok_c = d is not None and d["color"] == o["color"]
            ok_s = d is not None and d["shape"] == o["shape"]
            color, shape, both = color + ok_c, shape + ok_s, both + (ok_c and ok_s)
        n_obj += len(objects)
        count += len(dets) == len(objects)
        if details:
            per_image.append({"objects": objects, "detections": dets, "matched": matched})
    out = {"color_acc": color / n_obj, "shape_acc": shape / n_obj, "object_acc": both / n_obj,
           "count_acc": count / len(images), "num_images": len(images), "num_objects": n_obj}
    if details:
        out["per_image"] = per_image
    return out
