"""End to end pipelines:
    TextToImage   captions -> CLIP -> MaskGen -> tokens -> TA-TiTok -> images
    ClassToImage  ImageNet class ids/names -> MaskGIT (ImageBert / UViTBert) -> ids -> TiTok -> images
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ, _check_captions
from tatitok_fast.models.tokenizers.tatitok import TATiTok


def is_class_generator(generator) -> bool:
    """A class-conditional MaskGIT generator (ImageBert / UViTBert): a generate() and a config with
    model.generator (a TiTok's config may hold model.generator too: the official yamls share it)."""
    config = getattr(generator, "config", None)
    return callable(getattr(generator, "generate", None)) and isinstance(config, Mapping) and \
        isinstance(config.get("model"), Mapping) and isinstance(config["model"].get("generator"), Mapping)


def check_compatible(generator, tokenizer) -> None:
    """Raise ValueError unless `tokenizer` decodes the tokens `generator` makes (kind, token
    count, codebook size, token width), before any compute. MaskGen needs a TATiTok; an
    ImageBert / UViTBert needs a discrete tokenizer (TiTok VQ or two-stage) of its vocabulary
    and token count."""
    if is_class_generator(generator):
        return _check_class_compatible(generator, tokenizer)
    if not isinstance(tokenizer, TATiTok):
        raise TypeError(f"tokenizer: expected a TATiTok, got {type(tokenizer).__name__}")
    want_mode = "vq" if isinstance(generator, MaskGen_VQ) else "vae" if isinstance(generator, MaskGen_KL) else None
    if want_mode is None:
        raise TypeError(f"generator: expected a MaskGen_VQ or MaskGen_KL, got {type(generator).__name__}")
    vq = generator.config["model"]["vq_model"]
    problems = []
    if tokenizer.quantize_mode != want_mode:
        problems.append(f"the generator makes {'discrete (VQ)' if want_mode == 'vq' else 'continuous (KL)'} tokens "
                        f"but the tokenizer is a {tokenizer.quantize_mode} tokenizer")
    else:
        if tokenizer.num_latent_tokens != vq["num_latent_tokens"]:
            problems.append(f"token count: generator {vq['num_latent_tokens']}, tokenizer {tokenizer.num_latent_tokens}")
        if tokenizer.token_size != vq["token_size"]:
            problems.append(f"token_size: generator {vq['token_size']}, tokenizer {tokenizer.token_size}")
        if want_mode == "vq" and tokenizer.codebook_size != vq["codebook_size"]:
            problems.append(f"codebook size: generator {vq['codebook_size']}, tokenizer {tokenizer.codebook_size}")
        if tokenizer.decoder.text_context_length != generator.text_context_length:
            problems.append(f"text_context_length (CLIP tokens per caption): generator "
                            f"{generator.text_context_length}, tokenizer {tokenizer.decoder.text_context_length}")
    if problems:
        raise ValueError("generator/tokenizer mismatch: " + "; ".join(problems))


def _class_generator_spec(generator) -> tuple[int, int, int]:
    """(codebook size, token count, number of classes) of an ImageBert / UViTBert."""
    model = generator.config["model"]
    gen, vq = model["generator"], model.get("vq_model", {})
    codebook = getattr(generator, "target_codebook_size", None) or vq.get("codebook_size")
    tokens = getattr(generator, "image_seq_len", None) or gen.get("image_seq_len")
    classes = getattr(generator, "condition_num_classes", None) or gen.get("condition_num_classes")
    return int(codebook), int(tokens), int(classes)


def _check_class_compatible(generator, tokenizer) -> None:
    codebook, tokens, _ = _class_generator_spec(generator)
    if isinstance(tokenizer, TATiTok):
        raise TypeError("tokenizer: a TA-TiTok decodes with text guidance; a class generator needs a TiTok")
    if not callable(getattr(tokenizer, "decode_tokens", None)):
        raise TypeError(f"tokenizer: expected a TiTok (with decode_tokens), got {type(tokenizer).__name__}")
    problems = []
    mode = getattr(tokenizer, "quantize_mode", "vq")
    if mode != "vq":
        problems.append(f"the generator makes discrete ids but the tokenizer is a {mode} tokenizer")
    else:
        if tokenizer.num_latent_tokens != tokens:
            problems.append(f"token count: generator {tokens}, tokenizer {tokenizer.num_latent_tokens}")
        if tokenizer.codebook_size != codebook:
            problems.append(f"codebook size: generator vocabulary {codebook}, tokenizer {tokenizer.codebook_size}")
    if problems:
        raise ValueError("generator/tokenizer mismatch: " + "; ".join(problems))


class TextToImage:
    """`pipe(prompts) -> (B, 3, H, W)` images in [0, 1].

    generator: MaskGen_VQ or MaskGen_KL; tokenizer: the TATiTok it was trained on;
    text_encoder: a CLIPTextEncoder (its final-layer states guide the tokenizer's decoder,
    its penultimate states and pooled embedding condition the generator).
    """

    def __init__(self, generator, tokenizer: TATiTok, text_encoder):
        check_compatible(generator, tokenizer)
        self.generator, self.tokenizer, self.text_encoder = generator, tokenizer, text_encoder

    @torch.no_grad()
    def tokens(self, prompts: Sequence[str], *, steps: int | None = None, cfg: float | None = None,
               aesthetic: float | None = None, temperature: float | None = None,
               generator: torch.Generator | None = None, use_cuda_graph: bool | None = None) -> torch.Tensor:
        prompts = _check_captions(prompts)
        mg = self.generator.config["model"]["maskgen"]
        if isinstance(self.generator, MaskGen_VQ):
            return self.generator.generate(
                prompts, guidance_scale=mg.get("cfg", 12.0) if cfg is None else cfg,
                randomize_temperature=mg.get("temperature", 2.0) if temperature is None else temperature,
                sample_aesthetic_score=aesthetic, num_sample_steps=mg.get("num_iter", 16) if steps is None else steps,
                text_encoder=self.text_encoder, generator=generator, use_cuda_graph=use_cuda_graph)
        return self.generator.sample_tokens(
            len(prompts), num_iter=mg.get("num_iter", 32) if steps is None else steps,
            cfg=mg.get("cfg", 3.0) if cfg is None else cfg, cfg_schedule=mg.get("cfg_schedule", "linear"),
            captions=prompts, aes_scores=mg.get("sample_aesthetic_score", 6.5) if aesthetic is None else aesthetic,
            temperature=mg.get("temperature", 1.0) if temperature is None else temperature,
            text_encoder=self.text_encoder, generator=generator, use_cuda_graph=use_cuda_graph)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer.detokenize(tokens, list(prompts), text_encoder=self.text_encoder)

    def __call__(self, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        prompts = _check_captions(prompts)
        return self.decode(self.tokens(prompts, **kwargs), prompts)


# the official generate()'s defaults (modeling/maskgit.py:110-117), the generator config's
# sampling keys over them, and softmax temperature annealing on, as sample_imagenet_titok.py
# runs it for the published FIDs (TITOK.md 10)
_GENERATE_DEFAULTS = {"guidance_scale": 3.0, "guidance_decay": "constant", "guidance_scale_pow": 3.0,
                      "randomize_temperature": 4.5, "softmax_temperature_annealing": True, "num_sample_steps": 8}
_CONFIG_KEYS = {"guidance_scale": "guidance_scale", "guidance_decay": "guidance_decay",
                "guidance_scale_pow": "guidance_scale_pow", "randomize_temperature": "randomize_temperature",
                "num_sample_steps": "num_steps"}
GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")


def sampling_settings(generator, **overrides: Any) -> dict:
    """generate() keyword arguments for a class generator: the official defaults, then its
    config's model.generator sampling keys, then `overrides` (None values ignored)."""
    gen = generator.config["model"]["generator"]
    out = dict(_GENERATE_DEFAULTS)
    out.update({k: gen[c] for k, c in _CONFIG_KEYS.items() if gen.get(c) is not None})
    unknown = set(overrides) - set(out)
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: v for k, v in overrides.items() if v is not None})
    if out["guidance_decay"] not in GUIDANCE_DECAYS:
        raise ValueError(f"guidance_decay: expected one of {GUIDANCE_DECAYS}, got {out['guidance_decay']!r}")
    if not (isinstance(out["num_sample_steps"], int) and out["num_sample_steps"] >= 1):
        raise ValueError(f"num_sample_steps: expected an int >= 1, got {out['num_sample_steps']!r}")
    return out


class ClassToImage:
    """`pipe(classes) -> (B, 3, H, W)` images in [0, 1] (clamped, as the official sample_fn).

    generator: ImageBert or UViTBert; tokenizer: the TiTok whose ids it generates. classes:
    ids or ImageNet class names (tatitok_fast.imagenet_classes), or a (B,) int tensor.
    Sampling draws on the global RNG of the generator's device (the official generate() does):
    seed with torch.manual_seed for reproducible images.
    """

    def __init__(self, generator, tokenizer):
        if not is_class_generator(generator):
            raise TypeError(f"generator: expected an ImageBert or UViTBert (a config with model.generator), "
                            f"got {type(generator).__name__}")
        check_compatible(generator, tokenizer)
        self.generator, self.tokenizer = generator, tokenizer
        self.num_classes = _class_generator_spec(generator)[2]

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def labels(self, classes) -> torch.Tensor:
        """classes -> (B,) int64 labels on the generator's device; ValueError naming a bad one."""
        from tatitok_fast.imagenet_classes import check_class_id, resolve_class

        if isinstance(classes, torch.Tensor):
            if classes.dim() != 1 or classes.dtype.is_floating_point or classes.numel() == 0:
                raise ValueError(f"classes: expected a non-empty (B,) integer tensor, got {classes.dtype} "
                                 f"{tuple(classes.shape)}")
            bad = classes[(classes < 0) | (classes >= self.num_classes)]
            if bad.numel():
                check_class_id(int(bad[0]), self.num_classes, "classes")
            return classes.to(self.device, torch.long)
        if isinstance(classes, (int, str)):
            classes = [classes]
        ids = [resolve_class(c, self.num_classes, "classes") for c in classes]
        if not ids:
            raise ValueError("classes: expected at least one class")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def settings(self, **overrides: Any) -> dict:
        return sampling_settings(self.generator, **overrides)

    @torch.no_grad()
    def tokens(self, classes, *, noise: str | None = None, use_cuda_graph: bool | None = None,
               **overrides: Any) -> torch.Tensor:
        """(B, N) int64 ids. overrides: generate()'s sampling arguments (see settings());
        noise: "torch" (the official RNG draws, generate()'s default) or "philox" (in-kernel,
        CUDA-graph capturable)."""
        extra = {"use_cuda_graph": use_cuda_graph} if use_cuda_graph is not None else {}
        if noise is not None:
            extra["noise"] = noise
        return self.generator.generate(self.labels(classes), **self.settings(**overrides), **extra)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(ids.view(ids.shape[0], -1)).float().clamp_(0.0, 1.0)

    def __call__(self, classes, **overrides: Any) -> torch.Tensor:
        return self.decode(self.tokens(classes, **overrides))
