"""`tatitok-fast reconstruct IMAGE... --tokenizer NAME_OR_PATH -o OUT`: images -> tokens ->
images, written as <name>_recon.png beside a side-by-side grid (originals over
reconstructions). The tokenizer: a TA-TiTok or TiTok preset, Hub repo id or checkpoint folder,
or maskgit_vqgan (the MaskGIT-VQGAN). Only TA-TiTok reads captions (its text guidance)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from tatitok_fast.cli.common import (CommandError, add_runtime_arguments, add_text_encoder_arguments, load_text_encoder,
                                     load_tokenizer, run_command, runtime)
from tatitok_fast.compile import add_compile_arguments, compile_if_asked


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconstruct", help="reconstruct images through a TA-TiTok / TiTok / MaskGIT-VQGAN "
                              "tokenizer", description=__doc__)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--tokenizer", required=True, help="preset name (TA-TiTok, TiTok, maskgit_vqgan), Hub repo id "
                                                       "or checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--caption", default=None, help="TA-TiTok: text guidance for every image (default: a .txt file "
                                                     "beside each image with the same name, else empty)")
    p.add_argument("--sample", action="store_true", help="KL tokenizers: decode a posterior sample, not its mean")
    add_runtime_arguments(p)
    add_compile_arguments(p)
    add_text_encoder_arguments(p)
    p.set_defaults(func=run_command(reconstruct))


def _captions(files: list[Path], caption: str | None) -> list[str]:
    if caption is not None:
        return [caption] * len(files)
    out = []
    for f in files:
        side = f.with_suffix(".txt")
        out.append(side.read_text(encoding="utf-8").strip() if side.is_file() else "")
    return out


def reconstruct(args: argparse.Namespace) -> int:
    from tatitok_fast.images import interleave_rows, list_image_files, load_images, make_grid, to_pil

    device, dtype = runtime(args)
    try:
        files = list_image_files(args.images)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    if not files:
        raise CommandError(f"no image files found in {args.images}")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = compile_if_asked(args, load_tokenizer(args, device, dtype), "--tokenizer", CommandError)
    from tatitok_fast import TATiTok

    text_path = isinstance(tokenizer, TATiTok)  # TiTok and the MaskGIT-VQGAN decode without captions
    text_encoder = load_text_encoder(args, device, [("--tokenizer", tokenizer.config)]) if text_path else None
    captions = _captions(files, args.caption) if text_path else [""] * len(files)
    torch.manual_seed(args.seed)
    originals, recons = [], []
    for i in tqdm(range(0, len(files), args.batch_size), desc="reconstruct", unit="batch", disable=not args.progress):
        batch = files[i:i + args.batch_size]
        try:
            x = load_images(batch, tokenizer.image_size)
        except (ValueError, TypeError) as exc:
            raise CommandError(str(exc)) from None
        tokens = tokenizer.tokenize(x, sample=args.sample)
        images = tokenizer.detokenize(tokens, captions[i:i + args.batch_size], text_encoder=text_encoder)
        for f, orig, rec in zip(batch, to_pil(x), to_pil(images)):
            rec.save(out_dir / f"{f.stem}_recon.png")
            originals.append(orig)
            recons.append(rec)
    make_grid(*interleave_rows(originals, recons)).save(out_dir / "grid.png")
    print(f"wrote {len(recons)} reconstructions and grid.png to {out_dir}")
    return 0
