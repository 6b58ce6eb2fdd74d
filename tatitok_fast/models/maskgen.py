"""MaskGen text-to-image generators on TA-TiTok tokens, drop-ins for the reference
`modeling.maskgen.MaskGen_VQ` / `MaskGen_KL` (same configs, same state-dict keys).

    captions -> CLIP (penultimate states (B, 77, 768), pooled (B, 1, 768))
             -> MM-DiT over [tokens; text] -> VQ logits (B, N, K) | KL per-token condition
             -> fused unmask step (VQ) | DiffLoss sampling (KL) -> tokens -> TA-TiTok decoder

Sampling runs on static shapes: the per-step schedule (temperatures, guidance, how many
tokens stay masked) is computed on the host before the loop, CFG runs as one batch, the
empty-prompt condition is cached, and nothing inside the loop synchronises with the host, so
on CUDA the whole loop is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tatitok_fast import ops
from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.diffloss import DiffLoss
from tatitok_fast.models.layers import Linear
from tatitok_fast.models.mmdit import AdaLayerNormContinuous, MMDiT
from tatitok_fast.models.pretrained import PretrainedModel, default_text_encoder
from tatitok_fast.models.tatitok import _kl_sample
from tatitok_fast.ops.reference import gumbel_noise, mask_by_order_ref, maskgen_unmask_step_ref

GUIDANCE_DECAYS = ("linear", "cosine", "none", "flippedcosine")
MASK_SCHEDULES = ("root", "square", "cosine", "arccos", "linear")


# ---------------------------------------------------------------------------------------
# Schedules and embeddings

def get_masking_ratio(progress, mode: str = "arccos") -> torch.Tensor:
    """Fraction of tokens still masked at `progress` in [0, 1]."""
    r = progress if isinstance(progress, torch.Tensor) else torch.tensor(progress)
    if mode == "root":
        return 1 - r ** 0.5
    if mode == "square":
        return 1 - r ** 2
    if mode == "cosine":
        return torch.cos(r * math.pi * 0.5)
    if mode == "arccos":
        return torch.acos(r) / (math.pi * 0.5)
    if mode == "linear":
        return 1 - r
    raise ValueError(f"mask schedule: expected one of {MASK_SCHEDULES}, got {mode!r}")


def sinusoid_halves(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """MaskGen-VQ micro-condition code: [sin | cos] halves. t (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sinusoid_interleaved(t: torch.Tensor, dim: int) -> torch.Tensor:
    """MaskGen-KL micro-condition code: sin/cos interleaved, base 10000. t (B,) -> (B, dim) fp32."""
    wavelengths = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float, device=t.device) / dim)
    arg = t.unsqueeze(-1) * wavelengths
    enc = torch.zeros(t.shape[0], dim, device=t.device)
    enc[:, 0::2] = torch.sin(arg)
    enc[:, 1::2] = torch.cos(arg)
    return enc


# ---------------------------------------------------------------------------------------
# Text conditions (our CLIPTextEncoder, or the reference's (clip_tokenizer, clip_encoder))

_NULL_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions: expected a list of strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError("captions: expected at least one prompt, got an empty list")
    return list(captions)


def text_conditions(captions: Sequence[str], text_encoder=None, clip_tokenizer=None, clip_encoder=None,
                    default_encoder: Callable[[], Any] | None = None):
    """(penultimate (B, 77, W), pooled (B, 1, E), null penultimate (1, 77, W), null pooled (1, 1, E)).
    The empty-prompt encoding is computed once per encoder, device and dtype."""
    from tatitok_fast.text import CLIPTextEncoder, encode_text

    if text_encoder is None and (clip_tokenizer is None) != (clip_encoder is None):
        raise ValueError("clip_tokenizer, clip_encoder: pass both (the reference's open_clip pair) or neither")
    if text_encoder is None and clip_encoder is None:
        if default_encoder is None:
            raise ValueError("text_encoder: pass a CLIPTextEncoder or the (clip_tokenizer, clip_encoder) pair")
        text_encoder = default_encoder()
    if text_encoder is not None:
        if not isinstance(text_encoder, CLIPTextEncoder):
            raise TypeError(f"text_encoder: expected a tatitok_fast.text.CLIPTextEncoder, got {type(text_encoder).__name__}")
        enc, null = text_encoder(captions), text_encoder.empty_prompt(1)
    else:
        enc = encode_text(clip_tokenizer, clip_encoder, captions)
        p = next(clip_encoder.parameters())
        per_model = _NULL_CACHE.setdefault(clip_encoder, {})
        key = (p.device, p.dtype, p.data_ptr())
        if key not in per_model:
            per_model.clear()
            per_model[key] = encode_text(clip_tokenizer, clip_encoder, [""])
        null = per_model[key]
    return enc.penultimate, enc.pooled, null.penultimate, null.pooled


def _check_text_states(name: str, t: torch.Tensor, batch: int | None, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != len(dims) + 1 or tuple(t.shape[1:]) != dims:
        raise ValueError(f"{name}: expected (B, {', '.join(map(str, dims))}), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name}: expected batch {batch}, got {t.shape[0]}")


# ---------------------------------------------------------------------------------------
# CUDA-graph runner shared by both generators

class _GraphRunner:
    """Captures a sampling loop `fn(*static_inputs) -> output` once per key and replays it.
    Replays reuse the captured output buffer, so results are cloned before returning."""

    def __init__(self):
        self.graphs: dict = {}

    def __call__(self, key, fn: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        entry = self.graphs.get(key)
        if entry is None:
            static_in = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS workspaces, allocator
                fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(*static_in)
            entry = self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()


def _use_graph(use_cuda_graph: bool | None, device: torch.device, generator) -> bool:
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph: CUDA graphs need a CUDA model, this one is on {device}")
    # a user generator's Philox offsets would be frozen into the graph; use eager for those
    return bool(use_cuda_graph) and generator is None


# ---------------------------------------------------------------------------------------
# MaskGen-VQ

class TiedLMHead(nn.Module):
    """logits = x @ E[:K]^T with E the token embedding table (its first K rows are the codes)."""

    def __init__(self, embeddings: nn.Embedding, codebook_size: int):
        super().__init__()
        self.weight = embeddings.weight
        self.codebook_size = codebook_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[: self.codebook_size])


@dataclass(frozen=True)
class VQStep:
    """One host-side step of the MaskGen-VQ schedule."""
    guidance_scale: float  # 0 -> conditional logits only
    softmax_temperature: float
    gumbel_temperature: float
    confidence_temperature: float
    mask_len: int
    last: bool


class _MaskGenBase(PretrainedModel):
    """What both generators share: the text conditioning settings, caption dropout for
    training, and the CUDA-graph cache."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        vq, mg = self.config["model"]["vq_model"], self.config["model"]["maskgen"]
        self.text_embed_dim = vq.get("text_embed_dim", 768)
        self.micro_condition = mg.get("micro_condition", False)
        self.micro_condition_embed_dim = mg.get("micro_condition_embed_dim", 256)
        self.sample_aesthetic_score = mg.get("sample_aesthetic_score", 6.0)
        self.text_drop_prob = mg.get("text_drop_prob", 0.1)
        self._graphs = _GraphRunner()

    @classmethod
    def class_for_config(cls, config: Mapping[str, Any]) -> type[PretrainedModel]:
        if cls is not _MaskGenBase:
            return cls
        return MaskGen_KL if cfg_get(config, "model.vq_model.quantize_mode", "vq") == "vae" else MaskGen_VQ

    @property
    def pooled_input_dim(self) -> int:
        """Width of the pooled condition: CLIP's pooled embedding [+ the aesthetic code]."""
        return self.text_embed_dim + (self.micro_condition_embed_dim if self.micro_condition else 0)

    def preprocess_condition(self, captions, text_encoder=None, clip_tokenizer=None, clip_encoder=None,
                             generator: torch.Generator | None = None):
        """Training conditions: CLIP states, each caption replaced by "" with p=text_drop_prob."""
        captions = _check_captions(captions)
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder)
        drop = (torch.rand(len(captions), 1, 1, generator=generator) < self.text_drop_prob).to(cond)
        return cond * (1 - drop) + null_c * drop, pooled * (1 - drop) + null_p * drop


class MaskGen_VQ(_MaskGenBase):
    """MaskGen with discrete tokens: MM-DiT + tied LM head over the TA-TiTok codebook.

    Token space: [0, K) image codes, K the mask token, then condition_num_classes class ids
    and one null id (kept for checkpoint compatibility).
    forward(input_ids (B, N), condition (B, 77, 768), condition_pooled (B, 1, 768),
            aesthetic_score (B,)) -> (logits (B, N, K), masks (B, N) in training else None).
    """

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
        """Raw CLIP states -> (context (B, 77, D), pooled embedding (B, D))."""
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
        b, n = input_tokens.shape
        dev = input_tokens.device
        t = torch.rand(b, device=dev, generator=generator)
        ratio = get_masking_ratio(t, self.mask_schedule_strategy).clamp(1e-6, 1.0)
        num_masked = (n * ratio).round().clamp(min=1)
        rank = torch.rand(b, n, device=dev, generator=generator).argsort(dim=-1)
        masks = rank < num_masked[:, None]
        return torch.where(masks, self.mask_token_id, input_tokens), masks

    def forward(self, input_tokens, condition, condition_pooled, aesthetic_score=None):
        _check_text_states("condition", condition, input_tokens.shape[0], (77, self.text_embed_dim))
        if self.training:
            input_ids, masks = self.masking_input_tokens(input_tokens)
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
            steps.append(VQStep(float(cfg), max(float(temp), 1e-6), float(annealed),
                                float(annealed) if prob_sorting else 0.0, mask_len, last))
            num_masked = mask_len
        return steps

    def _sample_loop(self, context, temb, ids, schedule, generator, gumbel, prob_sorting=True):
        b = ids.shape[0]
        for s in schedule:
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
                ids = ops.maskgen_unmask_step(cond, ids, self.mask_token_id, s.mask_len, uncond_logits=uncond,
                                              generator=generator, **kw)
            else:  # no kernel for this device, or reference_mode(): the reference sequence
                ids = maskgen_unmask_step_ref(cond.float(), ids, self.mask_token_id, s.mask_len,
                                              uncond_logits=None if uncond is None else uncond.float(), **kw)
        return ids

    @torch.no_grad()
    def generate(self, captions, guidance_scale: float = 12.0, randomize_temperature: float = 1.5,
                 sample_aesthetic_score: float | None = None, softmax_temperature_annealing: bool = True,
                 num_sample_steps: int = 16, guidance_decay: str = "cosine", guidance_decay_scale_pow: float = 1.0,
                 clip_tokenizer=None, clip_encoder=None, prob_sorting: bool = True, *, text_encoder=None,
                 generator: torch.Generator | None = None, use_cuda_graph: bool | None = None,
                 noise: str = "philox") -> torch.Tensor:
        """Text -> token ids (B, N) int64 in [0, K), with the reference's schedule: guidance
        decayed over the steps, Gumbel-max sampling with annealed randomisation, re-masking
        of the least confident tokens.

        Conditions come from `text_encoder` (a CLIPTextEncoder) or the reference's
        (clip_tokenizer, clip_encoder) open_clip pair. sample_aesthetic_score: the aesthetic
        micro-condition (None: the config's value; the reference ignores the value passed and
        always uses the config's). noise="philox" draws the Gumbel noise inside the fused
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
        use_graph = _use_graph(use_cuda_graph, device, generator) and noise == "philox"
        schedule = self.sampling_schedule(num_sample_steps, guidance_scale, randomize_temperature,
                                          softmax_temperature_annealing, guidance_decay, guidance_decay_scale_pow,
                                          prob_sorting)
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder,
                                                       default_encoder=lambda: default_text_encoder(self, device))
        b = len(captions)
        score = self.sample_aesthetic_score if sample_aesthetic_score is None else sample_aesthetic_score
        aes = torch.full((2 * b,), float(score), device=device)
        dtype = self.pos_embed.dtype
        context, temb = self.project_conditions(
            torch.cat([cond, null_c.expand(b, -1, -1)]).to(device, dtype),
            torch.cat([pooled, null_p.expand(b, -1, -1)]).to(device, dtype), aes)
        ids = torch.full((b, self.image_seq_len), self.mask_token_id, device=device, dtype=torch.long)
        if not use_graph:
            return self._sample_loop(context, temb, ids, schedule, generator, noise, prob_sorting)
        key = ("vq", b, tuple(schedule), dtype)
        return self._graphs(key, lambda c, t, i: self._sample_loop(c, t, i, schedule, None, noise), [context, temb, ids])


# ---------------------------------------------------------------------------------------
# MaskGen-KL

@dataclass(frozen=True)
class KLStep:
    mask_len: int  # tokens still masked after this step
    revealed: tuple[int, int]  # this step predicts order positions [start, stop)
    cfg: float
    last: bool


class MaskGen_KL(_MaskGenBase):
    """MaskGen with continuous tokens: MAE-style MM-DiT decoder + DiffLoss head.

    forward_mae_decoder(x (B, N, C), mask (B, N), condition (B, 77, D), condition_pooled
    (B, 1, D)) -> per-token conditions z (B, N, D) (conditions already projected).
    forward(imgs (B, 2C, 1, N) posterior parameters, condition, condition_pooled, aes_score)
    -> (diffusion loss, loss dict).
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        config = self.config
        vq, mg = config["model"]["vq_model"], config["model"]["maskgen"]
        self.seq_len = vq["num_latent_tokens"]
        self.token_embed_dim = self.vae_embed_dim = vq["token_size"]
        self.vae_scale_factor = vq["scale_factor"]
        self.decoder_embed_dim = dim = mg["decoder_embed_dim"]
        self.decoder_depth, self.decoder_num_heads = mg["decoder_depth"], mg["decoder_num_heads"]
        self.diffusion_batch_mul = mg.get("diffusion_batch_mul", 4)

        self.text_emb = Linear(self.text_embed_dim, dim)
        self.text_pooled_emb = Linear(self.pooled_input_dim, dim)
        self.decoder_blocks = MMDiT(dim, self.decoder_depth, self.decoder_num_heads)
        self.decoder_norm = AdaLayerNormContinuous(dim, dim)
        self.z_proj = Linear(self.token_embed_dim, dim)
        self.z_proj_ln = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        losses = config["losses"]
        self.diffloss = DiffLoss(self.token_embed_dim, losses["diffloss_w"], losses["diffloss_d"], dim,
                                 num_sampling_steps=str(losses.get("num_sampling_steps", "100")),
                                 grad_checkpointing=bool(cfg_get(config, "training.grad_checkpointing", False)))
        self.initialize_weights()

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        _validate_generator_config(config, "vae")
        for key in ("diffloss_d", "diffloss_w"):
            if not isinstance(cfg_get(config, f"losses.{key}"), int):
                raise ValueError(f"config: MaskGen-KL needs losses.{key}")
        if not isinstance(cfg_get(config, "model.vq_model.scale_factor"), (int, float)):
            raise ValueError("config: MaskGen-KL needs model.vq_model.scale_factor")

    def initialize_weights(self) -> None:
        """The reference's init, including its quirk: the xavier pass over every Linear also
        overwrites DiffLoss's own zero-initialised adaLN and output layers."""
        for p in (self.mask_token, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def post_load(self) -> None:
        self.diffloss.reset_tables()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.decoder_blocks.grad_checkpointing = enable

    # ---- conditioning ----
    def project_conditions(self, condition, condition_pooled, aes_score=None):
        """Raw CLIP states -> (condition (B, 77, D), condition_pooled (B, 1, D))."""
        if self.micro_condition:
            if aes_score is None:
                raise ValueError("aes_score: this model is micro-conditioned on aesthetics; pass (B,) scores")
            code = sinusoid_interleaved(aes_score.float() * 100, self.micro_condition_embed_dim)
            condition_pooled = torch.cat([condition_pooled.squeeze(1), code.to(condition_pooled.dtype)], 1).unsqueeze(1)
        return self.text_emb(condition), self.text_pooled_emb(condition_pooled)

    def forward_mae_decoder(self, x, mask, condition, condition_pooled):
        x = self.z_proj_ln(self.z_proj(x.to(self.mask_token.dtype)))  # (B, N, D)
        x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)  # masked -> mask token
        x = x + self.decoder_pos_embed_learned
        temb = condition_pooled.squeeze(1)
        x = self.decoder_blocks(x, condition.to(x.dtype), temb.to(x.dtype))
        return self.decoder_norm(x, temb) + self.diffusion_pos_embed_learned

    # ---- training ----
    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, N) -> (B, N, C)
        return x.flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, C, 1, N)
        return x.transpose(1, 2).unsqueeze(2)

    def sample_orders(self, bsz: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random generation order per sample: (B, N) permutations of range(N)."""
        return torch.rand(bsz, self.seq_len, device=device, generator=generator).argsort(dim=-1)

    def random_masking(self, orders: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One masking rate for the batch (arccos schedule), the first ceil(N*rate) of each order."""
        t = torch.rand(1, generator=generator)
        rate = get_masking_ratio(t).clamp(1e-6, 1.0)
        num = int(math.ceil(self.seq_len * float(rate)))
        return _mask_by_order(orders, torch.ones_like(orders, dtype=torch.bool), num, False)[0].float()

    def forward(self, imgs, condition, condition_pooled, aes_score=None, generator: torch.Generator | None = None):
        """Training loss. imgs: (B, 2C, 1, N) tokenizer posterior parameters (mean, logvar)."""
        b = imgs.shape[0]
        expected = (2 * self.vae_embed_dim, 1, self.seq_len)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs: expected posterior parameters (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(imgs.shape)}")
        condition, condition_pooled = self.project_conditions(condition, condition_pooled, aes_score)
        x = self.patchify(_kl_sample(imgs, False, generator)[0] * self.vae_scale_factor)  # (B, N, C)
        target = x.detach()
        mask = self.random_masking(self.sample_orders(b, imgs.device, generator), generator).to(imgs.device)
        z = self.forward_mae_decoder(x, mask, condition, condition_pooled)
        # DiffLoss over every token, weighted by the mask, repeated diffusion_batch_mul times
        m = self.diffusion_batch_mul
        return self.diffloss(target.reshape(b * self.seq_len, -1).repeat(m, 1),
                             z.reshape(b * self.seq_len, -1).repeat(m, 1), mask.reshape(-1).repeat(m))

    # ---- sampling ----
    def sampling_schedule(self, num_iter: int, cfg: float, cfg_schedule: str) -> list[KLStep]:
        steps, masked = [], self.seq_len
        for step in range(num_iter):
            cap = math.floor(self.seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
            mask_len = max(1, min(masked - 1, cap))
            last = step >= num_iter - 1
            revealed = (0, masked) if last else (mask_len, masked)
            if cfg_schedule == "linear":
                cfg_iter = 1 + (cfg - 1) * (self.seq_len - mask_len) / self.seq_len
            elif cfg_schedule == "constant":
                cfg_iter = cfg
            else:
                raise ValueError(f"cfg_schedule: expected 'linear' or 'constant', got {cfg_schedule!r}")
            steps.append(KLStep(0 if last else mask_len, revealed, float(cfg_iter), last))
            masked = 0 if last else mask_len
        return steps

    def _sample_loop(self, condition, condition_pooled, orders, schedule, temperature, use_cfg, generator,
                     progress=False):
        b = orders.shape[0]
        tokens = torch.zeros(b, self.seq_len, self.token_embed_dim, device=orders.device)
        mask = torch.ones(b, self.seq_len, device=orders.device, dtype=torch.bool)
        for s in tqdm(schedule, desc="sample_tokens", unit="step", disable=not progress):
            start, stop = s.revealed
            if stop > start:
                if use_cfg:
                    z = self.forward_mae_decoder(torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                                                 condition, condition_pooled)  # (2B, N, D)
                else:
                    z = self.forward_mae_decoder(tokens, mask, condition, condition_pooled)
                pos = orders[:, start:stop]  # (B, n) positions revealed this step
                idx = torch.cat([pos, pos]) if use_cfg else pos
                # (2B or B, n, D) -> rows [cond rows; uncond rows], as DiffLoss.sample wants them
                rows = z.gather(1, idx.unsqueeze(-1).expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])
                new = self.diffloss.sample(rows, temperature, s.cfg if use_cfg else 1.0, generator=generator)
                new = new[: b * (stop - start)].view(b, stop - start, -1)
                tokens = tokens.scatter(1, pos.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), new.to(tokens.dtype))
            mask = _mask_by_order(orders, mask, s.mask_len, s.last)[0]
        return self.unpatchify(tokens) / self.vae_scale_factor

    @torch.no_grad()
    def sample_tokens(self, bsz: int, clip_tokenizer=None, clip_encoder=None, num_iter: int = 32, cfg: float = 3.0,
                      cfg_schedule: str = "linear", captions=("",), aes_scores=6.0, temperature: float = 1.0,
                      progress: bool = False, *, text_encoder=None, generator: torch.Generator | None = None,
                      use_cuda_graph: bool | None = None) -> torch.Tensor:
        """Text -> continuous tokens (B, C, 1, N) for the KL tokenizer's decoder, with the
        reference's schedule: random order per sample, cosine schedule of the number still
        masked, CFG growing linearly with the fraction revealed (or constant), DiffLoss
        sampling (temperature on the diffusion noise) batched over every token of a step.
        progress: a progress bar over the iterations (eager path; a CUDA-graph replay is one
        launch)."""
        captions = _check_captions(list(captions) if isinstance(captions, tuple) else captions)
        if not isinstance(bsz, int) or bsz <= 0:
            raise ValueError(f"bsz: expected a positive int, got {bsz!r}")
        if len(captions) != bsz:
            raise ValueError(f"captions: expected bsz={bsz} captions, got {len(captions)}")
        _check_sampling_args(num_sample_steps=num_iter, guidance_scale=cfg, randomize_temperature=temperature,
                             steps_name="num_iter", cfg_name="cfg", temperature_name="temperature")
        device = self.mask_token.device
        schedule = self.sampling_schedule(num_iter, cfg, cfg_schedule)
        use_cfg = cfg != 1.0
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder,
                                                       default_encoder=lambda: default_text_encoder(self, device))
        aes = torch.as_tensor(aes_scores, dtype=torch.float32, device=device).expand(bsz)
        dtype = self.mask_token.dtype
        if use_cfg:
            cond, pooled = torch.cat([cond, null_c.expand(bsz, -1, -1)]), torch.cat([pooled, null_p.expand(bsz, -1, -1)])
            aes = torch.cat([aes, aes])
        condition, condition_pooled = self.project_conditions(cond.to(device, dtype), pooled.to(device, dtype), aes)
        orders = self.sample_orders(bsz, device, generator)
        if not _use_graph(use_cuda_graph, device, generator):
            return self._sample_loop(condition, condition_pooled, orders, schedule, temperature, use_cfg, generator,
                                     progress)
        key = ("kl", bsz, tuple(schedule), float(temperature), use_cfg, dtype)
        return self._graphs(key, lambda c, p, o: self._sample_loop(c, p, o, schedule, temperature, use_cfg, None),
                            [condition, condition_pooled, orders])


# ---------------------------------------------------------------------------------------
# Shared helpers

def _mask_by_order(orders, mask, mask_len, last_step):
    if ops.use_fused("mask_by_order", orders.device):
        return ops.mask_by_order(orders, mask, mask_len, last_step)
    return mask_by_order_ref(orders, mask, mask_len, last_step)


def _check_sampling_args(*, num_sample_steps, guidance_scale, randomize_temperature, steps_name="num_sample_steps",
                         cfg_name="guidance_scale", temperature_name="randomize_temperature") -> None:
    if not isinstance(num_sample_steps, int) or not 1 <= num_sample_steps <= 1024:
        raise ValueError(f"{steps_name}: expected an int in [1, 1024], got {num_sample_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{cfg_name}: expected a finite number >= 0, got {guidance_scale!r}")
    if not isinstance(randomize_temperature, (int, float)) or not math.isfinite(randomize_temperature) \
            or randomize_temperature < 0:
        raise ValueError(f"{temperature_name}: expected a finite number >= 0, got {randomize_temperature!r}")


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


def load_generator(name_or_path, **kwargs) -> "MaskGen_VQ | MaskGen_KL":
    """MaskGen_VQ or MaskGen_KL, whichever the checkpoint's config describes (arguments as
    PretrainedModel.from_pretrained)."""
    return _MaskGenBase.from_pretrained(name_or_path, **kwargs)
