"""`tatitok-fast generate PROMPT... --generator NAME_OR_PATH --tokenizer NAME_OR_PATH -o DIR`:
text -> MaskGen tokens -> TA-TiTok images; one PNG per prompt plus grid.png.

`tatitok-fast generate --class 207 --class "golden retriever" --generator titok_l32 -o DIR`:
ImageNet class ids or names -> ImageBert / UViTBert ids -> TiTok images (the tokenizer defaults
to the generator preset's own); one PNG per class plus grid.png.

The same seed gives the same images on the same device."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from tqdm import tqdm

from tatitok_fast.cli.common import (CommandError, add_runtime_arguments, add_sampling_arguments,
                                     add_text_encoder_arguments, load_text_encoder,
                                     load_tokenizer, run_command, runtime)
from tatitok_fast.compile import add_compile_arguments, compile_if_asked


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="text-to-image (MaskGen + TA-TiTok), or class-to-image with --class "
                              "(ImageBert / UViTBert + TiTok)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from tatitok_fast.cli.class_models import add_class_sampling_arguments

    p.add_argument("prompts", nargs="*", help="text prompts (or --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--class", dest="classes", action="append", default=None, metavar="ID_OR_NAME",
                   help="an ImageNet class id (0-999) or name, e.g. 207 or 'golden retriever' (repeatable): "
                        "class-to-image with a TiTok generator")
    p.add_argument("--generator", required=True, help="MaskGen or TiTok generator preset, Hub repo id or checkpoint "
                   "directory")
    p.add_argument("--tokenizer", default=None, help="TA-TiTok (prompts) or TiTok (--class) preset, Hub repo id or "
                   "checkpoint directory (--class: default the generator preset's tokenizer)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_sampling_arguments(p)
    add_class_sampling_arguments(p, with_common=False)
    add_runtime_arguments(p)
    add_compile_arguments(p)
    add_text_encoder_arguments(p)
    p.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    """--class: class-to-image (user errors raise CommandError: `error: ...`, exit 2); else the
    MaskGen text path as before."""
    if args.classes:
        return generate_classes(args)
    return run_command(generate)(args)


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
    from tatitok_fast.images import save_grid, save_numbered, to_pil
    from tatitok_fast.pipeline import TextToImage

    prompts = _prompts(args)
    class_only = [flag for flag, used in (("--guidance-decay", args.guidance_decay is not None),
                                          ("--guidance-scale-pow", args.guidance_scale_pow is not None),
                                          ("--no-temperature-annealing", not args.annealing),
                                          ("--noise", args.noise != "torch")) if used]
    if class_only:
        raise CommandError(f"{class_only[0]}: a class-to-image option (use it with --class)")
    if args.tokenizer is None:
        raise CommandError("--tokenizer: required with text prompts (a TA-TiTok preset, Hub repo id or folder)")
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
    compile_if_asked(args, generator, "--generator", CommandError)  # in place
    compile_if_asked(args, tokenizer, "--tokenizer", CommandError)
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
        pils = to_pil(out)
        save_numbered(pils, out_dir, [_slug(prompt) for prompt in batch], start=i)
        images += pils
    save_grid(images, out_dir / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out_dir}")
    return 0


def generate_classes(args: argparse.Namespace) -> int:
    """--class path: ids/names checked, then models loaded, then one PNG per class + grid.png."""
    from tatitok_fast.cli.class_models import check_class_sampling, class_pipeline, class_sampling_overrides, \
        default_tokenizer
    from tatitok_fast.images import save_images_and_grid
    from tatitok_fast.imagenet_classes import ClassNameError, class_names, resolve_class

    if args.prompts or args.prompts_file:
        raise CommandError("--class: give either --class or text prompts, not both")
    if args.aesthetic is not None:
        raise CommandError("--aesthetic: a MaskGen option; class-to-image has no aesthetic condition")
    try:
        ids = [resolve_class(c, what="--class") for c in args.classes]
    except ClassNameError as exc:
        raise CommandError(str(exc)) from None
    check_class_sampling(args)
    tokenizer_name = default_tokenizer(args.generator, args.tokenizer)
    device, dtype = runtime(args)
    pipe = class_pipeline(args, tokenizer_name, device, dtype)
    compile_if_asked(args, pipe.generator, "--generator", CommandError)  # in place
    compile_if_asked(args, pipe.tokenizer, "--tokenizer", CommandError)
    if max(ids) >= pipe.num_classes:
        raise CommandError(f"--class {max(ids)}: the generator knows classes [0, {pipe.num_classes})")
    overrides = class_sampling_overrides(args)
    names = class_names()
    out_dir = Path(args.output)
    torch.manual_seed(args.seed)
    images = []
    with tqdm(total=len(ids), desc="generate", unit="img", disable=not args.progress) as bar:
        for i in range(0, len(ids), args.batch_size):
            batch = ids[i:i + args.batch_size]
            try:
                images.append(pipe(batch, noise=args.noise, use_cuda_graph=False if args.eager else None,
                                   **overrides).cpu())
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            bar.update(len(batch))
    labels = [f"{c}_{_slug(names[c]) if c < len(names) else 'class'}" for c in ids]
    save_images_and_grid(torch.cat(images), out_dir, labels)
    print(f"wrote {len(ids)} images and grid.png to {out_dir}")
    return 0
