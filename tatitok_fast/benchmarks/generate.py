"""MaskGen generation images/s, and the tokenizer decode of what it makes: ours (fp32, and the
fast path in --fast-dtype: fused sampling steps, SDPA, a CUDA graph on CUDA) next to the
official code (fp32 eager, and under torch.autocast) on the same weights, text encoder and
prompts; our reference_mode fp32 as an extra row.

Before timing, ours and the official model must agree in fp32: MaskGen-VQ with the
reference's noise (`generate(noise="torch")`) and the same seed gives the official ids;
MaskGen-KL's MAE decoder gives the official per-token conditions within 1e-4; the decoded
images as in the tokenizer suite. The official MaskGen_KL samples on CUDA only (hard-coded
`.cuda()`), so its generate rows exist on CUDA only.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from tatitok_fast import presets
from tatitok_fast.benchmarks import official as off
from tatitok_fast.benchmarks.harness import Report
from tatitok_fast.benchmarks.models import (add_model_arguments, autocast, build_model, check_model_args,
                                            compiled_model, fast_dtype, make_case, model_report, positive_int)
from tatitok_fast.benchmarks.official import FP32_TOL
from tatitok_fast.benchmarks.tokenizer import check_decode_agreement
from tatitok_fast.ops import reference_mode

DEFAULT_TOKENIZER = {"vq": "tatitok_bl128_vq", "vae": "tatitok_bl32_vae"}
CASES = ("generate", "decode")
RANDOMIZE_TEMPERATURE = 2.0  # MaskGen-VQ: the config's "temperature" of the zoo models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default="maskgen_vq_xl",
                        help=f"preset ({', '.join(sorted(presets.ALL_GENERATORS))}) or checkpoint dir / Hub id; "
                             "titok_*: class-to-image, see benchmarks/titok.py")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the decode row (default: the matching one)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the config's)")
    parser.add_argument("--no-decode", action="store_true", help="skip the tokenizer decode rows")
    add_model_arguments(parser)
    from tatitok_fast.benchmarks import titok  # TiTok / MaskGIT specifics (they import tokenizer.py)

    titok.add_dtype_alias(parser)


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    from tatitok_fast.benchmarks import titok

    if titok.is_titok_generator(args.generator):
        return titok.check_generate_args(args)
    if args.tokenizer is not None and args.tokenizer not in presets.TOKENIZERS and not Path(args.tokenizer).exists():
        raise ValueError(f"--tokenizer: expected a preset ({', '.join(sorted(presets.TOKENIZERS))}) or a checkpoint "
                         f"directory, got {args.tokenizer!r}")


def case_names(args: argparse.Namespace) -> list[str]:
    """The cases `cases(args, ...)` returns, known before anything is built."""
    from tatitok_fast.benchmarks import titok

    if titok.is_titok_generator(args.generator):
        return titok.generate_case_names(args, getattr(args, "device", None))
    return ["generate"] if args.no_decode else list(CASES)


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    return model_report("generate", cases, args, devices)


def _generator_config(args) -> tuple[dict, str]:
    if args.quick:
        mode = "vae" if "_kl" in args.generator else "vq"
        return presets.tiny_generator_config(mode), mode
    if args.generator in presets.GENERATORS:
        cfg = presets.preset_config(args.generator)
    else:  # a checkpoint directory: its config says which kind it is
        from tatitok_fast.checkpoint import CONFIG_NAME, read_config

        cfg = read_config(Path(args.generator) / CONFIG_NAME)
    return cfg, cfg["model"]["vq_model"].get("quantize_mode", "vq")


def cases(args, device: str, notes: list[str]):
    """Build generator, tokenizer and text encoder, check agreement with the official code,
    and return the timed cases."""
    from tatitok_fast import MaskGen_KL, MaskGen_VQ, TATiTok
    from tatitok_fast.benchmarks import titok
    from tatitok_fast.text import CLIPTextEncoder

    if titok.is_titok_generator(args.generator):
        return titok.generate_cases(args, device, notes)
    gen_cfg, mode = _generator_config(args)
    if args.quick:
        text_encoder = CLIPTextEncoder.tiny().to(device)
    else:
        text_encoder = CLIPTextEncoder("ViT-L-14-336", None, device=device)  # random weights: speed only
    ours = build_model(MaskGen_KL if mode == "vae" else MaskGen_VQ, None if args.quick else args.generator, gen_cfg,
                       device)
    dtype = fast_dtype(args)
    fast = copy.deepcopy(ours).to(dtype)
    mg = ours.config["model"]["maskgen"]
    steps = args.steps or mg.get("num_iter", 16 if mode == "vq" else 32)
    aes = float(mg.get("sample_aesthetic_score", 6.5))  # the official generate always uses the config's
    b = args.batch
    prompts = [f"prompt number {i}: a photo of a cozy cabin in the snow" for i in range(b)]

    want_official = args.official and any(v.startswith("official") for v in args.variants)
    official = None
    if want_official:
        lib = off.import_official(args.official)
        official = off.official_model(lib.MaskGen_KL if mode == "vae" else lib.MaskGen_VQ, ours)
        if mode == "vq":
            check_vq_generate(ours, official, text_encoder, prompts[:2], min(steps, 4), mg)
        else:
            check_kl_decoder(ours, official, text_encoder, prompts[:2])

    def ours_generate(model, graph, **kw):
        if mode == "vq":
            return lambda: model.generate(prompts, guidance_scale=mg.get("cfg", 12.0),
                                          randomize_temperature=RANDOMIZE_TEMPERATURE, sample_aesthetic_score=aes,
                                          num_sample_steps=steps, text_encoder=text_encoder, use_cuda_graph=graph,
                                          **kw)
        return lambda: model.sample_tokens(b, num_iter=steps, cfg=mg.get("cfg", 3.0),
                                           cfg_schedule=mg.get("cfg_schedule", "linear"), captions=prompts,
                                           aes_scores=aes, temperature=mg.get("temperature", 1.0),
                                           text_encoder=text_encoder, use_cuda_graph=graph)

    def official_generate(amp: torch.dtype):
        if mode == "vq":
            def fn():
                return official.generate(prompts, guidance_scale=mg.get("cfg", 12.0),
                                         randomize_temperature=RANDOMIZE_TEMPERATURE, sample_aesthetic_score=aes,
                                         num_sample_steps=steps, clip_tokenizer=text_encoder.tokenizer,
                                         clip_encoder=text_encoder.model)
        else:
            def fn():
                return official.sample_tokens(b, text_encoder.tokenizer, text_encoder.model, num_iter=steps,
                                              cfg=mg.get("cfg", 3.0), cfg_schedule=mg.get("cfg_schedule", "linear"),
                                              captions=prompts, aes_scores=aes, temperature=mg.get("temperature", 1.0))

        def call():
            with autocast(device, amp):
                return fn()
        return call

    def in_reference_mode(fn):
        def call():
            with reference_mode():
                return fn()
        return call

    gen_variants = {"fp32": (torch.float32, {"generate": ours_generate(ours, None)}),
                    "fast": (dtype, {"generate": ours_generate(fast, None)}),
                    "reference_mode": (torch.float32, {"generate": in_reference_mode(ours_generate(ours, False))})}
    if "compiled" in args.variants:
        gen_variants["compiled"] = (dtype, {"generate": ours_generate(compiled_model(fast, args), None)})
    if official is not None and (mode == "vq" or device == "cuda"):
        gen_variants = {"official_fp32": (torch.float32, {"generate": official_generate(torch.float32)}),
                        "official_autocast": (dtype, {"generate": official_generate(dtype)}), **gen_variants}
    elif official is not None:
        notes.append(f"official MaskGen_KL.sample_tokens runs on CUDA only (hard-coded .cuda()): no official "
                     f"generate rows on {device}")
    name = "tiny" if args.quick else args.generator
    out = [make_case("generate", "generate", f"{name} B={b} steps={steps}", b, gen_variants, args.variants)]
    if args.no_decode:
        return out

    # ---- the tokenizer decode of generated tokens ----
    tok_name = args.tokenizer or DEFAULT_TOKENIZER[mode]
    tok_cfg = presets.tiny_tokenizer_config(mode) if args.quick else (
        presets.preset_config(tok_name) if tok_name in presets.TOKENIZERS else None)
    tok = build_model(TATiTok, None if args.quick else tok_name, tok_cfg, device)
    tok_fast = copy.deepcopy(tok).to(dtype)
    with torch.no_grad():
        tokens = ours_generate(ours, None)()  # VQ ids (B, N) | KL (B, C, 1, N) fp32
        guidance = text_encoder(prompts).guidance  # (B, 77, W)
    low_tokens = tokens if mode == "vq" else tokens.to(dtype)
    dec_variants = {"fp32": (torch.float32, {"decode": lambda: tok.decode_tokens(tokens, guidance)}),
                    "fast": (dtype, {"decode": lambda: tok_fast.decode_tokens(low_tokens, guidance)}),
                    "reference_mode": (torch.float32, {"decode": in_reference_mode(
                        lambda: tok.decode_tokens(tokens, guidance))})}
    if "compiled" in args.variants:
        tok_compiled = compiled_model(tok_fast, args)
        dec_variants["compiled"] = (dtype, {"decode": lambda: tok_compiled.decode_tokens(low_tokens, guidance)})
    if want_official:
        tok_off = off.official_model(off.import_official(args.official).TATiTok, tok)
        check_decode_agreement(tok, tok_fast, tok_off, tokens, guidance, device, dtype)

        def official_decode(amp):
            def call():
                with autocast(device, amp):
                    return tok_off.decode_tokens(tokens, guidance)
            return call

        dec_variants = {"official_fp32": (torch.float32, {"decode": official_decode(torch.float32)}),
                        "official_autocast": (dtype, {"decode": official_decode(dtype)}), **dec_variants}
    tok_label = "tiny" if args.quick else tok_name
    out.append(make_case("generate", "decode", f"{tok_label} B={b}", b, dec_variants, args.variants))
    return out


# ---------------------------------------------------------------------------------------
# Agreement checks

def check_vq_generate(ours, official, text_encoder, prompts: list[str], steps: int, mg: dict, seed: int = 0) -> None:
    """Ours with the reference's noise draws and the official generate, same seed: equal ids."""
    kw = dict(guidance_scale=mg.get("cfg", 12.0), randomize_temperature=RANDOMIZE_TEMPERATURE,
              sample_aesthetic_score=float(mg.get("sample_aesthetic_score", 6.5)), num_sample_steps=steps)
    torch.manual_seed(seed)
    ids = ours.generate(prompts, text_encoder=text_encoder, noise="torch", use_cuda_graph=False, **kw)
    torch.manual_seed(seed)
    want = official.generate(prompts, clip_tokenizer=text_encoder.tokenizer, clip_encoder=text_encoder.model, **kw)
    off.check_equal_ids(f"generate (fp32, noise='torch', seed {seed}, {steps} steps)", ids, want)


def check_kl_decoder(ours, official, text_encoder, prompts: list[str], seed: int = 0) -> None:
    """MaskGen-KL: the MAE decoder (MM-DiT + final adaLN: the per-token conditions of the
    DiffLoss head) on the same tokens, mask and projected text conditions. The sampled tokens
    themselves are not compared: the official sampler draws its orders with numpy on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    device = ours.mask_token.device
    b, n, c = len(prompts), ours.seq_len, ours.token_embed_dim
    x = torch.randn(b, n, c, generator=gen).to(device)  # (B, N, C) token latents
    order = torch.rand(b, n, generator=gen).argsort(-1)
    mask = (order < n // 2).float().to(device)  # (B, N), the same number masked in every row
    with torch.no_grad():
        enc = text_encoder(prompts)
        aes = torch.full((b,), 6.5, device=device)
        cond, pooled = ours.project_conditions(enc.penultimate.to(device), enc.pooled.to(device), aes)
        got = ours.forward_mae_decoder(x, mask, cond, pooled)
        want = official.forward_mae_decoder(x, mask, cond, pooled)
    off.check_close("MaskGen-KL forward_mae_decoder (fp32)", got, want, FP32_TOL)
