"""MaskGen text-to-image generators on TA-TiTok tokens, drop-ins for the reference
`modeling.maskgen.MaskGen_VQ` / `MaskGen_KL` (same configs, same state-dict keys).

    captions -> CLIP (penultimate states (B, 77, 768), pooled (B, 1, 768))
             -> MM-DiT over [tokens; text] -> VQ logits (B, N, K) | KL per-token condition
             -> fused unmask step (VQ) | DiffLoss sampling (KL) -> tokens -> TA-TiTok decoder

Sampling runs on static shapes: the per-step schedule (temperatures, guidance, how many
tokens stay masked) is computed on the host before the loop, CFG runs as one batch, the
empty-prompt condition is cached, and nothing inside the loop synchronises with the host, so
on CUDA the whole loop is captured once as a CUDA graph and replayed.

This module re-exports the public names; the code lives in
    maskgen_schedules.py  masking ratios, sinusoid codes, VQStep/KLStep, sampling-arg checks
    text_conditions.py    caption checks, CLIP conditions, cached empty prompt
    graph_runner.py       the CUDA-graph cache
    maskgen_base.py       what both generators share
    maskgen_vq.py, maskgen_kl.py  the two generators
"""
from __future__ import annotations

# re-exports (the underscored names are used by pipeline.py and tests)
from tatitok_fast.models.generators.graph_runner import _GraphRunner, _use_graph
from tatitok_fast.models.generators.maskgen_base import _mask_by_order, _MaskGenBase, _validate_generator_config
from tatitok_fast.models.generators.maskgen_kl import MaskGen_KL
from tatitok_fast.models.generators.maskgen_schedules import (GUIDANCE_DECAYS, MASK_SCHEDULES, KLStep, VQStep,
                                                   _check_sampling_args, get_masking_ratio, sinusoid_halves,
                                                   sinusoid_interleaved)
from tatitok_fast.models.generators.maskgen_vq import MaskGen_VQ, TiedLMHead
from tatitok_fast.models.generators.text_conditions import _check_captions, _check_text_states, text_conditions

__all__ = ["MaskGen_VQ", "MaskGen_KL", "load_generator", "get_masking_ratio", "sinusoid_halves",
           "sinusoid_interleaved", "text_conditions", "TiedLMHead", "VQStep", "KLStep", "GUIDANCE_DECAYS",
           "MASK_SCHEDULES"]


def load_generator(name_or_path, **kwargs) -> "MaskGen_VQ | MaskGen_KL":
    """MaskGen_VQ or MaskGen_KL, whichever the checkpoint's config describes (arguments as
    PretrainedModel.from_pretrained)."""
    return _MaskGenBase.from_pretrained(name_or_path, **kwargs)
