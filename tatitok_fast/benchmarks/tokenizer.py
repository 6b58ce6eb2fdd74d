"""TA-TiTok encode, decode and encode+decode images/s: ours (fp32, and the fast path in
--fast-dtype) next to the official code (fp32 eager, and under torch.autocast) on the same
weights and inputs; our reference_mode fp32 as an extra row.

Before timing, ours and the official model must agree in fp32: VQ ids equal (a differing id
is accepted only at an exact tie of the two codes' distances) and the posterior mean (KL) and
decoded images within 1e-4 relative error; our fast path's decoded images must be at most 2x
as far from the official fp32 ones as the official autocast path's (or 1e-2).
"""
from __future__ import annotations

import argparse
import copy

import torch

from tatitok_fast import presets
from tatitok_fast.benchmarks import official as off
from tatitok_fast.benchmarks.official import FP32_TOL, LOW_PRECISION_FLOOR
from tatitok_fast.benchmarks.harness import Report
from tatitok_fast.benchmarks.models import (ModelCase, add_model_arguments, autocast, build_model,
                                            check_model_args, compiled_model, dtype_name, fast_dtype, make_case,
                                            model_report, positive_int)
from tatitok_fast.ops import reference_mode

CASES = ("encode", "decode", "encode+decode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", "--model", default="tatitok_bl32_vae", choices=sorted(presets.ALL_TOKENIZERS),
                        help="TA-TiTok or TiTok (titok_*, see benchmarks/titok.py) preset")
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir / Hub id instead of random weights")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--cases", type=_parse_cases, default=list(CASES), metavar="C[,C...]",
                        help=f"cases to time (default all): {', '.join(CASES)}")
    add_model_arguments(parser)
    from tatitok_fast.benchmarks import titok  # TiTok specifics

    titok.add_dtype_alias(parser)


def _parse_cases(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in CASES for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of: {', '.join(CASES)}; got {text!r}")
    return [c for c in CASES if c in names]


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    from tatitok_fast.benchmarks import titok

    if titok.is_titok_tokenizer(args.preset):
        titok.check_tokenizer_args(args)


def case_names(args: argparse.Namespace) -> list[str]:
    """The cases `cases(args, ...)` returns, known before anything is built."""
    return list(args.cases)


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    return model_report("tokenizer", cases, args, devices)


def cases(args, device: str, notes: list[str]) -> list[ModelCase]:
    """Build the models and inputs, check agreement with the official code, and return the
    timed cases (closures over the same inputs for every variant)."""
    from tatitok_fast import TATiTok
    from tatitok_fast.benchmarks import titok

    if titok.is_titok_tokenizer(args.preset):
        return titok.tokenizer_cases(args, device, notes)
    mode = presets.TOKENIZERS[args.preset]["model"]["vq_model"]["quantize_mode"]
    config = presets.tiny_tokenizer_config(mode) if args.quick else presets.preset_config(args.preset)
    ours = build_model(TATiTok, args.checkpoint or args.preset, config, device)  # fp32
    dtype = fast_dtype(args)
    fast = copy.deepcopy(ours).to(dtype)
    vq = ours.quantize_mode == "vq"
    b, size = args.batch, ours.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, size, size, generator=gen).to(device)  # (B, 3, H, W) in [0, 1]
    guidance = torch.randn(b, ours.decoder.text_context_length, ours.decoder.text_embed_dim,
                           generator=gen).to(device)  # (B, 77, W) CLIP text states
    with torch.no_grad():
        z, result = ours.encode(x)
    tokens = result["min_encoding_indices"] if vq else result.mean  # VQ ids (B, 1, N) | KL (B, C, 1, N)

    official = None
    if args.official and any(v.startswith("official") for v in args.variants):
        official = off.official_model(off.import_official(args.official).TATiTok, ours)
        check_agreement(ours, fast, official, x, guidance, device, dtype)

    def ours_fns(model, low: bool):
        t = tokens if vq else tokens.to(dtype if low else torch.float32)
        return {"encode": lambda: model.encode(x),
                "decode": lambda: model.decode_tokens(t, guidance),
                "encode+decode": lambda: model.decode(model.encode(x)[0], guidance)}

    def official_fns(amp: torch.dtype):
        def under(fn):
            def call():
                with autocast(device, amp):
                    return fn()
            return call

        return {"encode": under(lambda: official.encode(x)),
                "decode": under(lambda: official.decode_tokens(tokens, guidance)),
                "encode+decode": under(lambda: official.decode(official.encode(x)[0], guidance))}

    def reference_fns():
        def ref(fn):
            def call():
                with reference_mode():
                    return fn()
            return call

        return {k: ref(f) for k, f in ours_fns(ours, False).items()}

    variants = {"fp32": (torch.float32, ours_fns(ours, False)), "fast": (dtype, ours_fns(fast, True)),
                "reference_mode": (torch.float32, reference_fns())}
    if "compiled" in args.variants:
        variants["compiled"] = (dtype, ours_fns(compiled_model(fast, args), True))
    if official is not None:
        variants = {"official_fp32": (torch.float32, official_fns(torch.float32)),
                    "official_autocast": (dtype, official_fns(dtype)), **variants}
    name = "tiny" if args.quick else args.checkpoint or args.preset
    shapes = f"{name} B={b} {size}x{size} N={ours.num_latent_tokens}"
    return [make_case("tokenizer", c, shapes, b, variants, args.variants) for c in args.cases]


def check_agreement(ours, fast, official, x, guidance, device: str, dtype: torch.dtype) -> None:
    """Raise official.AgreementError unless ours matches the official model (see module doc)."""
    vq = ours.quantize_mode == "vq"
    with torch.no_grad():
        _, r_ours = ours.encode(x)
        _, r_off = official.encode(x)
        if vq:
            ids_ours, ids_off = r_ours["min_encoding_indices"], r_off["min_encoding_indices"]
            _check_vq_ids(ours, x, ids_ours, ids_off)
            tokens = ids_off
        else:
            off.check_close("encode (KL posterior mean)", r_ours.mean, r_off.mean, FP32_TOL)
            tokens = r_off.mean
    check_decode_agreement(ours, fast, official, tokens, guidance, device, dtype)


def check_decode_agreement(ours, fast, official, tokens, guidance, device: str, dtype: torch.dtype) -> None:
    """decode_tokens of the same tokens: ours fp32 within FP32_TOL of the official fp32 images;
    ours in `dtype` at most 2x as far from them as the official code under autocast(dtype)."""
    vq = ours.quantize_mode == "vq"
    with torch.no_grad():
        ref = official.decode_tokens(tokens, guidance)
        off.check_close("decode_tokens (fp32)", ours.decode_tokens(tokens, guidance), ref, FP32_TOL)
        if dtype == torch.float32:
            return
        with autocast(device, dtype):
            amp_err = off.rel_err(official.decode_tokens(tokens, guidance).float(), ref)
        low_tokens = tokens if vq else tokens.to(dtype)
        tol = max(2 * amp_err, LOW_PRECISION_FLOOR)
        off.check_close(f"decode_tokens (ours in {dtype_name(dtype)} vs official fp32; official autocast errs "
                        f"{amp_err:.2g})", fast.decode_tokens(low_tokens, guidance).float(), ref, tol)


def _check_vq_ids(ours, x: torch.Tensor, ids_ours: torch.Tensor, ids_off: torch.Tensor) -> None:
    """Equal ids, except where the two codes are equally near the encoder output (distance gap
    within fp32 rounding, 1e-5 relative: either is a correct nearest code)."""
    a, b = ids_ours.reshape(-1), ids_off.reshape(-1)
    diff = (a != b).nonzero().flatten()
    if diff.numel() == 0:
        return
    z = ours.encoder(pixel_values=x, latent_tokens=ours.latent_tokens).float()  # (B, C, 1, N)
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[diff]  # the rows whose ids differ, (n, C)
    codebook = ours.quantize.embedding.weight.float()
    d_ours = ((z - codebook[a[diff]]) ** 2).sum(-1)
    d_off = ((z - codebook[b[diff]]) ** 2).sum(-1)
    if not torch.allclose(d_ours, d_off, rtol=1e-5, atol=0.0):
        off.check_equal_ids("encode (VQ ids, fp32)", ids_ours, ids_off)
