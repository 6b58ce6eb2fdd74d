"""The official model zoo: config (in the official config.json schema) and where the weights
live, for the six TA-TiTok tokenizers, the four MaskGen generators, the nine TiTok tokenizers
and the three TiTok MaskGIT generators (ImageBert / UViTBert)."""
from __future__ import annotations

import copy

# Hub repos (config.json + model.safetensors) and the raw state dicts of fun-research/TA-TiTok.
RAW_WEIGHTS_REPO = "fun-research/TA-TiTok"


def _vq_model(mode: str, tokens: int, enc: str = "base") -> dict:
    if mode == "vq":
        head = {"quantize_mode": "vq", "codebook_size": 8192, "token_size": 64, "use_l2_norm": False,
                "commitment_cost": 0.25, "clustering_vq": False}
    else:
        head = {"quantize_mode": "vae", "token_size": 16}
    return {**head, "vit_enc_model_size": enc, "vit_dec_model_size": "large", "vit_enc_patch_size": 16,
            "vit_dec_patch_size": 16, "num_latent_tokens": tokens, "finetune_decoder": False, "is_legacy": False}


def _tokenizer(mode: str, tokens: int, enc: str = "base") -> dict:
    return {"model": {"vq_model": _vq_model(mode, tokens, enc)}, "dataset": {"preprocessing": {"crop_size": 256}}}


def _maskgen_vq(width: int, depth: int) -> dict:
    return {"model": {"vq_model": _vq_model("vq", 128),
                      "maskgen": {"decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": 16,
                                  "micro_condition": True, "micro_condition_embed_dim": 256, "text_drop_prob": 0.1,
                                  "condition_num_classes": 1000, "cfg": 12.0, "num_iter": 16, "temperature": 2.0,
                                  "sample_aesthetic_score": 6.5}},
            "dataset": {"preprocessing": {"crop_size": 256}}}


def _maskgen_kl(width: int, depth: int) -> dict:
    vq = _vq_model("vae", 32)
    vq = {**{k: v for k, v in vq.items() if k not in ("finetune_decoder", "is_legacy")}, "scale_factor": 0.7525,
          "finetune_decoder": False, "is_legacy": False}
    return {"model": {"vq_model": vq,
                      "maskgen": {"decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": 16,
                                  "micro_condition": True, "micro_condition_embed_dim": 256, "text_drop_prob": 0.1,
                                  "cfg": 3.0, "cfg_schedule": "linear", "num_iter": 32, "temperature": 1.0,
                                  "sample_aesthetic_score": 6.5}},
            "losses": {"diffloss_d": 8, "diffloss_w": width},
            "dataset": {"preprocessing": {"crop_size": 256}}}


TOKENIZERS = {
    "tatitok_bl32_vq": _tokenizer("vq", 32),
    "tatitok_bl64_vq": _tokenizer("vq", 64),
    "tatitok_bl128_vq": _tokenizer("vq", 128),
    "tatitok_bl32_vae": _tokenizer("vae", 32),
    "tatitok_bl64_vae": _tokenizer("vae", 64),
    "tatitok_sl128_vae": _tokenizer("vae", 128, enc="small"),
}
GENERATORS = {
    "maskgen_vq_l": _maskgen_vq(1024, 16),
    "maskgen_vq_xl": _maskgen_vq(1280, 20),
    "maskgen_kl_l": _maskgen_kl(1024, 16),
    "maskgen_kl_xl": _maskgen_kl(1280, 20),
}
# preset name -> Hub repo holding config.json + model.safetensors
HUB_REPOS = {**{n: f"turkeyju/tokenizer_{n}" for n in TOKENIZERS}, **{n: f"turkeyju/generator_{n}" for n in GENERATORS}}
# Hub repo -> preset name
PRESET_OF_REPO = {repo: name for name, repo in HUB_REPOS.items()}


# ---------------------------------------------------------------------------------------
# TiTok ("An Image is Worth 32 Tokens"): configs/infer/TiTok/*.yaml without `experiment`,
# interpolations resolved. The tokenizer and the generator of one name share one yaml, so
# titok_l32 is both a tokenizer preset and a generator preset (with the same config).

TITOK_RAW_WEIGHTS_REPO = "fun-research/TiTok"  # raw .bin state dicts (experiment.*_checkpoint)
MASKGIT_VQGAN_FILE = "maskgit-vqgan-imagenet-f16-256.bin"  # in TITOK_RAW_WEIGHTS_REPO
MASKGIT_VQGAN = "maskgit_vqgan"  # the preset name of the MaskGIT-VQGAN (a PretrainedTokenizer, no config.json)
MASKGIT_VQGAN_CONFIG = {"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0, "hidden_channels": 128,
                        "num_channels": 3, "num_res_blocks": 2, "resolution": 256, "z_channels": 256}
MASKGIT_VQGAN_CODEBOOK = (1024, 256)  # (codes, channels)

# generator model_type -> the official class (modeling/maskgit.py)
TITOK_GENERATOR_CLASSES = {"ViT": "ImageBert", "UViT": "UViTBert"}


def _titok_vq_model(enc: str, dec: str, tokens: int, mode: str) -> dict:
    geometry = {"vit_enc_model_size": enc, "vit_dec_model_size": dec, "vit_enc_patch_size": 16,
                "vit_dec_patch_size": 16, "num_latent_tokens": tokens}
    if mode == "two_stage":  # the yaml sets neither quantize_mode nor is_legacy (defaults: "vq", True)
        return {"codebook_size": 4096, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25, **geometry,
                "finetune_decoder": True}
    if mode == "vq":
        return {"codebook_size": 8192, "token_size": 64, "use_l2_norm": False, "commitment_cost": 0.25, **geometry,
                "finetune_decoder": False, "is_legacy": False}
    return {"quantize_mode": "vae", "token_size": 16, **geometry, "finetune_decoder": False, "is_legacy": False}


def _titok_generator(model_type: str, tokens: int, randomize_temperature: float, guidance_scale: float,
                     guidance_decay: str) -> dict:
    size = {"ViT": {"hidden_size": 768, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 3072},
            "UViT": {"hidden_size": 1024, "num_hidden_layers": 20, "num_attention_heads": 16,
                     "intermediate_size": 4096}}[model_type]
    return {"model_type": model_type, **size, "dropout": 0.1, "attn_drop": 0.1,
            "num_steps": 8 if model_type == "ViT" else 64, "class_label_dropout": 0.1, "image_seq_len": tokens,
            "condition_num_classes": 1000, "randomize_temperature": randomize_temperature,
            "guidance_scale": guidance_scale, "guidance_decay": guidance_decay}


def _titok(enc: str, dec: str, tokens: int, mode: str, generator: dict | None = None) -> dict:
    model = {"vq_model": _titok_vq_model(enc, dec, tokens, mode)}
    if generator is not None:
        model["generator"] = generator
    return {"model": model, "dataset": {"preprocessing": {"crop_size": 256}}}


TITOK_TOKENIZERS = {
    "titok_l32": _titok("large", "large", 32, "two_stage", _titok_generator("ViT", 32, 9.5, 4.5, "linear")),
    "titok_b64": _titok("base", "base", 64, "two_stage", _titok_generator("ViT", 64, 11.0, 3.0, "linear")),
    "titok_s128": _titok("small", "small", 128, "two_stage",
                         _titok_generator("UViT", 128, 2.8, 6.9, "power-cosine")),
    "titok_bl64_vq8k": _titok("base", "large", 64, "vq"),
    "titok_bl128_vq8k": _titok("base", "large", 128, "vq"),
    "titok_sl256_vq8k": _titok("small", "large", 256, "vq"),
    "titok_ll32_vae_c16": _titok("large", "large", 32, "vae"),
    "titok_bl64_vae_c16": _titok("base", "large", 64, "vae"),
    "titok_bl128_vae_c16": _titok("base", "large", 128, "vae"),
}
# the generators share their tokenizer's yaml (model.generator is the MaskGIT part)
TITOK_GENERATORS = {name: TITOK_TOKENIZERS[name] for name in ("titok_l32", "titok_b64", "titok_s128")}
TITOK_HUB_REPOS = {n: f"yucornetto/tokenizer_{n}_imagenet" for n in TITOK_TOKENIZERS}
TITOK_GENERATOR_HUB_REPOS = {n: f"yucornetto/generator_{n}_imagenet" for n in TITOK_GENERATORS}
# raw .bin in TITOK_RAW_WEIGHTS_REPO -> (preset name, "tokenizer" | "generator")
TITOK_RAW_FILES = {
    **{(f"tokenizer_{n}.bin" if "vae" not in n else f"{n}.bin"): (n, "tokenizer") for n in TITOK_TOKENIZERS},
    **{f"generator_{n}.bin": (n, "generator") for n in TITOK_GENERATORS},
}
PRESET_OF_REPO.update({repo: name for name, repo in TITOK_HUB_REPOS.items()})
PRESET_OF_REPO.update({repo: name for name, repo in TITOK_GENERATOR_HUB_REPOS.items()})

ALL_TOKENIZERS = {**TOKENIZERS, **TITOK_TOKENIZERS}  # every tokenizer preset name (TA-TiTok + TiTok)
ALL_GENERATORS = {**GENERATORS, **TITOK_GENERATORS}


def preset_config(name: str) -> dict:
    """A deep copy of a zoo model's official config; KeyError lists the known names."""
    table = {**TOKENIZERS, **GENERATORS, **TITOK_TOKENIZERS}
    if name not in table:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(table)}")
    return copy.deepcopy(table[name])


def hub_repo(name: str, role: str = "tokenizer") -> str:
    """The Hub repo (config.json + weights) of preset `name`; role ("tokenizer" or "generator")
    picks between a TiTok tokenizer and its generator, which share a preset name."""
    if role not in ("tokenizer", "generator"):
        raise ValueError(f"role: expected 'tokenizer' or 'generator', got {role!r}")
    if name in TITOK_TOKENIZERS:
        table = TITOK_GENERATOR_HUB_REPOS if role == "generator" else TITOK_HUB_REPOS
        if name not in table:
            raise KeyError(f"{name!r} is a TiTok tokenizer without a released generator; TiTok generators: "
                           f"{sorted(TITOK_GENERATOR_HUB_REPOS)}")
        return table[name]
    if name not in HUB_REPOS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted({**HUB_REPOS, **TITOK_HUB_REPOS})}")
    return HUB_REPOS[name]


def titok_generator_config(name: str) -> dict:
    """The official config (whole yaml: model.vq_model + model.generator + dataset) of TiTok
    generator preset `name` ("titok_l32", "titok_b64", "titok_s128"); KeyError lists them."""
    if name not in TITOK_GENERATORS:
        raise KeyError(f"unknown TiTok generator preset {name!r}; known: {sorted(TITOK_GENERATORS)}")
    return copy.deepcopy(TITOK_GENERATORS[name])


def titok_generator_class_name(config: dict) -> str:
    """"ImageBert" or "UViTBert": the official class for config's model.generator.model_type."""
    model_type = ((config.get("model") or {}).get("generator") or {}).get("model_type")
    if model_type not in TITOK_GENERATOR_CLASSES:
        raise ValueError(f"config: model.generator.model_type must be one of {sorted(TITOK_GENERATOR_CLASSES)}, "
                         f"got {model_type!r}")
    return TITOK_GENERATOR_CLASSES[model_type]


# ---------------------------------------------------------------------------------------
# Tiny random architectures for tests and quick benchmarks (official schema, small sizes)

TINY_TEXT_WIDTH = 64  # their text_embed_dim: a 64-wide CLIP text tower


def tiny_tokenizer_config(mode: str = "vq", tokens: int = 16, crop: int = 32) -> dict:
    """A small-ViT tokenizer on crop x crop images with a 64-wide text guidance."""
    vq = {"quantize_mode": mode, "token_size": 8 if mode == "vq" else 4, "vit_enc_model_size": "small",
          "vit_dec_model_size": "small", "vit_enc_patch_size": 16, "vit_dec_patch_size": 16,
          "num_latent_tokens": tokens, "finetune_decoder": False, "is_legacy": False, "text_embed_dim": TINY_TEXT_WIDTH}
    if mode == "vq":
        vq.update(codebook_size=64, use_l2_norm=False, commitment_cost=0.25, clustering_vq=False)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": crop}}}


def tiny_generator_config(mode: str = "vq", tokens: int = 16) -> dict:
    """A 2-block, 64-wide MaskGen over the matching tiny tokenizer."""
    cfg = tiny_tokenizer_config(mode, tokens)
    mg = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4, "micro_condition": True,
          "micro_condition_embed_dim": 256, "text_drop_prob": 0.1, "sample_aesthetic_score": 6.5}
    if mode == "vq":
        mg.update(condition_num_classes=10, cfg=12.0, num_iter=8, temperature=2.0)
    else:
        cfg["model"]["vq_model"]["scale_factor"] = 0.7525
        mg.update(cfg=3.0, cfg_schedule="linear", num_iter=6, temperature=1.0)
        cfg["losses"] = {"diffloss_d": 2, "diffloss_w": 32, "num_sampling_steps": "10"}
    cfg["model"]["maskgen"] = mg
    return cfg


def tiny_titok_config(mode: str = "vq", tokens: int = 8, crop: int = 32, two_stage: bool = False) -> dict:
    """A tiny-ViT TiTok (no text path) on crop x crop images: single-stage VQ (l2-normalised
    codes) or VAE, or two-stage (is_legacy decoder + the full-size MaskGIT-VQGAN pixel decoder)."""
    vq = {"vit_enc_model_size": "tiny", "vit_dec_model_size": "tiny", "vit_enc_patch_size": 16,
          "vit_dec_patch_size": 16, "num_latent_tokens": tokens}
    if two_stage:
        vq.update(codebook_size=64, token_size=12, use_l2_norm=True, commitment_cost=0.25, finetune_decoder=True)
    elif mode == "vq":
        vq.update(codebook_size=64, token_size=8, use_l2_norm=True, commitment_cost=0.25, finetune_decoder=False,
                  is_legacy=False)
    else:
        vq.update(quantize_mode="vae", token_size=4, finetune_decoder=False, is_legacy=False)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": crop}}}
