"""MaskGen-KL: text -> continuous TA-TiTok tokens (MAE-style MM-DiT + DiffLoss), a drop-in
for the reference's `modeling.maskgen.MaskGen_KL` (same config, same state-dict keys)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from tatitok_fast import ops
from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.generators.diffloss import DiffLoss
from tatitok_fast.models.generators.graph_runner import _use_graph, graph_key
from tatitok_fast.models.nn.layers import Linear
from tatitok_fast.models.generators.maskgen_base import _mask_by_order, _MaskGenBase, _validate_generator_config, aesthetic_scores
from tatitok_fast.models.generators.maskgen_schedules import KLStep, _check_sampling_args, get_masking_ratio, sinusoid_interleaved
from tatitok_fast.models.generators.mmdit import AdaLayerNormContinuous, MMDiT
from tatitok_fast.models.nn.pretrained import default_text_encoder
from tatitok_fast.ops.reference import kl_sample_ref
from tatitok_fast.models.generators.text_conditions import _check_captions, text_conditions


class MaskGen_KL(_MaskGenBase):
    """MaskGen with continuous tokens: MAE-style MM-DiT decoder + DiffLoss head.

    forward_mae_decoder(x (B, N, C), mask (B, N), condition (B, 77, D), condition_pooled
    (B, 1, D)) -> per-token conditions z (B, N, D) (conditions already projected).
    forward(imgs (B, 2C, 1, N) posterior parameters, condition, condition_pooled, aes_score)
    -> (diffusion loss, loss dict).
    """

    config_quantize_mode = "vae"

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
        # the reference reads this flag with OmegaConf .get on a dotted key: always False there
        self.set_grad_checkpointing(bool(cfg_get(config, "training.grad_checkpointing", False)))

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
        """Recompute the MM-DiT blocks and DiffLoss's residual blocks in the backward pass."""
        self.decoder_blocks.grad_checkpointing = bool(enable)
        self.diffloss.set_grad_checkpointing(enable)

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

    def random_masking(self, orders: torch.Tensor, generator: torch.Generator | None = None,
                       t: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B, N) float mask, 1 = masked: one rate for the whole batch, arccos(t) / (pi / 2)
        with t ~ U(0, 1) (drawn on the host from `generator` unless given), masking the first
        ceil(N * rate) positions of each sample's order."""
        if t is None:
            t = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu")
        rate = get_masking_ratio(torch.as_tensor(t, dtype=torch.float32).reshape(1).cpu()).clamp(1e-6, 1.0)
        num = int(math.ceil(self.seq_len * float(rate)))  # host value: one static count per batch
        return _mask_by_order(orders, torch.ones_like(orders, dtype=torch.bool), num, False)[0].float()

    def sample_latents(self, imgs: torch.Tensor, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior parameters (B, 2C, 1, N) -> scale_factor * a fresh posterior sample, (B, N, C)
        fp32. noise: optional (B, C, 1, N) standard normal noise (else drawn from `generator`)."""
        if ops.use_fused("kl_sample", imgs.device):  # noise drawn in the kernel unless given
            sample = ops.kl_sample(imgs, noise, False, generator)[0]
        else:
            if noise is None:  # the twin ignores generators: draw it here
                b, c2, h, w = imgs.shape
                noise = torch.randn(b, c2 // 2, h, w, device=imgs.device, generator=generator)
            sample = kl_sample_ref(imgs, noise, False)[0]
        return self.patchify(sample * self.vae_scale_factor)

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None):
        """DiffLoss over every token (B*N rows, repeated diffusion_batch_mul times), averaged over
        the masked ones. z (B, N, D), target (B, N, C), mask (B, N) -> (loss, {"diff_loss"}).
        The reference also passes the pooled text condition, which its DiffLoss rejects
        (TypeError): the net has no such input, so it is dropped here."""
        b, n, _ = target.shape
        m = self.diffusion_batch_mul
        return self.diffloss(target.reshape(b * n, -1).repeat(m, 1), z.reshape(b * n, -1).repeat(m, 1),
                             mask.reshape(b * n).repeat(m), generator=generator, **_given(t=t, noise=noise))

    def forward(self, imgs, condition, condition_pooled, aes_score=None, generator: torch.Generator | None = None,
                *, noise: torch.Tensor | None = None, orders: torch.Tensor | None = None,
                mask_t: torch.Tensor | float | None = None, diff_t: torch.Tensor | None = None,
                diff_noise: torch.Tensor | None = None):
        """Training loss. imgs: (B, 2C, 1, N) tokenizer posterior parameters (mean, logvar);
        condition (B, 77, W), condition_pooled (B, 1, W) raw CLIP states; aes_score (B,).
        generator: draws the posterior noise, the orders, the masking rate and DiffLoss's t and
        noise (default: torch's global generators). Returns (loss, {"diff_loss": ...}).
        Draws given instead (training passes per-sample ones, the same at any world size):
        noise (B, C, 1, N), orders (B, N), mask_t (the rate's U(0, 1) draw), diff_t
        (m*B*N,) and diff_noise (m*B*N, C) in DiffLoss's row order (m = diffusion_batch_mul)."""
        b = imgs.shape[0]
        expected = (2 * self.vae_embed_dim, 1, self.seq_len)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected or not imgs.is_floating_point():
            raise ValueError(f"imgs: expected posterior parameters (B, {', '.join(map(str, expected))}) as floats, "
                             f"got {imgs.dtype} {tuple(imgs.shape)}")
        condition, condition_pooled = self.project_conditions(condition, condition_pooled, aes_score)
        x = self.sample_latents(imgs, generator, **_given(noise=noise))  # (B, N, C)
        if orders is None:
            orders = self.sample_orders(b, imgs.device, generator)  # (B, N)
        mask = self.random_masking(orders, generator, **_given(t=mask_t)).to(imgs.device)  # (B, N) 1 = masked
        z = self.forward_mae_decoder(x, mask, condition, condition_pooled)  # (B, N, D)
        return self.forward_loss(z, x.detach(), mask, generator, diff_t, diff_noise)

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
        launch). aes_scores: the aesthetic micro-condition, a number, a 0-d tensor or a (B,)
        tensor; None: the config's sample_aesthetic_score (the reference fails on None for
        micro-conditioned models); ignored by models without micro-conditioning."""
        captions = _check_captions(list(captions) if isinstance(captions, tuple) else captions)
        if not isinstance(bsz, int) or bsz <= 0:
            raise ValueError(f"bsz: expected a positive int, got {bsz!r}")
        if len(captions) != bsz:
            raise ValueError(f"captions: expected bsz={bsz} captions, got {len(captions)}")
        _check_sampling_args(num_sample_steps=num_iter, guidance_scale=cfg, randomize_temperature=temperature,
                             steps_name="num_iter", cfg_name="cfg", temperature_name="temperature")
        device = self.mask_token.device
        aes = aesthetic_scores(aes_scores, bsz, self.sample_aesthetic_score, device, "aes_scores")
        schedule = self.sampling_schedule(num_iter, cfg, cfg_schedule)
        use_cfg = cfg != 1.0
        cond, pooled, null_c, null_p = text_conditions(captions, text_encoder, clip_tokenizer, clip_encoder,
                                                       default_encoder=lambda: default_text_encoder(self, device),
                                                       context_length=self.text_context_length)
        dtype = self.mask_token.dtype
        if use_cfg:
            cond, pooled = torch.cat([cond, null_c.expand(bsz, -1, -1)]), torch.cat([pooled, null_p.expand(bsz, -1, -1)])
            aes = torch.cat([aes, aes])
        condition, condition_pooled = self.project_conditions(cond.to(device, dtype), pooled.to(device, dtype), aes)
        orders = self.sample_orders(bsz, device, generator)
        if not _use_graph(use_cuda_graph, device, generator):
            return self._sample_loop(condition, condition_pooled, orders, schedule, temperature, use_cfg, generator,
                                     progress)
        key = graph_key("kl", bsz, tuple(schedule), float(temperature), use_cfg, dtype)
        return self._graphs(key, lambda c, p, o: self._sample_loop(c, p, o, schedule, temperature, use_cfg, None),
                            [condition, condition_pooled, orders], module=self)


def _given(**draws) -> dict:
    """The draws a caller passed (None: drawn by the callee)."""
    return {k: v for k, v in draws.items() if v is not None}
