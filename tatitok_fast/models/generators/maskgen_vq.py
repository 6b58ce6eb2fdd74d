"""MaskGen-VQ: text -> discrete TA-TiTok token ids, a drop-in for the reference's
`modeling.maskgen.MaskGen_VQ` (same config, same state-dict keys)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from tatitok_fast import ops
from tatitok_fast.models.generators.graph_runner import _use_graph, graph_key
from tatitok_fast.models.nn.layers import Linear, linear
from tatitok_fast.models.generators.maskgen_base import _MaskGenBase, _validate_generator_config, aesthetic_scores
from tatitok_fast.models.generators.maskgen_schedules import (GUIDANCE_DECAYS, VQStep, _check_sampling_args, get_masking_ratio,
                                                   sinusoid_halves)
from tatitok_fast.models.generators.mmdit import AdaLayerNormContinuous, MMDiT
from tatitok_fast.models.nn.pretrained import default_text_encoder
from tatitok_fast.models.generators.text_conditions import _check_captions, _check_text_states, text_conditions
from tatitok_fast.ops.reference import gumbel_noise, maskgen_unmask_step_ref


class TiedLMHead(nn.Module):
    """logits = x @ E[:K]^T with E the token embedding table (its first K rows are the codes)."""

    def __init__(self, embeddings: nn.Embedding, codebook_size: int):
        super().__init__()
        self.weight = embeddings.weight
        self.codebook_size = codebook_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, K)
        return linear(x, self.weight[: self.codebook_size])  # fp32 GEMM for bf16 on CPUs without bf16 units


class MaskGen_VQ(_MaskGenBase):
    """MaskGen with discrete tokens: MM-DiT + tied LM head over the TA-TiTok codebook.

    Token space: [0, K) image codes, K the mask token, then condition_num_classes class ids
    and one null id (kept for checkpoint compatibility).
    forward(input_ids (B, N), condition (B, 77, 768), condition_pooled (B, 1, 768),
            aesthetic_score (B,)) -> (logits (B, N, K), masks (B, N) in training else None).
    """

    config_quantize_mode = "vq"
    tied_weights = {"lm_head.weight": "embeddings.weight"}

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        vq, mg = self.config["model"]["vq_model"], self.config["model"]["maskgen"]
        self.image_seq_len = vq["num_latent_tokens"]
        self.target_codebook_size = vq["codebook_size"]
        self.condition_num_classes = mg.get("condition_num_classes", 1000)
        dim, depth, heads = mg["decoder_embed_dim"], mg["decoder_depth"], mg["decoder_num_heads"]
        self.mask_schedule_strategy = mg.get("mask_schedule_strategy", "arccos")
        self.mask_token_id = self.target_codebook_size
        self.none_condition_id = self.condition_num_classes + self.target_codebook_size + 1

        self.text_embed_proj = Linear(self.text_embed_dim, dim)
        self.cond_pooled_proj = Linear(self.pooled_input_dim, dim)
        self.blocks = MMDiT(dim, depth, heads)
        self.norm = AdaLayerNormContinuous(dim, dim)
        self.embeddings = nn.Embedding(self.target_codebook_size + 1 + self.condition_num_classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.image_seq_len, dim))
        if not mg.get("weight_tying", True):
            raise NotImplementedError("config: model.maskgen.weight_tying=False has no official checkpoint")
        self.lm_head = TiedLMHead(self.embeddings, self.target_codebook_size)
        self.initialize_weights()

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        _validate_generator_config(config, "vq")

    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, 0.0, 0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
        for m in self.modules():  # continuous adaLN starts as identity modulation
            if isinstance(m, AdaLayerNormContinuous):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    def post_load(self) -> None:
        self.lm_head.weight = self.embeddings.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable

    # ---- conditioning ----
    def concat_micro_cond(self, condition_pooled: torch.Tensor, aesthetic_score: torch.Tensor) -> torch.Tensor:
        code = sinusoid_halves(aesthetic_score * 100, self.micro_condition_embed_dim)
        return torch.cat([condition_pooled.squeeze(1), code.to(condition_pooled.dtype)], dim=-1).unsqueeze(1)

    def project_conditions(self, condition, condition_pooled, aesthetic_score=None):
        """Raw CLIP states -> (context (B, L, D), pooled embedding (B, D)), L = text_context_length."""
        if self.micro_condition:
            if aesthetic_score is None:
                raise ValueError("aesthetic_score: this model is micro-conditioned on aesthetics; pass (B,) scores")
            condition_pooled = self.concat_micro_cond(condition_pooled, aesthetic_score)
        return self.text_embed_proj(condition), self.cond_pooled_proj(condition_pooled).squeeze(1)

    def logits(self, input_ids: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """(B, N) ids with projected conditions -> (B, N, K) logits."""
        x = self.embeddings(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        x = self.blocks(x, context.to(x.dtype), temb.to(x.dtype))
        return self.lm_head(self.norm(x, temb))

    # ---- training ----
    def masking_input_tokens(self, input_tokens: torch.Tensor, generator: torch.Generator | None = None):
        """(B, N) ids -> (ids with masked positions set to mask_token_id, masks (B, N) bool).
        Per sample t ~ U(0, 1), ratio = arccos(t) / (pi / 2), round(N * ratio) >= 1 positions
        masked, chosen by an argsort of uniform noise (the reference's draws, in its order)."""
        b, n = input_tokens.shape
        dev = input_tokens.device
        t = torch.rand(b, device=dev, generator=generator)
        ratio = get_masking_ratio(t, self.mask_schedule_strategy).clamp(1e-6, 1.0)
        num_masked = (n * ratio).round().clamp(min=1)
        rank = torch.rand(b, n, device=dev, generator=generator).argsort(dim=-1)
        masks = rank < num_masked[:, None]
        return torch.where(masks, self.mask_token_id, input_tokens), masks

    def forward(self, input_tokens, condition, condition_pooled, aesthetic_score=None,
                generator: torch.Generator | None = None, masks: torch.Tensor | None = None):
        """Training mode masks the tokens first (generator: draws the masks; or `masks` (B, N)
        bool given by the caller, e.g. drawn per sample by the training recipe). Token ids of
        any integer dtype (the reference's loader gives float16 ids and no cast: a TypeError)."""
        if not isinstance(input_tokens, torch.Tensor) or input_tokens.dim() != 2 \
                or input_tokens.is_floating_point() or input_tokens.is_complex():
            got = (f"{input_tokens.dtype} {tuple(input_tokens.shape)}" if isinstance(input_tokens, torch.Tensor)
                   else type(input_tokens).__name__)
            raise ValueError(f"input_tokens: expected integer token ids (B, N), got {got}")
        input_tokens = input_tokens.long()
        _check_text_states("condition", condition, input_tokens.shape[0],
                           (self.text_context_length, self.text_embed_dim))
        if masks is not None:
            if masks.shape != input_tokens.shape or masks.dtype != torch.bool:
                raise ValueError(f"masks: expected bool {tuple(input_tokens.shape)}, got {masks.dtype} "
                                 f"{tuple(masks.shape)}")
            input_ids = torch.where(masks, self.mask_token_id, input_tokens)
        elif self.training:
            input_ids, masks = self.masking_input_tokens(input_tokens, generator)
        else:
            input_ids, masks = input_tokens, None
        context, temb = self.project_conditions(condition, condition_pooled, aesthetic_score)
        return self.logits(input_ids, context, temb), masks

    # ---- sampling ----
    def sampling_schedule(self, num_sample_steps: int, guidance_scale: float, randomize_temperature: float,
                          softmax_temperature_annealing: bool, guidance_decay: str, guidance_decay_scale_pow: float,
                          prob_sorting: bool) -> list[VQStep]:
        """Host-side per-step constants, computed with the reference's fp32 arithmetic."""
        steps, num_masked = [], self.image_seq_len
        for step in range(num_sample_steps):
            ratio = (step + 1) / num_sample_steps
            annealed = randomize_temperature * (1.0 - ratio)
            if guidance_decay in ("cosine", "flippedcosine"):
                pw = torch.ones(1) * guidance_decay_scale_pow
                c = torch.cos((ratio ** pw) * torch.pi)
                scale_step = (1 - c) * 1 / 2 if guidance_decay == "cosine" else c * 1 / 2
                cfg = ((guidance_scale - 1) * scale_step + 1).item()
            elif guidance_decay == "linear":
                cfg = ratio * (guidance_scale - 1) + 1
            else:
                cfg = guidance_scale
            temp = 0.5 + 0.8 * (1 - ratio) if softmax_temperature_annealing else annealed
            # floor(L * ratio) in fp32 tensor arithmetic, as the reference computes it
            cap = int(torch.floor(self.image_seq_len * get_masking_ratio(ratio, self.mask_schedule_strategy)))
            mask_len = max(1, min(num_masked - 1, cap))
            last = step == num_sample_steps - 1
            # softmax_temperature_annealing=False reaches T = 0 on the last step: the reference
            # divides by zero there; the clamp gives the T -> 0 limit, greedy argmax (README)
            steps.append(VQStep(float(cfg), max(float(temp), 1e-6), float(annealed),
                                float(annealed) if prob_sorting else 0.0, mask_len, last, cap))
            num_masked = mask_len
        return steps

    def _sample_loop(self, context, temb, ids, schedule, generator, gumbel, prob_sorting=True):
        b = ids.shape[0]
        for s in schedule:
            # How many to re-mask, as the reference counts it: min(masked in row 0 - 1, cap),
            # at least 1, for every row. Without ties that is s.mask_len; ties at the cut-off
            # re-mask more, which the count (on device: no host sync) carries into this step.
            masked0 = (ids[0] == self.mask_token_id).sum()  # 0-d
            mask_len = (masked0 - 1).clamp(max=s.cap).clamp(min=1).repeat(b)  # (B,) int64
            if s.guidance_scale != 0:
                logits = self.logits(torch.cat([ids, ids]), context, temb)  # (2B, N, K): [cond; uncond]
                cond, uncond = logits[:b], logits[b:]
            else:
                cond, uncond = self.logits(ids, context[:b], temb[:b]), None
            fused = ops.use_fused("maskgen_unmask_step", ids.device)
            if gumbel == "torch" or not fused:  # the reference's noise draws, in its order
                g = gumbel_noise(cond.shape, device=ids.device, generator=generator)
                g2 = (gumbel_noise(ids.shape, device=ids.device, generator=generator) if prob_sorting
                      else torch.zeros(ids.shape, device=ids.device))
            else:  # drawn inside the fused kernel
                g = g2 = None
            kw = dict(softmax_temperature=s.softmax_temperature, sample_temperature=s.gumbel_temperature,
                      confidence_temperature=s.confidence_temperature, last_step=s.last, sample_noise=g,
                      confidence_noise=g2, guidance_scale=s.guidance_scale)
            if fused:
                ids = ops.maskgen_unmask_step(cond, ids, self.mask_token_id, mask_len, uncond_logits=uncond,
                                              generator=generator, **kw)
            else:  # no kernel for this device, or reference_mode(): the reference sequence
                ids = maskgen_unmask_step_ref(cond.float(), ids, self.mask_token_id, mask_len,
                                              uncond_logits=None if uncond is None else uncond.float(), **kw)
        return ids

    @torch.no_grad()
    def generate(self, captions, guidance_scale: float = 12.0, randomize_temperature: float = 1.5,
                 sample_aesthetic_score: float | torch.Tensor | None = None, softmax_temperature_annealing: bool = True,
                 num_sample_steps: int = 16, guidance_decay: str = "cosine", guidance_decay_scale_pow: float = 1.0,
                 clip_tokenizer=None, clip_encoder=None, prob_sorting: bool = True, *, text_encoder=None,
                 generator: torch.Generator | None = None, use_cuda_graph: bool | None = None,
                 noise: str = "philox") -> torch.Tensor:
        """Text -> token ids (B, N) int64 in [0, K), with the reference's schedule: guidance
        decayed over the steps, Gumbel-max sampling with annealed randomisation, re-masking
        of the least confident tokens.

        Conditions come from `text_encoder` (a CLIPTextEncoder) or the reference's
        (clip_tokenizer, clip_encoder) open_clip pair. sample_aesthetic_score: the aesthetic
        micro-condition, a number, a 0-d tensor or a (B,) tensor of per-sample scores (the
        official training loop passes the batch's), None: the config's value. The reference
        replaces any value passed by the config's (README, differences); ignored by models
        without micro-conditioning. noise="philox" draws the Gumbel noise inside the fused
        kernel; noise="torch" draws it as the reference does (torch.rand), which reproduces
        the reference's ids for the same seed. On CUDA the loop is a CUDA graph unless
        use_cuda_graph=False or a generator is given.
        """
        captions = _check_captions(captions)
        _check_sampling_args(num_sample_steps=num_sample_steps, guidance_scale=guidance_scale,
                             randomize_temperature=randomize_temperature)
        if guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"guidance_decay: expected one of {GUIDANCE_DECAYS}, got {guidance_decay!r}")
        if noise not in ("philox", "torch"):
            raise ValueError(f"noise: expected 'philox' or 'torch', got {noise!r}")
        device = self.pos_embed.device
        aes = aesthetic_scores(sample_aesthetic_score, len(captions), self.sample_aesthetic_score, device,
                               "sample_aesthetic_score")
        aes = torch.cat([aes, aes])  # (2B,): [cond; uncond]
        use_graph = _use_graph(use_cuda_graph, device, generator) and noise == "philox"
        schedule = self.sampling_schedule(num_sample_steps, guidance_scale, randomize_temperature,
                                          softmax_temperature_annealing, guidance_decay, guidance_decay_scale_pow,
                                          prob_sorting)
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder,
                                                       default_encoder=lambda: default_text_encoder(self, device),
                                                       context_length=self.text_context_length)
        b = len(captions)
        dtype = self.pos_embed.dtype
        context, temb = self.project_conditions(
            torch.cat([cond, null_c.expand(b, -1, -1)]).to(device, dtype),
            torch.cat([pooled, null_p.expand(b, -1, -1)]).to(device, dtype), aes)
        ids = torch.full((b, self.image_seq_len), self.mask_token_id, device=device, dtype=torch.long)
        if not use_graph:
            return self._sample_loop(context, temb, ids, schedule, generator, noise, prob_sorting)
        key = graph_key("vq", b, tuple(schedule), dtype)
        return self._graphs(key, lambda c, t, i: self._sample_loop(c, t, i, schedule, None, noise, prob_sorting),
                            [context, temb, ids], module=self)
