"""The official model zoo: config (in the official config.json schema) and where the weights
live, for the six TA-TiTok tokenizers and the four MaskGen generators."""
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


def preset_config(name: str) -> dict:
    """A deep copy of a zoo model's official config; KeyError lists the known names."""
    table = {**TOKENIZERS, **GENERATORS}
    if name not in table:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(table)}")
    return copy.deepcopy(table[name])


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
