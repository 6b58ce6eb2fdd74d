"""Images in and out: PIL images, uint8/float tensors, numpy arrays and file paths become
(B, 3, S, S) float tensors in [0, 1] (shorter side resized to S, bicubic + antialias, then
centre-cropped); generated tensors become PNG files and image grids."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def open_rgb(path) -> Image.Image:
    """Open an image file (path or binary file object) as RGB (grey, palette, alpha and CMYK
    images are converted)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):  # composite transparency over white
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "<bytes>")
        raise ValueError(f"could not read image {name}: {exc}") from exc


def _to_chw_float(item) -> torch.Tensor:
    """One image -> (3, H, W) float in [0, 1]."""
    if isinstance(item, (str, os.PathLike, io.IOBase)):
        item = open_rgb(item)
    if isinstance(item, Image.Image):
        if item.mode != "RGB":
            item = item.convert("RGB")
        item = np.asarray(item)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"images: expected an (H, W, 3) array, got shape {item.shape}")
        t = torch.from_numpy(np.array(item, copy=True)).permute(2, 0, 1)  # writable copy
    elif isinstance(item, torch.Tensor):
        t = item
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"images: expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    else:
        raise TypeError(f"images: expected PIL images, tensors, arrays or file paths, got {type(item).__name__}")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise TypeError(f"images: expected uint8 or float images, got {t.dtype}")
    return t.float()


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): shorter side to `size` (bicubic, antialiased), centre crop."""
    _, h, w = x.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top:top + size, left:left + size]
    return x.clamp(0.0, 1.0)


def load_images(images, size: int) -> torch.Tensor:
    """One or many images (see module doc) -> (B, 3, size, size) float32 in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items: Sequence = list(images)
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    if len(items) == 0:
        raise ValueError("images: expected at least one image, got none")
    return torch.stack([resize_center_crop(_to_chw_float(it), size) for it in items])


def list_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the image files they hold (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [0, 1] -> PIL images (values clamped, rounded)."""
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images into one image (white padding)."""
    if not images:
        raise ValueError("images: nothing to put in a grid")
    w, h = images[0].size
    ncols = ncols or int(np.ceil(np.sqrt(len(images))))
    nrows = int(np.ceil(len(images) / ncols))
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def interleave_rows(originals: Sequence[Image.Image], reconstructions: Sequence[Image.Image],
                    ncols: int = 8) -> tuple[list[Image.Image], int]:
    """Cells for make_grid: rows of up to `ncols` originals, each row followed by the row of
    their reconstructions (short last rows padded white). Returns (cells, ncols)."""
    ncols = min(ncols, len(originals))
    blank = Image.new("RGB", originals[0].size, (255, 255, 255))
    cells: list[Image.Image] = []
    for j in range(0, len(originals), ncols):
        pad = [blank] * (ncols - len(originals[j:j + ncols]))
        cells += list(originals[j:j + ncols]) + pad + list(reconstructions[j:j + ncols]) + pad
    return cells, ncols



def save_numbered(images: Sequence[Image.Image], out_dir: str | os.PathLike, names: Sequence[str],
                  start: int = 0) -> list[Path]:
    """Write images as out_dir/{start+i:05d}_{names[i]}.png (the generate commands' naming)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{start + i:05d}_{name}.png" for i, name in enumerate(names)]
    for im, path in zip(images, paths):
        im.save(path)
    return paths


def save_grid(images: Sequence[Image.Image], path: str | os.PathLike, max_cols: int = 8) -> Path:
    """make_grid with up to `max_cols` columns, saved to `path`."""
    make_grid(images, ncols=min(max_cols, len(images))).save(path)
    return Path(path)


def save_images_and_grid(images: torch.Tensor, out_dir: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """(B, 3, H, W) in [0, 1] -> numbered PNGs (save_numbered) plus out_dir/grid.png."""
    pils = to_pil(images)
    paths = save_numbered(pils, out_dir, names)
    save_grid(pils, Path(out_dir) / "grid.png")
    return paths
