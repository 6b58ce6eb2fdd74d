"""`tatitok-fast tokenize INPUT... --tokenizer NAME_OR_PATH -o OUT`: images (folders of
image files with optional same-name .txt captions, or webdataset .tar shards with a
jpg/png/webp image and a txt or json caption) -> webdataset token shards for generator
training.

Each output sample holds `token.npy` (raw little-endian bytes: VQ ids as int16 (N,); KL
posterior parameters, mean then logvar, as float16 (2C, 1, N): the layout the reference's
pretokenized loader reads), `txt` (the caption) and `json` (tokenizer name, mode, shape,
dtype, source key). Shards are closed as they fill, so an interrupted run keeps every
finished shard.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from tatitok_fast.cli.common import CommandError, add_runtime_arguments, load_tokenizer, run_command, runtime

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="turn images into token shards for generator training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image folders/files, or webdataset shards (e.g. 'data-{000..009}.tar')")
    p.add_argument("--tokenizer", required=True, help="preset name, Hub repo id or checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output folder for tokens-NNNNNN.tar shards")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")
    p.add_argument("--expect-mode", choices=("vq", "vae"), default=None, help="fail unless the tokenizer is this kind")
    p.add_argument("--expect-num-tokens", type=int, default=None, help="fail unless it makes this many tokens")
    p.add_argument("--expect-codebook-size", type=int, default=None, help="VQ: fail unless the codebook has K codes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    add_runtime_arguments(p)
    p.set_defaults(func=run_command(tokenize))


# ---- inputs ------------------------------------------------------------------------------

def _folder_samples(paths: list[str]) -> Iterator[tuple[str, object, str]]:
    from tatitok_fast.images import list_image_files

    for f in list_image_files(paths):
        side = f.with_suffix(".txt")
        yield str(f), f, side.read_text(encoding="utf-8").strip() if side.is_file() else ""


def _shard_samples(patterns: list[str]) -> Iterator[tuple[str, object, str]]:
    import webdataset as wds

    urls = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
    for url in urls:
        if not Path(url).is_file() and "://" not in url:
            raise CommandError(f"webdataset shard not found: {url}")
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample.get("__key__", "?")
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise CommandError(f"sample {key} in {sample.get('__url__')} has no image ({'/'.join(IMAGE_KEYS)})")
        caption = ""
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8").strip()
        elif "json" in sample:
            meta = json.loads(sample["json"])
            caption = str(meta.get("caption", meta.get("text", "")))
        data = io.BytesIO(sample[image_key])
        data.name = f"{sample.get('__url__')}:{key}.{image_key}"
        yield data.name, data, caption


def _is_shard(path: str) -> bool:
    return path.endswith(".tar") or "{" in path or path.startswith(("http://", "https://", "pipe:"))


# ---- the command -------------------------------------------------------------------------

def _check_expectations(args, tokenizer) -> None:
    if args.expect_mode and tokenizer.quantize_mode != args.expect_mode:
        raise CommandError(f"--tokenizer {args.tokenizer} makes {tokenizer.quantize_mode} tokens, "
                           f"--expect-mode asks for {args.expect_mode}")
    if args.expect_num_tokens and tokenizer.num_latent_tokens != args.expect_num_tokens:
        raise CommandError(f"--tokenizer {args.tokenizer} makes {tokenizer.num_latent_tokens} tokens per image, "
                           f"--expect-num-tokens asks for {args.expect_num_tokens}")
    if args.expect_codebook_size and tokenizer.codebook_size != args.expect_codebook_size:
        raise CommandError(f"--tokenizer {args.tokenizer} has codebook size {tokenizer.codebook_size}, "
                           f"--expect-codebook-size asks for {args.expect_codebook_size}")


def _encode(tokenizer, x: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) -> per-sample token arrays: int16 ids (B, N) or float16 params (B, 2C, 1, N)."""
    if tokenizer.quantize_mode == "vq":
        ids = tokenizer.tokenize(x)  # (B, 1, N)
        return ids.reshape(ids.shape[0], -1).to(torch.int16).cpu().numpy()
    z = tokenizer.encoder(x, tokenizer.latent_tokens)  # (B, 2C, 1, N) posterior parameters
    return z.float().to(torch.float16).cpu().numpy()


def tokenize(args: argparse.Namespace) -> int:
    import webdataset as wds

    from tatitok_fast.images import load_images

    device, dtype = runtime(args)
    if args.shard_size < 1:
        raise CommandError(f"--shard-size: expected >= 1, got {args.shard_size}")
    shards = [p for p in args.inputs if _is_shard(p)]
    if shards and len(shards) != len(args.inputs):
        raise CommandError("inputs: give either webdataset shards or image folders/files, not both")
    tokenizer = load_tokenizer(args, device, dtype)
    _check_expectations(args, tokenizer)
    samples = _shard_samples(shards) if shards else _folder_samples(args.inputs)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": args.tokenizer, "quantize_mode": tokenizer.quantize_mode,
            "num_latent_tokens": tokenizer.num_latent_tokens, "token_size": tokenizer.token_size,
            "codebook_size": tokenizer.codebook_size, "image_size": tokenizer.image_size,
            "dtype": "int16" if tokenizer.quantize_mode == "vq" else "float16"}
    written = skipped = 0
    bar = tqdm(desc="tokenize", unit="img", disable=not args.progress)

    def flush(batch):
        nonlocal written
        x = torch.stack([b[1] for b in batch]).to(device, dtype)
        with torch.no_grad():
            arrays = _encode(tokenizer, x)
        for (key, _, caption), arr in zip(batch, arrays):
            sink.write({"__key__": f"{written:09d}", "token.npy": np.ascontiguousarray(arr).tobytes(),
                        "txt": caption, "json": json.dumps({**meta, "shape": list(arr.shape), "source": key})})
            written += 1
        bar.update(len(batch))

    with wds.ShardWriter(str(out_dir / "tokens-%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
        batch = []
        for key, image, caption in samples:
            try:
                x = load_images(image if not isinstance(image, Path) else str(image), tokenizer.image_size)[0]
            except (ValueError, TypeError, FileNotFoundError) as exc:
                if not args.skip_bad:
                    raise CommandError(f"{exc} (use --skip-bad to skip unreadable images)") from None
                skipped += 1
                continue
            batch.append((key, x, caption))
            if len(batch) == args.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    bar.close()
    print(f"wrote {written} samples to {out_dir}" + (f", skipped {skipped} unreadable" if skipped else ""))
    return 0
