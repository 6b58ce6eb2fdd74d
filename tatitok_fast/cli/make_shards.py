"""`tatitok-fast make-shards SRC -o DIR`: an image folder -> webdataset shards for training.

SRC is either an ImageNet-style class folder (train/n01440764/*.JPEG: every sub-folder is a
class, indexed in sorted name order as torchvision's ImageFolder does; the mapping is written
to DIR/classes.json) or any image folder (no labels). Each sample of DIR/shard-NNNNNN.tar holds

  jpg   the image: JPEG files copied byte for byte, other formats re-encoded (RGB, quality 95)
  cls   the class index, decimal text (class folders only)
  txt   the caption, when a same-name .txt sits beside the image
  json  {"source": the image's path relative to SRC}

Keys are the image's index in the sorted listing (000000000, ...), shard k holds images
[k * shard_size, (k + 1) * shard_size). The tokenizer recipes read these shards (shorter edge
resized, random crop, flip, as the official preprocessing); `tatitok-fast tokenize --labels`
turns them into class-labelled token shards for MaskGIT.

Resumable: a shard is written to a temporary name and renamed when complete; a rerun skips the
finished shards (never rewritten) and redoes the partial ones. DIR/make_shards.json records
the listing; a rerun over a changed SRC is refused. Parallel: --workers N processes on this
machine, and/or --part-index I --num-parts P to split the shards over machines (part I writes
the shards k with k % P == I; all parts may share DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from tatitok_fast.cli.common import CommandError

FORMAT = "tatitok_fast.image_shards"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST, CLASSES = "make_shards.json", "classes.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-shards", help="turn an image folder (ImageNet-style class folders or any "
                              "images) into webdataset shards", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image folder: class sub-folders (ImageNet train/) or any images")
    p.add_argument("-o", "--output", required=True, help="output folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                   help="folders: sub-folders of SRC are classes; none: no .cls; auto (default): folders when "
                        "SRC holds sub-folders and no image of its own")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--part-index", type=int, default=0, help="this part of a split over machines (0-based)")
    p.add_argument("--num-parts", type=int, default=1, help="number of parts the shards are split into")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=make_shards)


# ---- listing ------------------------------------------------------------------------------

def _images_under(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def scan(src: Path, labels: str) -> tuple[list[str] | None, list[tuple[str, int | None]]]:
    """-> (class names in index order or None, [(path relative to src, class index or None)])."""
    if not src.is_dir():
        raise CommandError(f"SRC: {src} is not a folder")
    subdirs = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = [f for f in src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if labels == "auto":
        labels = "folders" if subdirs and not top else "none"
    if labels == "none":
        items = [(f.relative_to(src).as_posix(), None) for f in _images_under(src)]
        classes = None
    else:
        if top:
            raise CommandError(f"SRC {src}: --labels folders, but {len(top)} images sit outside the class folders "
                               f"(e.g. {top[0].name}); use --labels none or move them into a class folder")
        if not subdirs:
            raise CommandError(f"SRC {src}: --labels folders, but it has no sub-folder (class)")
        items, classes = [], subdirs
        for idx, name in enumerate(subdirs):
            items += [(f.relative_to(src).as_posix(), idx) for f in _images_under(src / name)]
    if not items:
        raise CommandError(f"SRC {src}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return classes, items


def _manifest(src: Path, classes, items, shard_size: int) -> dict:
    digest = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in items).encode()).hexdigest()
    return {"format": FORMAT, "version": 1, "source": str(src.resolve()), "num_images": len(items),
            "shard_size": shard_size, "num_shards": -(-len(items) // shard_size), "labels": classes is not None,
            "num_classes": len(classes) if classes else 0, "listing_sha256": digest}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _check_manifest(out: Path, want: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        have = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: not valid JSON ({exc}); delete it to start over") from None
    keys = ("num_images", "shard_size", "labels", "num_classes", "listing_sha256")
    diff = [k for k in keys if have.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k} {have.get(k)!r} then, {want[k]!r} now" for k in diff if k != "listing_sha256")
        raise CommandError(f"-o {out}: its shards were started from another listing ({what or 'other files'}); "
                           "finished shards are never rewritten: use a new output folder or delete this one")


# ---- writing ------------------------------------------------------------------------------

def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:06d}.tar"


def _jpeg_bytes(path: Path) -> bytes:
    """The image as JPEG bytes: JPEG files as they are, others re-encoded; ValueError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    if path.suffix.lower() in (".jpg", ".jpeg") and data[:3] == b"\xff\xd8\xff":
        return data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: unreadable image ({exc})") from None
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: tuple) -> tuple[int, int, list[str]]:
    """(src, out, k, [(index, rel, label)]) -> (k, images written, unreadable files). The shard is
    complete on disk (renamed from a temporary name) when this returns."""
    src, out, k, entries = job
    final = shard_path(out, k)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    bad: list[str] = []
    n = 0
    with tarfile.open(tmp, "w") as tar:
        for index, rel, label in entries:
            path = src / rel
            try:
                jpg = _jpeg_bytes(path)
            except (ValueError, OSError) as exc:
                bad.append(str(exc))
                continue
            key = f"{index:09d}"
            _add(tar, f"{key}.jpg", jpg)
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode())
            caption = path.with_suffix(".txt")
            if caption.is_file():
                _add(tar, f"{key}.txt", caption.read_bytes())
            _add(tar, f"{key}.json", json.dumps({"source": rel}).encode())
            n += 1
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return k, n, bad


def _check_args(args) -> None:
    for name, v, lo in (("--shard-size", args.shard_size, 1), ("--workers", args.workers, 1),
                        ("--num-parts", args.num_parts, 1), ("--part-index", args.part_index, 0)):
        if v < lo:
            raise CommandError(f"{name}: expected >= {lo}, got {v}")
    if args.part_index >= args.num_parts:
        raise CommandError(f"--part-index: expected < --num-parts {args.num_parts}, got {args.part_index}")


def make_shards(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    _check_args(args)
    src, out = Path(args.src), Path(args.output)
    classes, items = scan(src, args.labels)
    manifest = _manifest(src, classes, items, args.shard_size)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)
    _write_json(out / MANIFEST, manifest)
    if classes is not None:
        _write_json(out / CLASSES, {name: i for i, name in enumerate(classes)})
    mine = [k for k in range(manifest["num_shards"]) if k % args.num_parts == args.part_index]
    for k in mine:  # partial shards of a killed run of this part: redone below
        for stale in out.glob(f".{shard_path(out, k).name}.*.partial"):
            stale.unlink(missing_ok=True)
    todo = [k for k in mine if not shard_path(out, k).is_file()]
    size = args.shard_size
    jobs = [(src, out, k, [(i, *items[i]) for i in range(k * size, min((k + 1) * size, len(items)))]) for k in todo]
    done_before = sum(min(size, len(items) - k * size) for k in mine if k not in set(todo))
    bar = tqdm(total=sum(min(size, len(items) - k * size) for k in mine), initial=done_before, unit="img",
               desc="make-shards", disable=not args.progress)
    written, bad = 0, []
    if args.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            for job, (k, n, b) in zip(jobs, pool.imap(write_shard, jobs)):
                written, bad = written + n, bad + b
                bar.update(len(job[3]))
    else:
        for job in jobs:
            _, n, b = write_shard(job)
            written, bad = written + n, bad + b
            bar.update(len(job[3]))
    bar.close()
    for line in bad[:5]:
        print(f"warning: skipped {line}")
    labels = f", {len(classes)} classes (mapping in {out / CLASSES})" if classes is not None else ", no labels"
    print(f"wrote {len(jobs)} shards ({written} images) to {out}; {len(mine) - len(jobs)} were already finished"
          f"{labels}" + (f"; skipped {len(bad)} unreadable images" if bad else ""))
    return 0
