"""What MaskGen-VQ and MaskGen-KL share: conditioning settings, caption dropout, the
CUDA-graph cache, config validation and the mask-by-order dispatch."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch

from tatitok_fast import ops
from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.generators.graph_runner import _GraphRunner
from tatitok_fast.models.nn.pretrained import PretrainedModel
from tatitok_fast.models.generators.text_conditions import _check_captions, text_conditions
from tatitok_fast.ops.reference import mask_by_order_ref


class _MaskGenBase(PretrainedModel):
    """What both generators share: the text conditioning settings, caption dropout for
    training, and the CUDA-graph cache."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        vq, mg = self.config["model"]["vq_model"], self.config["model"]["maskgen"]
        self.text_embed_dim = vq.get("text_embed_dim", 768)
        self.text_context_length = vq.get("text_context_length", 77)  # the tokenizer's key: CLIP tokens per caption
        self.micro_condition = mg.get("micro_condition", False)
        self.micro_condition_embed_dim = mg.get("micro_condition_embed_dim", 256)
        self.sample_aesthetic_score = mg.get("sample_aesthetic_score", 6.0)
        self.text_drop_prob = mg.get("text_drop_prob", 0.1)
        self._graphs = _GraphRunner()

    # quantize mode -> generator class; each subclass registers itself (no import back)
    _by_quantize_mode: ClassVar[dict[str, type["_MaskGenBase"]]] = {}
    config_quantize_mode: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.config_quantize_mode is not None:
            _MaskGenBase._by_quantize_mode[cls.config_quantize_mode] = cls

    @classmethod
    def class_for_config(cls, config: Mapping[str, Any]) -> type[PretrainedModel]:
        if cls is not _MaskGenBase:
            return cls
        mode = cfg_get(config, "model.vq_model.quantize_mode", "vq")
        if mode not in cls._by_quantize_mode:
            raise ValueError(f"model.vq_model.quantize_mode: expected one of {sorted(cls._by_quantize_mode)}, "
                             f"got {mode!r}")
        return cls._by_quantize_mode[mode]

    @property
    def pooled_input_dim(self) -> int:
        """Width of the pooled condition: CLIP's pooled embedding [+ the aesthetic code]."""
        return self.text_embed_dim + (self.micro_condition_embed_dim if self.micro_condition else 0)

    def preprocess_condition(self, captions, text_encoder=None, clip_tokenizer=None, clip_encoder=None,
                             generator: torch.Generator | None = None):
        """Training conditions: CLIP states, each caption replaced by "" with p=text_drop_prob."""
        captions = _check_captions(captions)
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder,
                                                       context_length=self.text_context_length)
        # (B, 1, 1), drawn on the generator's device (the CPU default generator when None)
        where = generator.device if generator is not None else "cpu"
        drop = (torch.rand(len(captions), 1, 1, generator=generator, device=where) < self.text_drop_prob).to(cond)
        return cond * (1 - drop) + null_c * drop, pooled * (1 - drop) + null_p * drop


def aesthetic_scores(value, batch: int, default: float, device: torch.device, name: str) -> torch.Tensor:
    """The aesthetic micro-condition as (batch,) fp32 on `device`. value: None (the config's
    `default`), a number, a 0-d tensor, a (batch,) tensor or a sequence of `batch` numbers."""
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor, list, tuple)):
        raise TypeError(f"{name}: expected None, a number, or a (B,) tensor of scores, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite score, got {value!r}")
        return torch.full((batch,), float(value), device=device)
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected real scores, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected one score per sample, shape ({batch},), or a single score, "
                         f"got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _mask_by_order(orders, mask, mask_len, last_step):
    if ops.use_fused("mask_by_order", orders.device):
        return ops.mask_by_order(orders, mask, mask_len, last_step)
    return mask_by_order_ref(orders, mask, mask_len, last_step)


def _validate_generator_config(config: Mapping[str, Any], mode: str) -> None:
    vq, mg = cfg_get(config, "model.vq_model"), cfg_get(config, "model.maskgen")
    if not isinstance(vq, Mapping) or not isinstance(mg, Mapping):
        raise ValueError("config: expected a generator config with model.vq_model and model.maskgen")
    got = vq.get("quantize_mode", "vq")
    if got != mode:
        want = "MaskGen_VQ" if got == "vq" else "MaskGen_KL"
        raise ValueError(f"config: model.vq_model.quantize_mode is {got!r}: this is a {want} config")
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if not isinstance(mg.get(key), int) or mg[key] <= 0:
            raise ValueError(f"config: model.maskgen.{key} must be a positive int, got {mg.get(key)!r}")
    if mg["decoder_embed_dim"] % mg["decoder_num_heads"]:
        raise ValueError("config: model.maskgen.decoder_embed_dim must be divisible by decoder_num_heads")
    for key in ("num_latent_tokens", "token_size") + (("codebook_size",) if mode == "vq" else ()):
        if not isinstance(vq.get(key), int) or vq[key] <= 0:
            raise ValueError(f"config: model.vq_model.{key} must be a positive int, got {vq.get(key)!r}")
