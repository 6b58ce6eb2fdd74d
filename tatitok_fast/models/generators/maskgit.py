"""TiTok's class-conditional MaskGIT generators, drop-ins for the official
`modeling.maskgit.ImageBert` / `UViTBert` (same config, same state-dict keys; no
`transformers` needed):

    class ids (B,) -> [class token; N image ids] -> BERT (ImageBert) | U-ViT (UViTBert)
                   -> logits (B, N, K) -> fused unmask step -> ids (B, N) in [0, K)

Token space (official maskgit.py:89-93): 0..K-1 image codes, K the mask token, K+1..K+C the
classes, K+1+C the class-drop ("null") token.

generate() keeps the official schedule (constant / linear / power-cosine guidance, annealed
Gumbel temperature, optional softmax-temperature annealing, arccos re-masking with the count
taken from batch row 0). The per-step constants are computed on the host before the loop, the
CFG batch [cond; uncond] runs as one forward, the confidence/re-mask step is the fused
`maskgen_unmask_step` op, and nothing in the loop synchronises with the host, so on CUDA the
loop is captured once as a CUDA graph (noise="philox"). noise="torch" (the default) draws the
noise from torch's RNG in the official order (per step: one torch.rand(B) per official
forward, then U(B, N, K), then U(B, N)), so after torch.manual_seed(s) the ids equal those
of the official ImageBert.generate after torch.manual_seed(s) in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast import ops
from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.generators.graph_runner import _GraphRunner, _use_graph, graph_key
from tatitok_fast.models.generators.maskgen_schedules import _check_sampling_args, get_masking_ratio
from tatitok_fast.models.generators.maskgit_blocks import BertCore, UViTBlock
from tatitok_fast.models.nn.layers import Linear, host_checkable
from tatitok_fast.models.nn.pretrained import PretrainedModel
from tatitok_fast.ops.reference import gumbel_noise, maskgen_unmask_step_ref

GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")
NOISE_MODES = ("torch", "philox")
_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "condition_num_classes", "image_seq_len")


def _validate_maskgit_config(config: Mapping[str, Any]) -> None:
    vq, gen = cfg_get(config, "model.vq_model"), cfg_get(config, "model.generator")
    if not isinstance(vq, Mapping) or not isinstance(gen, Mapping):
        raise ValueError("config: expected a TiTok generator config with model.vq_model and model.generator")
    size = vq.get("codebook_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"config: model.vq_model.codebook_size must be a positive int, got {size!r}")
    for key in _INT_KEYS:
        v = gen.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"config: model.generator.{key} must be a positive int, got {v!r}")
    if gen["hidden_size"] % gen["num_attention_heads"]:
        raise ValueError("config: model.generator.hidden_size must be divisible by num_attention_heads")


@dataclass(frozen=True)
class MaskGITStep:
    """One host-side step of the official ImageBert.generate schedule."""
    cfg: float  # the guidance scale of this step; 0 -> one conditional forward
    uncond_first: bool  # power-cosine: logits = u + (c - u) * cfg (else c + (c - u) * cfg)
    softmax_temperature: float  # logits are divided by it (1.0 without annealing)
    temperature: float  # the annealed Gumbel temperature (sampling and confidence)
    cap: int  # floor(N * arccos(ratio) / (pi / 2)); re-masked: max(1, min(masked in row 0 - 1, cap))
    last: bool


def sampling_schedule(image_seq_len: int, num_sample_steps: int, guidance_scale: float, guidance_decay: str,
                      guidance_scale_pow: float, randomize_temperature: float, softmax_temperature_annealing: bool,
                      device: torch.device | str = "cpu") -> list[MaskGITStep]:
    """The per-step constants of the official loop (maskgit.py:110-193), with its arithmetic:
    Python floats, numpy's arccos for the re-mask count, and the power-cosine scale as the fp32
    tensor expression the official code evaluates on the model's device."""
    pc = None
    if guidance_decay == "power-cosine":
        pw = torch.ones(1, device=device) * guidance_scale_pow
        pc = [((guidance_scale - 1) * ((1 - torch.cos(((step / num_sample_steps) ** pw) * torch.pi)) * 1 / 2) + 1)
              for step in range(num_sample_steps)]
        pc = torch.cat(pc).tolist()  # one host sync, before the loop
    steps, cfg = [], guidance_scale if guidance_decay == "constant" else 0.0
    for step in range(num_sample_steps):
        ratio = 1.0 * (step + 1) / num_sample_steps
        if pc is not None:
            cfg = pc[step]
        cap = int(np.floor(image_seq_len * (np.arccos(ratio) / (math.pi * 0.5))))
        soft = 0.5 + 0.8 * (1 - ratio) if softmax_temperature_annealing else 1.0
        steps.append(MaskGITStep(float(cfg), pc is not None, float(soft), float(randomize_temperature * (1.0 - ratio)),
                                 cap, step == num_sample_steps - 1))
        if guidance_decay == "linear":
            cfg = ratio * guidance_scale
    return steps


class ImageBert(PretrainedModel):
    """TiTok's MaskGIT generator on a BERT (Hugging Face BertModel keys under `model.`).

    forward(input_ids (B, N) ids in [0, K], condition (B,) classes in [0, C] (C: the class
    drop label), cond_drop_prob=0.1) -> logits (B, N, K), as the official forward: each label
    is dropped with probability cond_drop_prob (one torch.rand_like draw, always made).
    """

    # a TiTok preset name ("titok_l32", "titok_b64", "titok_s128") in from_pretrained means its
    # generator's Hub repo (yucornetto/generator_*_imagenet); raw official .bin files load by name
    preset_role = "generator"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        vq, gen = self.config["model"]["vq_model"], self.config["model"]["generator"]
        self.target_codebook_size = vq["codebook_size"]
        self.condition_num_classes = gen["condition_num_classes"]
        self.image_seq_len = gen["image_seq_len"]
        self.mask_token_id = self.target_codebook_size
        self.hidden_size = gen["hidden_size"]
        self.num_hidden_layers = gen["num_hidden_layers"]
        self.num_attention_heads = gen["num_attention_heads"]
        self.intermediate_size = gen["intermediate_size"]
        self.vocab_size = self.target_codebook_size + self.condition_num_classes + 2
        self.drop_label_id = self.target_codebook_size + 1 + self.condition_num_classes
        self._graphs = _GraphRunner()
        self.build(gen)
        self.initialize_weights()

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        _validate_maskgit_config(config)

    @classmethod
    def class_for_config(cls, config: Mapping[str, Any]) -> type[PretrainedModel]:
        """ImageBert.from_pretrained on a U-ViT checkpoint (model_type "UViT") builds a
        UViTBert (the official demo_util picks the class by model_type the same way)."""
        if cls is ImageBert and cfg_get(config, "model.generator.model_type") == "UViT":
            return UViTBert
        return cls

    # ---- the network ----
    def build(self, gen: Mapping[str, Any]) -> None:
        self.model = BertCore(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
                              self.intermediate_size, self.image_seq_len + 1, self.target_codebook_size,
                              dropout=gen.get("dropout", 0.1), attn_drop=gen.get("attn_drop", 0.1))

    def initialize_weights(self) -> None:
        """HF BertPreTrainedModel._init_weights (initializer_range 0.02), as the official post_init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[class token; image ids] (B, 1+N) -> logits over the codes (B, N, K)."""
        return self.model.lm_head(self.model(tokens)[:, 1:])

    def class_tokens(self, condition: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Class ids (B,) -> their tokens K+1+c; dropped (bool (B,)) -> the class-drop token."""
        tokens = condition + self.target_codebook_size + 1
        return tokens if drop is None else torch.where(drop, self.drop_label_id, tokens)

    def forward(self, input_ids: torch.Tensor, condition: torch.Tensor, cond_drop_prob: float = 0.1,
                generator: torch.Generator | None = None) -> torch.Tensor:
        input_ids = self._check_ids("input_ids", input_ids, self.target_codebook_size, "[0, K] (K: the mask token)")
        condition = self._check_condition(condition, input_ids.shape[0], allow_drop_label=True)
        if input_ids.shape[1] > self.image_seq_len:
            raise ValueError(f"input_ids: expected at most image_seq_len={self.image_seq_len} tokens per row, "
                             f"got {input_ids.shape[1]}")
        drop = torch.rand(condition.shape, device=condition.device, generator=generator) < cond_drop_prob
        tokens = torch.cat([self.class_tokens(condition, drop)[:, None], input_ids], dim=1)
        return self.token_logits(tokens)

    # ---- training ----
    def masking_input_tokens(self, input_tokens: torch.Tensor, generator: torch.Generator | None = None):
        """(B, N) ids -> (ids with masked positions set to mask_token_id, masks (B, N) bool), the
        official draws in their order (maskgit.py:195-206): t ~ U(0, 1) per sample, ratio =
        arccos(t) / (pi / 2) clamped to [1e-6, 1], round(N * ratio) >= 1 positions masked, chosen
        by an argsort of U(0, 1) noise."""
        input_tokens = self._check_ids("input_tokens", input_tokens, self.target_codebook_size - 1, "[0, K)")
        b, n = input_tokens.shape
        dev = input_tokens.device
        t = torch.rand(b, device=dev, generator=generator)
        ratio = get_masking_ratio(t, "arccos").clamp(min=1e-6, max=1.0)
        num_masked = (n * ratio).round().clamp(min=1)
        rank = torch.rand(b, n, device=dev, generator=generator).argsort(dim=-1)
        masks = rank < num_masked[:, None]
        return torch.where(masks, self.mask_token_id, input_tokens), masks

    # ---- input checks (before any model work) ----
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_ids(self, name: str, ids, high: int, what: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() \
                or ids.dtype == torch.bool:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}: expected integer token ids (B, N), got {got}")
        if ids.numel() and host_checkable(ids):
            lo, hi = torch.aminmax(ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi > high:
                raise ValueError(f"{name}: ids must be in {what} with K={self.target_codebook_size}, "
                                 f"got values in [{lo}, {hi}]")
        elif ids.numel() and ids.device.type != "meta":  # on a GPU: a device-side assert, no host sync per step
            torch._assert_async(((ids >= 0) & (ids <= high)).all(), f"{name}: ids must be in {what}")
        return ids.to(self._device(), torch.long)

    def _check_condition(self, condition, batch: int | None = None, allow_drop_label: bool = False) -> torch.Tensor:
        """condition: class ids, a (B,) integer tensor or a sequence of ints, in [0, C)
        ([0, C] with allow_drop_label: C is the class-drop label)."""
        c = self.condition_num_classes
        if isinstance(condition, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in condition):
                raise TypeError(f"condition: expected class ids (ints in [0, {c})), got {condition!r}")
            condition = torch.tensor(condition, dtype=torch.long)
        if not isinstance(condition, torch.Tensor):
            raise TypeError(f"condition: expected a (B,) tensor of class ids, got {type(condition).__name__}")
        if condition.dim() != 1 or condition.is_floating_point() or condition.is_complex() \
                or condition.dtype == torch.bool:
            raise ValueError(f"condition: expected a (B,) integer tensor of class ids, got {condition.dtype} "
                             f"{tuple(condition.shape)}")
        if batch is not None and condition.shape[0] != batch:
            raise ValueError(f"condition: expected {batch} class ids (one per row of input_ids), got {condition.shape[0]}")
        if condition.numel() == 0:
            raise ValueError("condition: expected at least one class id, got an empty tensor")
        top = c if allow_drop_label else c - 1
        if not host_checkable(condition):  # on a GPU: a device-side assert, no host sync per step
            if condition.device.type != "meta":
                torch._assert_async(((condition >= 0) & (condition <= top)).all(),
                                    f"condition: class ids must be in [0, {top}]")
            return condition.to(self._device(), torch.long)
        lo, hi = torch.aminmax(condition)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            want = f"[0, {c}] ({c}: the class-drop label)" if allow_drop_label else f"[0, {c})"
            raise ValueError(f"condition: class ids must be in {want} for this model's {c} classes, got {bad}")
        return condition.to(self._device(), torch.long)

    # ---- sampling ----
    def _sample_loop(self, tokens: torch.Tensor, ids: torch.Tensor, schedule: Sequence[MaskGITStep], noise: str,
                     generator: torch.Generator | None) -> torch.Tensor:
        """tokens: (2B,) [class tokens; class-drop tokens]; ids (B, N) all masked."""
        b, dev = ids.shape[0], ids.device
        fused = ops.use_fused("maskgen_unmask_step", dev)
        for s in schedule:
            # re-masked this step, as the official counts it: min(masked in row 0 - 1, cap), >= 1 (on device)
            masked0 = (ids[0] == self.mask_token_id).sum()
            mask_len = (masked0 - 1).clamp(max=s.cap).clamp(min=1).repeat(b)  # (B,) int64
            guided = s.cfg != 0
            if noise == "torch":  # the official forwards' rand_like(condition) draws (their labels are fixed)
                for _ in range(2 if guided else 1):
                    torch.rand(b, device=dev, generator=generator)
            if guided:
                seq = torch.cat([tokens[:, None], torch.cat([ids, ids])], dim=1)  # (2B, 1+N)
                cond, uncond = self.token_logits(seq).chunk(2)
                # power-cosine: u + (c - u) * cfg, the same floats as u + (u - c) * (-cfg), the op's form
                first, second, scale = (uncond, cond, -s.cfg) if s.uncond_first else (cond, uncond, s.cfg)
            else:
                first = self.token_logits(torch.cat([tokens[:b, None], ids], dim=1))
                second, scale = None, 0.0
            if noise == "torch" or not fused:  # U(B, N, K) then U(B, N), the official order
                g = gumbel_noise(first.shape, device=dev, generator=generator)
                g2 = gumbel_noise(ids.shape, device=dev, generator=generator)
            else:  # drawn inside the fused kernel
                g = g2 = None
            kw = dict(softmax_temperature=s.softmax_temperature, sample_temperature=s.temperature,
                      confidence_temperature=s.temperature, last_step=s.last, sample_noise=g, confidence_noise=g2,
                      guidance_scale=scale)
            if fused:
                ids = ops.maskgen_unmask_step(first, ids, self.mask_token_id, mask_len, uncond_logits=second,
                                              generator=generator, **kw)
            else:  # no kernel for this device, or reference_mode(): the official sequence
                ids = maskgen_unmask_step_ref(first.float(), ids, self.mask_token_id, mask_len,
                                              uncond_logits=None if second is None else second.float(), **kw)
        return ids

    @torch.no_grad()
    def generate(self, condition, guidance_scale: float = 3.0, guidance_decay: str = "constant",
                 guidance_scale_pow: float = 3.0, randomize_temperature: float = 4.5,
                 softmax_temperature_annealing: bool = False, num_sample_steps: int = 8, *,
                 noise: str = "torch", generator: torch.Generator | None = None,
                 use_cuda_graph: bool | None = None) -> torch.Tensor:
        """Class ids (B,) in [0, C) -> token ids (B, N) int64 in [0, K), the official
        ImageBert.generate (same arguments and defaults).

        noise="torch" (default) draws the Gumbel noise and the official forwards' label-drop
        draws from torch's RNG (the global one, or `generator`) in the official order: after
        torch.manual_seed(s) the ids are the official ones for the same seed (fp32). noise=
        "philox" draws the noise inside the fused kernel (faster; another random stream), and
        on CUDA runs the loop as a CUDA graph unless use_cuda_graph=False or a generator is given.
        """
        if guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"guidance_decay: expected one of {GUIDANCE_DECAYS}, got {guidance_decay!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise: expected one of {NOISE_MODES}, got {noise!r}")
        _check_sampling_args(num_sample_steps=num_sample_steps, guidance_scale=guidance_scale,
                             randomize_temperature=randomize_temperature)
        if isinstance(guidance_scale_pow, bool) or not isinstance(guidance_scale_pow, (int, float)) \
                or not math.isfinite(guidance_scale_pow):
            raise ValueError(f"guidance_scale_pow: expected a finite number, got {guidance_scale_pow!r}")
        if not isinstance(softmax_temperature_annealing, bool):
            raise TypeError(f"softmax_temperature_annealing: expected a bool, got {softmax_temperature_annealing!r}")
        condition = self._check_condition(condition)
        device = condition.device
        use_graph = _use_graph(use_cuda_graph, device, generator) and noise == "philox"
        schedule = sampling_schedule(self.image_seq_len, num_sample_steps, float(guidance_scale), guidance_decay,
                                     float(guidance_scale_pow), float(randomize_temperature),
                                     softmax_temperature_annealing, device)
        b = condition.shape[0]
        tokens = torch.cat([self.class_tokens(condition), torch.full_like(condition, self.drop_label_id)])  # (2B,)
        ids = torch.full((b, self.image_seq_len), self.mask_token_id, device=device, dtype=torch.long)
        if not use_graph:
            return self._sample_loop(tokens, ids, schedule, noise, generator)
        key = graph_key("maskgit", b, tuple(schedule), next(self.parameters()).dtype)
        return self._graphs(key, lambda t, i: self._sample_loop(t, i, schedule, noise, None), [tokens, ids],
                            module=self)


class UViTBert(ImageBert):
    """TiTok's MaskGIT generator on a U-ViT (official keys: embeddings, pos_embed, in_blocks,
    mid_block, out_blocks with skip_linear, norm, lm_head). Same token space, forward and
    generate as ImageBert."""

    def build(self, gen: Mapping[str, Any]) -> None:
        d, heads, half = self.hidden_size, self.num_attention_heads, self.num_hidden_layers // 2
        mlp_hidden = int(d * (self.intermediate_size / self.hidden_size))  # the official int(dim * mlp_ratio)
        self.embeddings = nn.Embedding(self.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.image_seq_len + 1, d))
        self.in_blocks = nn.ModuleList([UViTBlock(d, heads, mlp_hidden) for _ in range(half)])
        self.mid_block = UViTBlock(d, heads, mlp_hidden)
        self.out_blocks = nn.ModuleList([UViTBlock(d, heads, mlp_hidden, skip=True) for _ in range(half)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = Linear(d, self.target_codebook_size)

    def initialize_weights(self) -> None:
        """The official UViTBert init: trunc-normal(0.02) weights and embeddings, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, 0.0, 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens) + self.pos_embed[:, : tokens.shape[1]]
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        return self.lm_head(self.norm(x)[:, 1:])
