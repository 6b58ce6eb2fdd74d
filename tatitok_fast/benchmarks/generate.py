"""MaskGen generation images/s, and the tokenizer decode of what it makes: the fast path
(bf16, fused sampling steps, Triton adaLN, FlashAttention/SDPA, CUDA graph on CUDA) next to the
plain eager fp32 path, same weights and prompts."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from tatitok_fast import presets
from tatitok_fast.benchmarks.harness import Measurement, Report
from tatitok_fast.benchmarks.models import DTYPES, build_model, fast_dtype_for, model_report, pair_rows
from tatitok_fast.ops import reference_mode

DEFAULT_TOKENIZER = {"vq": "tatitok_bl128_vq", "vae": "tatitok_bl32_vae"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default="maskgen_vq_xl",
                        help=f"preset ({', '.join(sorted(presets.GENERATORS))}) or checkpoint dir / Hub id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the decode row (default: the matching one)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    parser.add_argument("--no-decode", action="store_true", help="skip the tokenizer decode row")
    parser.add_argument("--fast-dtype", choices=sorted(DTYPES), default=None)


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    return model_report("generate", rows, args, devices)


def rows(args, device: str) -> list[Measurement]:
    from tatitok_fast import TATiTok
    from tatitok_fast.models.maskgen import MaskGen_KL, MaskGen_VQ
    from tatitok_fast.text import CLIPTextEncoder

    quick = args.quick
    if quick:
        mode = "vae" if "_kl" in args.generator else "vq"
        gen_cfg, tok_cfg = presets.tiny_generator_config(mode), presets.tiny_tokenizer_config(mode)
        text_encoder = CLIPTextEncoder.tiny().to(device)
    else:
        if args.generator in presets.GENERATORS:
            gen_cfg = presets.preset_config(args.generator)
        else:  # a checkpoint directory: its config says which kind it is
            from tatitok_fast.checkpoint import CONFIG_NAME, read_config

            gen_cfg = read_config(Path(args.generator) / CONFIG_NAME)
        mode = gen_cfg["model"]["vq_model"].get("quantize_mode", "vq")
        tok_name = args.tokenizer or DEFAULT_TOKENIZER[mode]
        tok_cfg = presets.preset_config(tok_name) if tok_name in presets.TOKENIZERS else None
        text_encoder = CLIPTextEncoder("ViT-L-14-336", None, device=device)  # random weights: speed only
    cls = MaskGen_KL if mode == "vae" else MaskGen_VQ
    eager = build_model(cls, None if quick else args.generator, gen_cfg, device)
    fast_dtype = fast_dtype_for(args, device)
    fast = copy.deepcopy(eager).to(fast_dtype)
    mg = eager.config["model"]["maskgen"]
    steps = args.steps or mg.get("num_iter", 16 if mode == "vq" else 32)
    prompts = [f"prompt number {i}: a photo of a cozy cabin in the snow" for i in range(args.batch)]
    b = args.batch

    def run(model, graph):
        if mode == "vq":
            return model.generate(prompts, guidance_scale=mg.get("cfg", 12.0), randomize_temperature=2.0,
                                  sample_aesthetic_score=6.5, num_sample_steps=steps, text_encoder=text_encoder,
                                  use_cuda_graph=graph)
        return model.sample_tokens(b, num_iter=steps, cfg=mg.get("cfg", 3.0), captions=prompts, aes_scores=6.5,
                                   text_encoder=text_encoder, use_cuda_graph=graph)

    def gen_fast():
        return run(fast, None)

    def gen_eager():
        with reference_mode():
            return run(eager, False)

    name = "tiny" if quick else args.generator
    rows = pair_rows("generate", "generate", device, f"{name} B={b} steps={steps}", b, gen_fast, gen_eager,
                      fast_dtype, quick)
    if args.no_decode:
        return rows
    tok_eager = build_model(TATiTok, None if quick else (args.tokenizer or DEFAULT_TOKENIZER[mode]), tok_cfg, device)
    tok_fast = copy.deepcopy(tok_eager).to(fast_dtype)
    tokens = gen_fast()
    guidance = text_encoder(prompts).guidance

    @torch.no_grad()
    def dec_fast():
        t = tokens if mode == "vq" else tokens.to(fast_dtype)
        return tok_fast.decode_tokens(t, guidance.to(fast_dtype))

    @torch.no_grad()
    def dec_eager():
        with reference_mode():
            return tok_eager.decode_tokens(tokens.float() if mode == "vae" else tokens, guidance.float())

    tok_name = "tiny" if quick else (args.tokenizer or DEFAULT_TOKENIZER[mode])
    rows += pair_rows("generate", "decode", device, f"{tok_name} B={b}", b, dec_fast, dec_eager, fast_dtype, quick)
    return rows
