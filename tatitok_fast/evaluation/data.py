"""Evaluation inputs: image folders (optional same-name .txt captions) or webdataset .tar
shards (jpg/jpeg/png/webp image, caption from txt or json["caption"/"text"]), read in order,
as batches of (B, 3, S, S) float images in [0, 1] (shorter side resized to S, centre crop)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class ImageBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) float32 in [0, 1]
    captions: list[str]
    keys: list[str]


def is_shard(path: str) -> bool:
    return path.endswith(".tar") or "{" in path or path.startswith(("http://", "https://", "pipe:"))


def check_inputs(inputs: Sequence[str], what: str = "inputs") -> tuple[list[str], list[Path]]:
    """(shard URLs, image files): every input exists, and they are all shards or all files/folders;
    folders are expanded. ValueError names the bad input."""
    from tatitok_fast.images import list_image_files

    if not inputs:
        raise ValueError(f"{what}: expected image folders/files or webdataset shards, got none")
    shards = [p for p in inputs if is_shard(str(p))]
    if shards and len(shards) != len(inputs):
        raise ValueError(f"{what}: give either webdataset shards or image folders/files, not both")
    if shards:
        import webdataset as wds

        urls = [u for p in shards for u in wds.shardlists.expand_urls(str(p))]
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:
            raise ValueError(f"{what}: webdataset shard not found: {missing[0]}")
        return urls, []
    try:
        files = list_image_files(inputs)
    except FileNotFoundError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if not files:
        raise ValueError(f"{what}: no image files in {list(inputs)}")
    return [], files


def _folder_items(files: list[Path]) -> Iterator[tuple[str, object, str]]:
    for f in files:
        side = f.with_suffix(".txt")
        yield str(f), str(f), side.read_text(encoding="utf-8").strip() if side.is_file() else ""


def _shard_items(urls: list[str]) -> Iterator[tuple[str, object, str]]:
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        where = f"{sample.get('__url__')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"{where}: sample has no image ({'/'.join(IMAGE_KEYS)})")
        caption = ""
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8").strip()
        elif "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where}.json: not valid JSON ({exc})") from None
            caption = str(meta.get("caption", meta.get("text", ""))) if isinstance(meta, dict) else ""
        data = io.BytesIO(sample[image_key])
        data.name = f"{where}.{image_key}"
        yield data.name, data, caption


def image_batches(inputs: Sequence[str], size: int, batch_size: int,
                  max_images: int | None = None) -> Iterator[ImageBatch]:
    """Batches of the inputs' images at size x size (see the module doc), at most max_images."""
    from tatitok_fast.images import load_images

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    urls, files = check_inputs(inputs)
    items = _shard_items(urls) if urls else _folder_items(files)
    batch: list[tuple[str, object, str]] = []
    seen = 0
    for item in items:
        if max_images is not None and seen >= max_images:
            break
        batch.append(item)
        seen += 1
        if len(batch) == batch_size:
            yield ImageBatch(load_images([b[1] for b in batch], size), [b[2] for b in batch], [b[0] for b in batch])
            batch = []
    if batch:
        yield ImageBatch(load_images([b[1] for b in batch], size), [b[2] for b in batch], [b[0] for b in batch])
