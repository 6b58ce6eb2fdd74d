"""Options and loaders of the class-to-image commands (generate --class, sample-imagenet):
a TiTok MaskGIT generator (ImageBert / UViTBert), the TiTok tokenizer that decodes its ids,
and generate()'s sampling settings. Everything is checked before a model is loaded."""
from __future__ import annotations

import argparse
import math

import torch

from tatitok_fast.cli.common import CommandError

GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")


def add_class_sampling_arguments(parser: argparse.ArgumentParser, with_common: bool = True) -> None:
    """generate()'s settings; None = the generator config's (TITOK.md 10), else the official
    default. with_common=False: --steps/--cfg/--temperature are there already (generate's MaskGen ones)."""
    if with_common:
        parser.add_argument("--steps", type=int, default=None,
                            help="sampling steps (default: the generator config's num_steps)")
        parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's)")
        parser.add_argument("--temperature", type=float, default=None,
                            help="randomize temperature (default: the config's randomize_temperature)")
    parser.add_argument("--guidance-decay", choices=GUIDANCE_DECAYS, default=None,
                        help="guidance schedule (default: the config's guidance_decay)")
    parser.add_argument("--guidance-scale-pow", type=float, default=None,
                        help="power of the power-cosine schedule (default: 3.0)")
    parser.add_argument("--no-temperature-annealing", dest="annealing", action="store_false", default=True,
                        help="no softmax temperature annealing (on by default, as the official FID sampling)")
    parser.add_argument("--noise", choices=("torch", "philox"), default="torch",
                        help="torch: the official RNG draws (default); philox: in-kernel noise, CUDA-graph "
                             "capturable (faster on GPU, other images)")


def check_class_sampling(args) -> None:
    if args.steps is not None and not 1 <= args.steps <= 1024:
        raise CommandError(f"--steps: expected 1..1024, got {args.steps}")
    if args.cfg is not None and not (args.cfg >= 0 and math.isfinite(args.cfg)):
        raise CommandError(f"--cfg: expected a finite value >= 0, got {args.cfg}")
    if args.temperature is not None and not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise CommandError(f"--temperature: expected a finite value >= 0, got {args.temperature}")
    if args.guidance_scale_pow is not None and not math.isfinite(args.guidance_scale_pow):
        raise CommandError(f"--guidance-scale-pow: expected a finite number, got {args.guidance_scale_pow}")


def class_sampling_overrides(args) -> dict:
    """ClassToImage.tokens keyword arguments from the options (None = the config's)."""
    return {"num_sample_steps": args.steps, "guidance_scale": args.cfg, "randomize_temperature": args.temperature,
            "guidance_decay": args.guidance_decay, "guidance_scale_pow": args.guidance_scale_pow,
            "softmax_temperature_annealing": args.annealing}


def default_tokenizer(generator: str, tokenizer: str | None) -> str:
    """--tokenizer, or the tokenizer preset of the same name as a generator preset (titok_l32)."""
    from tatitok_fast import presets

    if tokenizer:
        return tokenizer
    if generator in getattr(presets, "TITOK_GENERATORS", {}):
        return generator
    raise CommandError(f"--tokenizer: required when --generator ({generator}) is not a TiTok generator preset "
                       f"({sorted(getattr(presets, 'TITOK_GENERATORS', {}))})")


def load_class_generator(args, device: torch.device, dtype: torch.dtype):
    """ImageBert or UViTBert (whichever the config names) from --generator."""
    from tatitok_fast.checkpoint import CheckpointError
    from tatitok_fast.models.generators.maskgit import ImageBert

    try:
        model = ImageBert.from_pretrained(args.generator, cache_dir=args.cache_dir,
                                          local_files_only=args.local_files_only)
    except (CheckpointError, KeyError, ValueError, NotImplementedError) as exc:
        raise CommandError(f"--generator {args.generator}: {exc}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_class_tokenizer(name: str, args, device: torch.device, dtype: torch.dtype):
    """The TiTok named by `name` (preset, Hub id or folder)."""
    from tatitok_fast.checkpoint import CheckpointError

    try:
        from tatitok_fast import TiTok
    except ImportError:
        raise CommandError("--tokenizer: this build has no TiTok tokenizer") from None
    try:
        model = TiTok.from_pretrained(name, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    except (CheckpointError, KeyError, ValueError, NotImplementedError) as exc:
        raise CommandError(f"--tokenizer {name}: {exc}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def class_pipeline(args, tokenizer_name: str, device: torch.device, dtype: torch.dtype):
    """ClassToImage from --generator and `tokenizer_name`, their compatibility checked."""
    from tatitok_fast.pipeline import ClassToImage

    generator = load_class_generator(args, device, dtype)
    tokenizer = load_class_tokenizer(tokenizer_name, args, device, dtype)
    try:
        return ClassToImage(generator, tokenizer)
    except (ValueError, TypeError) as exc:
        raise CommandError(f"--generator {args.generator} / --tokenizer {tokenizer_name}: {exc}") from None
