"""TiTok tokenizers and the MaskGIT class-to-image generators (ImageBert / UViTBert) in the
tokenizer and generate suites (tokenizer.py / generate.py dispatch here by model family).

Same variants as models.py: the official code (modeling/titok.py, modeling/maskgit.py of
bytedance/1d-tokenizer) in fp32 eager and under torch.autocast, ours fp32 / fast / reference_mode,
on the same weights and inputs.

    bench tokenizer --model titok_l32|titok_bl128_vq8k   encode, decode, encode+decode
    bench generate --generator titok_l32                 generate (ids), decode (TiTok
        decode_tokens of those ids) and class-to-image (ids -> pixels clamped to [0, 1], the
        official demo_util.sample_fn sequence): the unit of the GPU goal, images/s. Ours samples
        with noise="philox" (in-kernel noise; on CUDA the loop runs as a CUDA graph); on CUDA a
        second case "class-to-image eager loop" times ours without the graph.

Agreement before timing (fp32): tokenizer VQ ids equal (a differing id only at an exact
distance tie) and decode_tokens within 1e-4 of the official images, ours in the fast dtype at
most 2x as far as the official autocast (or 1e-2); generator ids equal to the official ones
with noise="torch" after the same torch.manual_seed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from tatitok_fast import presets
from tatitok_fast.benchmarks import official as off
from tatitok_fast.benchmarks.models import (DTYPES, autocast, build_model, compiled_model, dtype_name, fast_dtype,
                                            make_case)
from tatitok_fast.benchmarks.official import FP32_TOL, LOW_PRECISION_FLOOR
from tatitok_fast.ops import reference_mode

TOKENIZER_CASES = ("encode", "decode", "encode+decode")
GENERATE_CASES = ("generate", "decode", "class-to-image")
EAGER_LOOP_CASE = "class-to-image eager loop"  # CUDA only: ours without the CUDA-graph loop
CHECK_STEPS = 4  # sampling steps of the generate agreement check
CHECK_BATCH = 2


def add_dtype_alias(parser: argparse.ArgumentParser) -> None:
    """--dtype: another name for --fast-dtype (the dtype of our fast rows and of the official
    autocast rows)."""
    parser.add_argument("--dtype", dest="fast_dtype", choices=sorted(DTYPES), default=argparse.SUPPRESS,
                        help="same as --fast-dtype")


def is_titok_tokenizer(name: str | None) -> bool:
    return name in presets.TITOK_TOKENIZERS


def is_titok_generator(name: str | None) -> bool:
    """A TiTok generator preset, or a checkpoint directory whose config has model.generator."""
    if name in presets.TITOK_GENERATORS:
        return True
    if name is None or name in presets.GENERATORS or not Path(name).is_dir():
        return False
    from tatitok_fast.checkpoint import CONFIG_NAME, read_config

    path = Path(name) / CONFIG_NAME
    return path.is_file() and "generator" in read_config(path).get("model", {})


def check_tokenizer_args(args: argparse.Namespace) -> None:
    """bench tokenizer --model titok_*: VQ tokenizers only (the official VAE encode samples)."""
    if presets.TITOK_TOKENIZERS[args.preset]["model"]["vq_model"].get("quantize_mode", "vq") != "vq":
        vq = sorted(n for n, c in presets.TITOK_TOKENIZERS.items() if c["model"]["vq_model"].get("quantize_mode",
                                                                                               "vq") == "vq")
        raise ValueError(f"--model: the TiTok benchmark times VQ tokenizers ({', '.join(vq)}), got {args.preset!r} "
                         "(a VAE: the official encode samples its posterior)")


def check_generate_args(args: argparse.Namespace) -> None:
    """bench generate --generator titok_*: the decode rows need a TiTok (preset or directory)."""
    if args.tokenizer is not None and args.tokenizer not in presets.TITOK_TOKENIZERS \
            and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer: a TiTok generator's ids decode with a TiTok: expected a preset "
                         f"({', '.join(sorted(presets.TITOK_TOKENIZERS))}) or a checkpoint directory, "
                         f"got {args.tokenizer!r}")


def generate_case_names(args: argparse.Namespace, device: str | None = None) -> list[str]:
    if args.no_decode:
        return ["generate"]
    return list(GENERATE_CASES) + ([EAGER_LOOP_CASE] if device != "cpu" else [])


def import_official_titok(path: str | Path) -> SimpleNamespace:
    """The official TiTok, ImageBert and UViTBert (modeling.titok / modeling.maskgit; the latter
    needs `transformers`), imported from the checkout at `path` once per process."""
    off.import_official(path)  # checks the checkout, puts it on sys.path, refuses a foreign `modeling`
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            titok = importlib.import_module("modeling.titok")
            maskgit = importlib.import_module("modeling.maskgit")
    except ImportError as e:
        raise RuntimeError(f"--official: importing modeling.titok / modeling.maskgit from {path} failed ({e}); "
                           "the official ImageBert needs transformers: pip install transformers") from e
    return SimpleNamespace(TiTok=titok.TiTok, ImageBert=maskgit.ImageBert, UViTBert=maskgit.UViTBert)


def tiny_generator_config(tokenizer_config: dict) -> dict:
    """A one-layer ImageBert generating the ids of `tokenizer_config`'s TiTok (10 classes)."""
    vq = tokenizer_config["model"]["vq_model"]
    return {"model": {"vq_model": {"codebook_size": vq["codebook_size"], "num_latent_tokens": vq["num_latent_tokens"]},
                      "generator": {"model_type": "ViT", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64, "dropout": 0.1,
                                    "attn_drop": 0.1, "image_seq_len": vq["num_latent_tokens"],
                                    "condition_num_classes": 10, "num_steps": 4, "guidance_scale": 4.5,
                                    "guidance_decay": "linear", "randomize_temperature": 9.5}},
            "dataset": tokenizer_config["dataset"]}


def _tiny_tokenizer_config(name: str) -> dict:
    two_stage = presets.TITOK_TOKENIZERS[name]["model"]["vq_model"].get("finetune_decoder", True)
    mode = presets.TITOK_TOKENIZERS[name]["model"]["vq_model"].get("quantize_mode", "vq")
    config = presets.tiny_titok_config(mode, two_stage=two_stage)
    # the official code knows no "tiny" ViT: its smallest, "small" (512 wide, 8 layers), on 32x32
    config["model"]["vq_model"].update(vit_enc_model_size="small", vit_dec_model_size="small")
    return config


def _build_tokenizer(name: str, checkpoint: str | None, quick: bool, device: str):
    from tatitok_fast import TiTok

    config = _tiny_tokenizer_config(name) if quick else presets.preset_config(name)
    # random weights for a preset (build_model would take a TiTok preset name for a Hub id)
    return build_model(TiTok, None if quick else checkpoint, config, device)


def _in_reference_mode(fn):
    def call():
        with reference_mode():
            return fn()
    return call


def _under_autocast(device: str, amp: torch.dtype, fn):
    def call():
        with autocast(device, amp):
            return fn()
    return call


# ---------------------------------------------------------------------------------------
# bench tokenizer --model titok_*

def tokenizer_cases(args, device: str, notes: list[str]):
    check_tokenizer_args(args)
    ours = _build_tokenizer(args.preset, args.checkpoint, args.quick, device)  # fp32
    dtype = fast_dtype(args)
    fast = copy.deepcopy(ours).to(dtype)
    b, size = args.batch, ours.image_size
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)  # (B, 3, H, W)
    with torch.no_grad():
        tokens = ours.encode(x)[1]["min_encoding_indices"]  # (B, 1, N)

    official = None
    if args.official and any(v.startswith("official") for v in args.variants):
        official = off.official_model(import_official_titok(args.official).TiTok, ours)
        check_tokenizer_agreement(ours, fast, official, x, device, dtype)

    def fns(model):
        return {"encode": lambda: model.encode(x), "decode": lambda: model.decode_tokens(tokens),
                "encode+decode": lambda: model.decode(model.encode(x)[0])}

    variants = {"fp32": (torch.float32, fns(ours)), "fast": (dtype, fns(fast)),
                "reference_mode": (torch.float32, {k: _in_reference_mode(f) for k, f in fns(ours).items()})}
    if "compiled" in args.variants:
        variants["compiled"] = (dtype, fns(compiled_model(fast, args)))
    if official is not None:
        variants = {"official_fp32": (torch.float32, fns(official)),
                    "official_autocast": (dtype, {k: _under_autocast(device, dtype, f)
                                                  for k, f in fns(official).items()}), **variants}
    name = "tiny" if args.quick else args.checkpoint or args.preset
    shapes = f"{name} B={b} {size}x{size} N={ours.num_latent_tokens}"
    return [make_case("tokenizer", c, shapes, b, variants, args.variants) for c in args.cases]


def check_tokenizer_agreement(ours, fast, official, x, device: str, dtype: torch.dtype) -> None:
    """Raise official.AgreementError unless encode gives the official VQ ids (or an exact tie)
    and decode_tokens the official images (see the module doc)."""
    with torch.no_grad():
        ids_ours = ours.encode(x)[1]["min_encoding_indices"]
        ids_off = official.encode(x)[1]["min_encoding_indices"]
    _check_vq_ids(ours, x, ids_ours, ids_off)
    check_titok_decode(ours, fast, official, ids_off, device, dtype)


def check_titok_decode(ours, fast, official, ids: torch.Tensor, device: str, dtype: torch.dtype) -> None:
    """decode_tokens(ids): ours fp32 within FP32_TOL of the official fp32 images; ours in `dtype`
    at most 2x as far from them as the official code under autocast(dtype) (or the floor)."""
    with torch.no_grad():
        ref = official.decode_tokens(ids)
        off.check_close("TiTok decode_tokens (fp32)", ours.decode_tokens(ids), ref, FP32_TOL)
        if dtype == torch.float32:
            return
        with autocast(device, dtype):
            amp_err = off.rel_err(official.decode_tokens(ids).float(), ref)
        tol = max(2 * amp_err, LOW_PRECISION_FLOOR)
        off.check_close(f"TiTok decode_tokens (ours in {dtype_name(dtype)} vs official fp32; official autocast "
                        f"errs {amp_err:.2g})", fast.decode_tokens(ids).float(), ref, tol)


def _check_vq_ids(ours, x: torch.Tensor, ids_ours: torch.Tensor, ids_off: torch.Tensor) -> None:
    """Equal ids, except where both codes are equally near the encoder output (distance gap
    within fp32 rounding, 1e-5 relative), in the quantizer's (l2-normalised or raw) space."""
    a, b = ids_ours.reshape(-1), ids_off.reshape(-1)
    diff = (a != b).nonzero().flatten()
    if diff.numel() == 0:
        return
    with torch.no_grad():
        z = ours.encoder(pixel_values=x, latent_tokens=ours.latent_tokens).float()  # (B, C, 1, N)
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[diff]  # (n, C)
    codebook = ours.quantize.embedding.weight.float()  # (K, C)
    if ours.quantize.use_l2_norm:
        z, codebook = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(codebook, dim=-1)
    d_ours = ((z - codebook[a[diff]]) ** 2).sum(-1)
    d_off = ((z - codebook[b[diff]]) ** 2).sum(-1)
    if not torch.allclose(d_ours, d_off, rtol=1e-5, atol=0.0):
        off.check_equal_ids("TiTok encode (VQ ids, fp32)", ids_ours, ids_off)


# ---------------------------------------------------------------------------------------
# bench generate --generator titok_*

def _build_generator(args, device: str):
    """(ours fp32 ImageBert/UViTBert, tokenizer preset name, its tiny config or None)."""
    from tatitok_fast import ImageBert

    if args.quick:
        tok_name = args.tokenizer or (args.generator if args.generator in presets.TITOK_TOKENIZERS else "titok_l32")
        gen_cfg = tiny_generator_config(_tiny_tokenizer_config(tok_name))
        return build_model(ImageBert, None, gen_cfg, device), tok_name
    if args.generator in presets.TITOK_GENERATORS:
        cfg = presets.preset_config(args.generator)
        cls = ImageBert.class_for_config(cfg)
        return build_model(cls, None, cfg, device), args.tokenizer or args.generator
    ours = ImageBert.from_pretrained(args.generator, device=device).eval()
    if args.tokenizer is None:
        raise ValueError(f"--tokenizer: needed with the generator checkpoint {args.generator} (a titok_* preset "
                         "or a TiTok checkpoint directory)")
    return ours, args.tokenizer


def generate_cases(args, device: str, notes: list[str]):
    from tatitok_fast.pipeline import check_compatible, sampling_settings

    ours, tok_name = _build_generator(args, device)
    settings = sampling_settings(ours, num_sample_steps=args.steps)
    dtype = fast_dtype(args)
    fast = copy.deepcopy(ours).to(dtype)
    b = args.batch
    labels = (torch.arange(b) * 7 % ours.condition_num_classes).to(device)  # (B,) class ids

    want_official = args.official and any(v.startswith("official") for v in args.variants)
    lib = import_official_titok(args.official) if want_official else None
    official = None
    if lib is not None:
        off_cls = lib.UViTBert if ours.config["model"]["generator"]["model_type"] == "UViT" else lib.ImageBert
        official = official_generator(off_cls, ours)
        check_generate_agreement(ours, official, labels[:CHECK_BATCH], settings)

    def ours_generate(model, graph: bool | None, noise: str = "philox"):
        return lambda: model.generate(labels, **settings, noise=noise, use_cuda_graph=graph)

    def official_generate():
        return official.generate(labels, **settings)

    gen_variants = {"fp32": (torch.float32, {"generate": ours_generate(ours, None)}),
                    "fast": (dtype, {"generate": ours_generate(fast, None)}),
                    "reference_mode": (torch.float32, {"generate": _in_reference_mode(
                        ours_generate(ours, False, "torch"))})}
    if "compiled" in args.variants:
        gen_variants["compiled"] = (dtype, {"generate": ours_generate(compiled_model(fast, args), None)})
    if official is not None:
        gen_variants = {"official_fp32": (torch.float32, {"generate": official_generate}),
                        "official_autocast": (dtype, {"generate": _under_autocast(device, dtype, official_generate)}),
                        **gen_variants}
    name = "tiny" if args.quick else args.generator
    steps = settings["num_sample_steps"]
    out = [make_case("generate", "generate", f"{name} B={b} steps={steps}", b, gen_variants, args.variants)]
    if args.no_decode:
        return out

    # ---- TiTok decode of the generated ids, and the whole class-to-image ----
    if args.quick:
        from tatitok_fast import TiTok

        tok = build_model(TiTok, None, _tiny_tokenizer_config(tok_name), device)
    else:
        preset = tok_name in presets.TITOK_TOKENIZERS
        tok = _build_tokenizer(tok_name if preset else "titok_l32", None if preset else tok_name, False, device)
    check_compatible(ours, tok)
    tok_fast = copy.deepcopy(tok).to(dtype)
    with torch.no_grad():
        ids = ours_generate(ours, None)()  # (B, N)
    tok_off = None
    if lib is not None:
        tok_off = off.official_model(lib.TiTok, tok)
        check_titok_decode(tok, tok_fast, tok_off, ids, device, dtype)

    def pixels(t, gen_fn):  # the official sample_fn: generate, decode_tokens(ids.view(B, -1)), clamp
        return lambda: t.decode_tokens(gen_fn().view(b, -1)).float().clamp_(0.0, 1.0)

    def official_e2e(amp):
        return _under_autocast(device, amp, pixels(tok_off, official_generate))

    def variants_of(graph: bool | None) -> dict:
        v = {"fp32": (torch.float32, {"decode": lambda: tok.decode_tokens(ids),
                                      "e2e": pixels(tok, ours_generate(ours, graph))}),
             "fast": (dtype, {"decode": lambda: tok_fast.decode_tokens(ids),
                              "e2e": pixels(tok_fast, ours_generate(fast, graph))}),
             "reference_mode": (torch.float32, {"decode": _in_reference_mode(lambda: tok.decode_tokens(ids)),
                                                "e2e": _in_reference_mode(pixels(tok, ours_generate(ours, False,
                                                                                                    "torch")))})}
        if "compiled" in args.variants:
            tc, gc = compiled_model(tok_fast, args), compiled_model(fast, args)
            v["compiled"] = (dtype, {"decode": lambda: tc.decode_tokens(ids),
                                     "e2e": pixels(tc, ours_generate(gc, graph))})
        if tok_off is not None:
            v = {"official_fp32": (torch.float32, {"decode": lambda: tok_off.decode_tokens(ids),
                                                   "e2e": official_e2e(torch.float32)}),
                 "official_autocast": (dtype, {"decode": _under_autocast(device, dtype,
                                                                         lambda: tok_off.decode_tokens(ids)),
                                               "e2e": official_e2e(dtype)}), **v}
        return v

    def rename(variants: dict, case: str) -> dict:
        return {k: (dt, {case: fns[case if case == "decode" else "e2e"]}) for k, (dt, fns) in variants.items()}

    tok_label = "tiny" if args.quick else tok_name
    shapes = f"{name} + {tok_label} B={b} steps={steps}"
    v = variants_of(None)
    out.append(make_case("generate", "decode", f"{tok_label} B={b}", b, rename(v, "decode"), args.variants))
    out.append(make_case("generate", "class-to-image", shapes, b, rename(v, "class-to-image"), args.variants))
    if device == "cuda":
        out.append(make_case("generate", EAGER_LOOP_CASE, shapes, b, rename(variants_of(False), EAGER_LOOP_CASE),
                             args.variants))
        notes.append(f"class-to-image: ours samples with noise='philox' and the CUDA-graph loop; "
                     f"'{EAGER_LOOP_CASE}': the same without the graph; reference_mode: noise='torch'")
    return out


def official_generator(cls: type, ours):
    """The official ImageBert / UViTBert from ours.config with our weights (strict load). Built
    for real, not on meta as official.official_model does: BERT's position_ids/token_type_ids
    are non-persistent buffers, in no state dict."""
    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng(devices=[]):
        model = cls(copy.deepcopy(ours.config))
    model.load_state_dict({k: v.detach().float() for k, v in ours.state_dict().items()}, strict=True)
    return model.to(next(ours.parameters()).device).eval().requires_grad_(False)


def check_generate_agreement(ours, official, labels: torch.Tensor, settings: dict, seed: int = 0) -> None:
    """Ours (fp32, noise='torch') and the official generate after the same manual_seed: equal ids."""
    kw = {**settings, "num_sample_steps": min(settings["num_sample_steps"], CHECK_STEPS)}
    torch.manual_seed(seed)
    got = ours.generate(labels, **kw, noise="torch", use_cuda_graph=False)
    torch.manual_seed(seed)
    want = official.generate(labels.clone(), **kw)
    off.check_equal_ids(f"MaskGIT generate (fp32, noise='torch', seed {seed}, {kw['num_sample_steps']} steps)",
                        got, want)
