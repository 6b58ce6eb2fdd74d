"""`tatitok-fast generate PROMPT... --generator NAME_OR_PATH --tokenizer NAME_OR_PATH -o DIR`:
text -> MaskGen tokens -> TA-TiTok images; one PNG per prompt plus grid.png. The same seed
gives the same images on the same device."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from tqdm import tqdm

from tatitok_fast.cli.common import (CommandError, add_runtime_arguments, add_sampling_arguments,
                                     add_text_encoder_arguments, load_text_encoder,
                                     load_tokenizer, run_command, runtime)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="text-to-image with MaskGen + TA-TiTok", description=__doc__)
    p.add_argument("prompts", nargs="*", help="text prompts (or --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--generator", required=True, help="MaskGen preset, Hub repo id or checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="TA-TiTok preset, Hub repo id or checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_sampling_arguments(p)
    add_runtime_arguments(p)
    add_text_encoder_arguments(p)
    p.set_defaults(func=run_command(generate))


def _slug(text: str, n: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "empty"


def _prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            prompts += [ln.strip() for ln in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise CommandError(f"--prompts-file: {exc}") from None
    if not prompts:
        raise CommandError("prompts: give at least one prompt (arguments or --prompts-file)")
    return prompts


def _check_ranges(args) -> None:
    if args.steps is not None and not 1 <= args.steps <= 1024:
        raise CommandError(f"--steps: expected 1..1024, got {args.steps}")
    if args.cfg is not None and not (args.cfg >= 0 and args.cfg < float("inf")):
        raise CommandError(f"--cfg: expected a finite value >= 0, got {args.cfg}")
    if args.temperature is not None and not args.temperature >= 0:
        raise CommandError(f"--temperature: expected >= 0, got {args.temperature}")


def _load_generator(args, device, dtype):
    from tatitok_fast.checkpoint import CheckpointError
    from tatitok_fast.models.generators.maskgen import load_generator

    try:
        model = load_generator(args.generator, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    except (CheckpointError, KeyError, ValueError, NotImplementedError) as exc:
        raise CommandError(f"--generator {args.generator}: {exc}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def generate(args: argparse.Namespace) -> int:
    from tatitok_fast.images import make_grid, to_pil
    from tatitok_fast.pipeline import TextToImage

    prompts = _prompts(args)
    _check_ranges(args)
    device, dtype = runtime(args)
    generator = _load_generator(args, device, dtype)
    tokenizer = load_tokenizer(args, device, dtype)
    try:
        from tatitok_fast.pipeline import check_compatible

        check_compatible(generator, tokenizer)
    except ValueError as exc:
        raise CommandError(f"--generator {args.generator} / --tokenizer {args.tokenizer}: {exc}") from None
    text_encoder = load_text_encoder(args, device, [("--generator", generator.config), ("--tokenizer", tokenizer.config)])
    pipe = TextToImage(generator, tokenizer, text_encoder)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # global seeding keeps the CUDA-graph path (a user generator would not)
    images = []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="generate", unit="batch", disable=not args.progress):
        batch = prompts[i:i + args.batch_size]
        try:
            out = pipe(batch, steps=args.steps, cfg=args.cfg, aesthetic=args.aesthetic,
                       temperature=args.temperature, use_cuda_graph=False if args.eager else None)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for j, (prompt, im) in enumerate(zip(batch, to_pil(out))):
            im.save(out_dir / f"{i + j:05d}_{_slug(prompt)}.png")
            images.append(im)
    make_grid(images, ncols=min(8, len(images))).save(out_dir / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out_dir}")
    return 0
