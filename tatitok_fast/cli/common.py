"""Options and loaders shared by the model commands (reconstruct, tokenize, generate)."""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CommandError(Exception):
    """A user-facing failure: printed as `error: ...`, exit status 2 (cli/errors.py)."""


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model precision (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument("--local-files-only", action="store_true", help="never touch the network")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# the reference's text tower: used when neither the flags nor a checkpoint config name one
DEFAULT_TEXT_ENCODER = {"name": "ViT-L-14-336", "pretrained": "openai"}
TEXT_ENCODER_KEY = "model.text_encoder"  # where a config records its text encoder (a from_spec dict)


def add_sampling_arguments(parser) -> None:
    """MaskGen sampling overrides (generate, eval generate); None = the generator config's."""
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the generator config's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the generator config's)")
    parser.add_argument("--aesthetic", type=float, default=None, help="aesthetic score condition (default: config's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: config's)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graph")


def add_text_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-model", default=None,
                        help="open_clip text tower (default: the one the checkpoint's config names in "
                             f"{TEXT_ENCODER_KEY}, else {DEFAULT_TEXT_ENCODER['name']})")
    parser.add_argument("--clip-pretrained", default=None,
                        help="open_clip pretrained tag, a local weights file or 'none' (default: as --clip-model, "
                             f"else {DEFAULT_TEXT_ENCODER['pretrained']})")


def runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device/--dtype -> (device, dtype), checked before anything is loaded."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise CommandError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        raise CommandError("--dtype fp16: not supported on CPU (use fp32 or bf16)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CommandError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support (use fp16)")
    if getattr(args, "batch_size", 1) < 1:
        raise CommandError(f"--batch-size: expected >= 1, got {args.batch_size}")
    return device, dtype


def load_tokenizer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """--tokenizer: a TA-TiTok or TiTok preset / Hub id / folder, or the MaskGIT-VQGAN."""
    from tatitok_fast.checkpoint import CheckpointError
    from tatitok_fast.models.tokenizers.loading import load_tokenizer as load
    from tatitok_fast.weight_files import WeightsFileError

    try:
        model = load(args.tokenizer, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    except (CheckpointError, WeightsFileError, KeyError, ValueError, NotImplementedError) as exc:
        raise CommandError(f"--tokenizer {args.tokenizer}: {exc}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def text_encoder_spec(args: argparse.Namespace, sources: Sequence[tuple[str, Mapping]] = ()) -> tuple[dict, str]:
    """(spec, where it came from) of the text encoder to use: --clip-model/--clip-pretrained
    when given; else the first config among `sources` ((option name, config) pairs, e.g. the
    generator's then the tokenizer's) with a model.text_encoder entry; else ViT-L-14-336/openai."""
    from tatitok_fast.checkpoint import cfg_get

    if args.clip_model is not None or args.clip_pretrained is not None:
        pretrained = DEFAULT_TEXT_ENCODER["pretrained"] if args.clip_pretrained is None else args.clip_pretrained
        spec = {"name": args.clip_model or DEFAULT_TEXT_ENCODER["name"],
                "pretrained": None if pretrained in ("none", "") else pretrained}
        return spec, f"--clip-model {spec['name']} --clip-pretrained {pretrained}"
    found = [(option, cfg_get(config, TEXT_ENCODER_KEY)) for option, config in sources]
    found = [(option, spec) for option, spec in found if spec is not None]
    if not found:
        return dict(DEFAULT_TEXT_ENCODER), "the default text encoder"
    option, spec = found[0]
    for other, other_spec in found[1:]:
        if other_spec != spec:
            print(f"tatitok-fast: warning: {option} names text encoder {spec}, {other} names {other_spec}; "
                  f"using {option}'s", file=sys.stderr)
    if not isinstance(spec, Mapping):
        raise CommandError(f"{option}: config entry {TEXT_ENCODER_KEY} must be a dict such as "
                           f"{DEFAULT_TEXT_ENCODER} or {{'name': 'tiny', 'seed': 0}}, got {spec!r}")
    return dict(spec), f"the text encoder of {option}'s config ({TEXT_ENCODER_KEY} = {dict(spec)})"


def load_text_encoder(args: argparse.Namespace, device: torch.device, sources: Sequence[tuple[str, Mapping]] = ()):
    """The text encoder `text_encoder_spec` picks, built on `device`."""
    from tatitok_fast.text import CLIPTextEncoder

    spec, where = text_encoder_spec(args, sources)
    try:
        return CLIPTextEncoder.from_spec(spec, cache_dir=args.cache_dir, device=device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CommandError(f"{where}: {exc}") from None


def run_command(func):
    """A command's entry point. CommandError is reported by cli.main (cli/errors.py:
    `error: ...`, exit status 2, the traceback only with --debug) like every user error."""
    return func
