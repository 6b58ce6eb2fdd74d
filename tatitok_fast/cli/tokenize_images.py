"""`tatitok-fast tokenize INPUT... --tokenizer NAME_OR_PATH -o OUT`: images (folders of
image files with optional same-name .txt captions and .json metadata, or webdataset .tar
shards with a jpg/png/webp image, a txt or json caption and json metadata) -> token shards
for generator training, in the format of `tatitok_fast.token_shards`:

  tokens.npy  .npy with header: VQ ids (N,) int16 (int32 above 32768 codes);
              KL posterior parameters (2C, 1, N) float32, mean then logvar
  txt         caption;  recap_txt: copied from the input shard when it has one
  aes_score   aesthetic score (decimal text): --aes-score, else the input's json field
              `aes_score` (a shard sample's json, or an image's same-name .json). A sample
              with neither is an error (with --skip-bad: skipped and counted): MaskGen is
              micro-conditioned on this score, and a made-up default would teach it a lie.
  json        tokenizer name, mode, num_tokens, token_size, codebook_size, shape, dtype, source
  cls         the class index, copied from the input shard's .cls when it has one

--labels: class-labelled token shards for MaskGIT training (tokens.npy, cls, json, txt when the
image has a caption; no aes_score needed). The class comes from the input shard's .cls
(`tatitok-fast make-shards` writes it) or, for a folder input, from its class sub-folders in
sorted order (as make-shards numbers them); an input without one is an error (--skip-bad:
skipped). The json records the tokenizer's codebook size and token count, and the MaskGIT
recipe refuses shards whose numbers differ from its model's.

--from-jsonl FILE --codebook-size K: the official pretokenization output (scripts/
pretokenization.py: one {"class_id": int, "tokens": [int, ...]} per line) -> the same
class-labelled token shards, without a tokenizer (K: the codebook the ids come from; the
official script uses the MaskGIT-VQGAN: 256 tokens of 1024 codes).

Shards (tokens-NNNNNN.tar) are closed as they fill, so an interrupted run keeps every
finished shard.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from tatitok_fast.cli.common import CommandError, add_runtime_arguments, load_tokenizer, run_command, runtime
from tatitok_fast.compile import add_compile_arguments, compile_if_asked

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="turn images into token shards for generator training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image folders/files, or webdataset shards (e.g. 'data-{000..009}.tar')")
    p.add_argument("--tokenizer", default=None, help="preset name (TA-TiTok, TiTok, maskgit_vqgan), Hub repo id "
                                                     "or checkpoint directory (required unless --from-jsonl)")
    p.add_argument("--labels", action="store_true",
                   help="class-labelled shards for MaskGIT (class from the input's .cls or its class folder)")
    p.add_argument("--from-jsonl", default=None, metavar="FILE",
                   help="convert the official pretokenized jsonl ({class_id, tokens} per line) instead of images")
    p.add_argument("--codebook-size", type=int, default=None, help="--from-jsonl: the codebook size of the ids")
    p.add_argument("-o", "--output", required=True, help="output folder for tokens-NNNNNN.tar shards")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")
    p.add_argument("--aes-score", type=float, default=None,
                   help="aesthetic score written for every sample (default: each input's json aes_score)")
    p.add_argument("--expect-mode", choices=("vq", "vae"), default=None, help="fail unless the tokenizer is this kind")
    p.add_argument("--expect-num-tokens", type=int, default=None, help="fail unless it makes this many tokens")
    p.add_argument("--expect-codebook-size", type=int, default=None, help="VQ: fail unless the codebook has K codes")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images and samples without an aes_score instead of stopping")
    add_runtime_arguments(p)
    add_compile_arguments(p)
    p.set_defaults(func=run_command(tokenize))


# ---- inputs ------------------------------------------------------------------------------

class Source(NamedTuple):
    key: str  # where the image came from
    image: Any  # a Path or a named BytesIO
    caption: str
    aes_score: Any  # the input's json aes_score (unchecked) or None
    recap: str | None
    label: Any = None  # the input's class (.cls bytes or an int) or None


def _read_json(data: bytes | str, where: str) -> dict:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CommandError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _folder_samples(files: list[Path], labels: dict[Path, int] | None = None) -> Iterator[Source]:
    for f in files:
        side, meta_file = f.with_suffix(".txt"), f.with_suffix(".json")
        meta = _read_json(meta_file.read_bytes(), str(meta_file)) if meta_file.is_file() else {}
        caption = side.read_text(encoding="utf-8").strip() if side.is_file() else str(meta.get("caption", ""))
        yield Source(str(f), f, caption, meta.get("aes_score"), None, (labels or {}).get(f))


def _folder_labels(inputs: list[str]) -> tuple[list[Path], dict[Path, int]]:
    """--labels on a class folder: its images and their classes, numbered as make-shards does."""
    from tatitok_fast.cli.make_shards import scan

    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        raise CommandError("--labels with image folders: give one class folder (ImageNet-style train/), "
                           "or its make-shards shards")
    root = Path(inputs[0])
    classes, items = scan(root, "folders")
    return [root / rel for rel, _ in items], {root / rel: c for rel, c in items}


def _shard_samples(patterns: list[str]) -> Iterator[Source]:
    import webdataset as wds

    urls = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
    for url in urls:
        if not Path(url).is_file() and "://" not in url:
            raise CommandError(f"webdataset shard not found: {url}")
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__')}:{key}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise CommandError(f"sample {key} in {sample.get('__url__')} has no image ({'/'.join(IMAGE_KEYS)})")
        meta = _read_json(sample["json"], f"{where}.json") if "json" in sample else {}
        caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else str(meta.get("caption",
                                                                                              meta.get("text", "")))
        aes = meta.get("aes_score", sample.get("aes_score"))
        recap = sample["recap_txt"].decode("utf-8") if "recap_txt" in sample else None
        data = io.BytesIO(sample[image_key])
        data.name = f"{where}.{image_key}"
        yield Source(data.name, data, caption, aes, recap, sample.get("cls"))


def _is_shard(path: str) -> bool:
    return path.endswith(".tar") or "{" in path or path.startswith(("http://", "https://", "pipe:"))


def _aes_score(src: Source) -> float | None:
    """The input's score as a finite float, None when it has none; CommandError when malformed."""
    if src.aes_score is None:
        return None
    value = src.aes_score.decode("utf-8") if isinstance(src.aes_score, bytes) else src.aes_score
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score):
        raise CommandError(f"{src.key}: aes_score: expected a finite number, got {value!r}")
    return score


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
    """(B, 3, S, S) -> per-sample arrays: VQ ids (B, N) int64 or KL parameters (B, 2C, 1, N) float32."""
    if tokenizer.quantize_mode == "vq":
        ids = tokenizer.tokenize(x)  # (B, 1, N); the MaskGIT-VQGAN: (B, N)
        return ids.reshape(ids.shape[0], -1).cpu().numpy()
    z = tokenizer.encoder(x, tokenizer.latent_tokens)  # (B, 2C, 1, N) posterior parameters
    return z.float().cpu().numpy()


def _check_args(args: argparse.Namespace, inputs_are_shards: bool) -> list[Path]:
    """Checks made before the tokenizer is loaded; returns the image files of folder inputs."""
    if not args.inputs:
        raise CommandError("inputs: expected image folders/files or webdataset shards (or --from-jsonl FILE)")
    if args.tokenizer is None:
        raise CommandError("--tokenizer: required (a preset, Hub repo id or checkpoint directory)")
    if args.shard_size < 1:
        raise CommandError(f"--shard-size: expected >= 1, got {args.shard_size}")
    if args.aes_score is not None and not math.isfinite(args.aes_score):
        raise CommandError(f"--aes-score: expected a finite number, got {args.aes_score}")
    if inputs_are_shards or args.labels:
        return []
    from tatitok_fast.images import list_image_files

    try:
        files = list_image_files(args.inputs)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    if args.aes_score is None and not args.skip_bad:
        missing = [f for f in files if not f.with_suffix(".json").is_file()]
        if missing:
            raise CommandError(f"{missing[0]} (and {len(missing) - 1} more images) has no same-name .json with an "
                               "aes_score: pass --aes-score FLOAT to give every sample that score")
    return files


def _label(src: Source) -> int | None:
    """The input's class index, None when it has none; CommandError when malformed."""
    from tatitok_fast.token_shards import CorruptSampleError, parse_class_label

    if src.label is None:
        return None
    try:
        return parse_class_label(src.label, src.key)
    except CorruptSampleError as exc:
        raise CommandError(str(exc)) from None


def tokenize(args: argparse.Namespace) -> int:
    import webdataset as wds

    from tatitok_fast.images import load_images
    from tatitok_fast.token_shards import encode_class_token_sample, encode_token_sample, shard_metadata

    if args.from_jsonl is not None:
        return tokenize_jsonl(args)
    device, dtype = runtime(args)
    shards = [p for p in args.inputs if _is_shard(p)]
    if shards and len(shards) != len(args.inputs):
        raise CommandError("inputs: give either webdataset shards or image folders/files, not both")
    files = _check_args(args, bool(shards))
    labels = None
    if args.labels and not shards:
        files, labels = _folder_labels(args.inputs)
    tokenizer = load_tokenizer(args, device, dtype)
    _check_expectations(args, tokenizer)
    compile_if_asked(args, tokenizer, "--tokenizer", CommandError)  # in place
    if args.labels and tokenizer.quantize_mode != "vq":
        raise CommandError(f"--labels: class-labelled shards hold VQ ids; --tokenizer {args.tokenizer} makes "
                           f"{tokenizer.quantize_mode} tokens")
    samples = _shard_samples(shards) if shards else _folder_samples(files, labels)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = shard_metadata(tokenizer=args.tokenizer, mode=tokenizer.quantize_mode,
                          num_tokens=tokenizer.num_latent_tokens, token_size=tokenizer.token_size,
                          codebook_size=tokenizer.codebook_size if tokenizer.quantize_mode == "vq" else None,
                          image_size=tokenizer.image_size)
    written = unreadable = no_score = no_label = 0
    bar = tqdm(desc="tokenize", unit="img", disable=not args.progress)

    def flush(batch):
        nonlocal written
        x = torch.stack([b[1] for b in batch]).to(device, dtype)
        with torch.no_grad():
            arrays = _encode(tokenizer, x)
        for (src, _, score), arr in zip(batch, arrays):
            label = _label(src)
            if args.labels:
                sample = encode_class_token_sample(f"{written:09d}", arr, label, meta, text=src.caption or None,
                                                   source=src.key)
            else:
                sample = encode_token_sample(f"{written:09d}", arr, src.caption, score, meta, recap_text=src.recap,
                                             source=src.key)
                if label is not None:
                    sample["cls"] = str(label)  # carried through
            sink.write(sample)
            written += 1
        bar.update(len(batch))

    with wds.ShardWriter(str(out_dir / "tokens-%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
        batch = []
        for src in samples:
            if args.labels:
                score = 0.0
                if _label(src) is None:
                    if not args.skip_bad:
                        raise CommandError(f"{src.key} has no class label (.cls): --labels needs class-labelled "
                                           "inputs (make-shards of a class folder), or --skip-bad")
                    no_label += 1
                    continue
            else:
                score = args.aes_score if args.aes_score is not None else _aes_score(src)
            if score is None:
                if not args.skip_bad:
                    raise CommandError(f"{src.key} has no aes_score in its json: pass --aes-score FLOAT "
                                       "(or --skip-bad to skip such samples)")
                no_score += 1
                continue
            try:
                x = load_images(src.image if not isinstance(src.image, Path) else str(src.image),
                                tokenizer.image_size)[0]
            except (ValueError, TypeError, FileNotFoundError) as exc:
                if not args.skip_bad:
                    raise CommandError(f"{exc} (use --skip-bad to skip unreadable images)") from None
                unreadable += 1
                continue
            batch.append((src, x, score))
            if len(batch) == args.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    bar.close()
    skipped = [f"{n} {what}" for n, what in ((unreadable, "unreadable"), (no_score, "without aes_score"),
                                             (no_label, "without class label")) if n]
    print(f"wrote {written} samples to {out_dir}" + (f", skipped {', '.join(skipped)}" if skipped else ""))
    return 0


def tokenize_jsonl(args: argparse.Namespace) -> int:
    """--from-jsonl: the official pretokenized jsonl -> class-labelled token shards."""
    import webdataset as wds

    from tatitok_fast.token_shards import encode_class_token_sample, shard_metadata

    path = Path(args.from_jsonl)
    if args.inputs:
        raise CommandError("--from-jsonl: give no image inputs (the jsonl holds the tokens)")
    if args.codebook_size is None or args.codebook_size < 1:
        raise CommandError("--codebook-size: required with --from-jsonl (the codebook the ids come from; the "
                           "official pretokenization's MaskGIT-VQGAN: 1024), expected a positive int")
    if args.shard_size < 1:
        raise CommandError(f"--shard-size: expected >= 1, got {args.shard_size}")
    if not path.is_file():
        raise CommandError(f"--from-jsonl: file not found: {path}")

    def rows() -> Iterator[tuple[int, int, list]]:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CommandError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(row, dict) or "class_id" not in row or "tokens" not in row:
                    raise CommandError(f"{where}: expected {{\"class_id\": int, \"tokens\": [int, ...]}}, got "
                                       f"{line.strip()[:80]!r}")
                c, tokens = row["class_id"], row["tokens"]
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    raise CommandError(f"{where}: class_id: expected an int >= 0, got {c!r}")
                if not isinstance(tokens, list) or not tokens or not all(
                        isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                    raise CommandError(f"{where}: tokens: expected a non-empty list of ints")
                yield n, c, tokens

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, written = None, 0
    bar = tqdm(desc="tokenize", unit="row", disable=not args.progress)
    with wds.ShardWriter(str(out_dir / "tokens-%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
        for n, c, tokens in rows():
            if meta is None:
                meta = shard_metadata(tokenizer=args.tokenizer or f"jsonl:{path.name}", mode="vq",
                                      num_tokens=len(tokens), token_size=1, codebook_size=args.codebook_size)
            if len(tokens) != meta["num_tokens"]:
                raise CommandError(f"{path}:{n}: {len(tokens)} tokens, the first row has {meta['num_tokens']}")
            if min(tokens) < 0 or max(tokens) >= args.codebook_size:
                raise CommandError(f"{path}:{n}: token ids must be in [0, {args.codebook_size}) (--codebook-size), "
                                   f"got [{min(tokens)}, {max(tokens)}]")
            sink.write(encode_class_token_sample(f"{written:09d}", np.asarray(tokens), c, meta,
                                                 source=f"{path.name}:{n}"))
            written += 1
            bar.update(1)
    bar.close()
    if not written:
        raise CommandError(f"--from-jsonl {path}: no rows")
    print(f"wrote {written} samples to {out_dir} ({meta['num_tokens']} tokens of {args.codebook_size} codes each)")
    return 0
