"""Text to image end to end: captions -> CLIP -> MaskGen -> tokens -> TA-TiTok -> images."""
from __future__ import annotations

from typing import Sequence

import torch

from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ, _check_captions
from tatitok_fast.models.tokenizers.tatitok import TATiTok


def check_compatible(generator: MaskGen_VQ | MaskGen_KL, tokenizer: TATiTok) -> None:
    """Raise ValueError unless `tokenizer` decodes the tokens `generator` makes (kind, token
    count, codebook size, token width), before any compute."""
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
