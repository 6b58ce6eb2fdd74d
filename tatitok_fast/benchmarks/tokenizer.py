"""TA-TiTok encode and decode images/s: the fast path (fused VQ/KL ops, SDPA/FlashAttention,
--fast-dtype weights) next to the plain eager fp32 path, same weights and inputs."""
from __future__ import annotations

import argparse
import copy

import torch

from tatitok_fast import presets
from tatitok_fast.benchmarks.harness import Measurement, Report
from tatitok_fast.benchmarks.models import DTYPES, build_model, fast_dtype_for, model_report, pair_rows
from tatitok_fast.ops import reference_mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tatitok_bl32_vae", choices=sorted(presets.TOKENIZERS))
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir / Hub id instead of random weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fast-dtype", choices=sorted(DTYPES), default=None)


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    return model_report("tokenizer", rows, args, devices)


def rows(args, device: str) -> list[Measurement]:
    from tatitok_fast import TATiTok

    quick = args.quick
    config = presets.tiny_tokenizer_config("vae") if quick else presets.preset_config(args.preset)
    eager = build_model(TATiTok, args.checkpoint or args.preset, config, device)
    fast_dtype = fast_dtype_for(args, device)
    fast = copy.deepcopy(eager).to(fast_dtype)
    b, size = args.batch, eager.image_size
    width = eager.decoder.text_embed_dim
    x = torch.rand(b, 3, size, size, device=device)
    guidance = torch.randn(b, 77, width, device=device)
    with torch.no_grad():
        tokens = eager.encode(x)[1]["min_encoding_indices"] if eager.quantize_mode == "vq" else eager.encode(x)[0]

    @torch.no_grad()
    def enc_fast():
        return fast.encode(x.to(fast_dtype))

    @torch.no_grad()
    def enc_eager():
        with reference_mode():
            return eager.encode(x)

    @torch.no_grad()
    def dec_fast():
        t = tokens if eager.quantize_mode == "vq" else tokens.to(fast_dtype)
        return fast.decode_tokens(t, guidance.to(fast_dtype))

    @torch.no_grad()
    def dec_eager():
        with reference_mode():
            return eager.decode_tokens(tokens, guidance)

    name = "tiny" if quick else args.checkpoint or args.preset
    shapes = f"{name} B={b} {size}x{size} N={eager.num_latent_tokens}"
    return (pair_rows("tokenizer", "encode", device, shapes, b, enc_fast, enc_eager, fast_dtype, quick)
            + pair_rows("tokenizer", "decode", device, shapes, b, dec_fast, dec_eager, fast_dtype, quick))
