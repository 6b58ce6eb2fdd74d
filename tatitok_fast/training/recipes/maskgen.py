"""MaskGen-VQ / MaskGen-KL training from token shards (what `tatitok-fast tokenize` writes).

    token shard --decode--> tokens, caption, aes_score
        --batch_transform--> CLIP penultimate (B, 77, W) + pooled (B, 1, E), caption dropout
                             (both -> the "" encoding, p = text_drop_prob), VQ masks
        --forward_loss--> VQ: logits -> masked-token CE (label smoothing, unmasked weight 0.1)
                          KL: posterior sample x scale -> MAE decoder -> DiffLoss (masked tokens)

VQ masks and caption dropout are drawn per sample from the sample's stream seed, so they do
not depend on the rank count, and a resumed run draws the same ones. MaskGen-KL's own draws
(posterior sample, batch masking rate, orders, diffusion steps) come from the rank's torch
generator, which checkpoints restore.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast.training.config import opt
from tatitok_fast.training.recipes import common
from tatitok_fast.training.spec import Recipe, StepOutput, per_sample_generators

SALT_MASK, SALT_DROP, SALT_KL, SALT_RATE = 1, 2, 3, 4


@dataclass
class MaskGenLossConfig:
    label_smoothing: float = opt(0.1, "VQ: cross-entropy label smoothing")
    unmasked_weight: float = opt(0.1, "VQ: loss weight of unmasked positions (masked: 1.0)")
    text_drop_prob: float = opt(-1.0, "caption dropout for CFG (-1 = the model config's text_drop_prob)")
    default_aes_score: float = opt(6.0, "aesthetic score of samples that carry none")


class MaskGenRecipe(Recipe):
    name = "maskgen"
    loss_config = MaskGenLossConfig

    # ---- model ----
    def build_model(self) -> nn.Module:
        from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ

        config = common.model_config(self.cfg.model, "generator")
        self.mode = config["model"]["vq_model"].get("quantize_mode", "vq")
        model = common.build(MaskGen_KL if self.mode == "vae" else MaskGen_VQ, config, self.cfg)
        for block in self.blocks(model)[: model.config["model"]["maskgen"]["decoder_depth"]]:
            if block.context_pre_only:  # its text queries are never computed: no gradient, no optimizer state
                block.attn.add_q_proj.requires_grad_(False)
        self.num_tokens = model.image_seq_len if self.mode == "vq" else model.seq_len
        self.codebook_size = getattr(model, "target_codebook_size", None)
        self.token_size = None if self.mode == "vq" else model.token_embed_dim
        if self.mode == "vae":  # what _kl_draws draws: DiffLoss's repeat count and timesteps
            self.diffusion_mul = model.diffusion_batch_mul
            self.timesteps = model.diffloss.train_diffusion.num_timesteps
        p = self.cfg.loss.text_drop_prob
        self.text_drop_prob = model.text_drop_prob if p < 0 else p
        return model.train()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if self.mode == "vq":
            return list(model.blocks)
        return list(model.decoder_blocks) + list(model.diffloss.net.res_blocks)  # MM-DiT, then DiffLoss MLP

    def build_frozen(self) -> None:
        self.text = common.text_encoder(self.cfg.model.text_encoder, self.device, self.cfg.model.text_cache)

    # ---- data ----
    def decode_sample(self, sample: dict, rng: np.random.Generator) -> dict:
        from tatitok_fast.token_shards import decode_token_sample

        if "aes_score" not in sample:
            sample = {**sample, "aes_score": str(self.cfg.loss.default_aes_score).encode()}
        out = decode_token_sample(sample, mode=self.mode, num_tokens=self.num_tokens,
                                  codebook_size=self.codebook_size, token_size=self.token_size,
                                  recap_prob=self.cfg.data.recap_prob, rng=rng)
        out["aes_score"] = torch.tensor(float(out["aes_score"]), dtype=torch.float32)
        return out

    def batch_transform(self, batch: dict) -> dict:
        enc = self.text(batch["text"])
        cond, pooled = enc.penultimate.float(), enc.pooled.float()  # (B, 77, W), (B, 1, E)
        null = self.text.empty_prompt(1)
        b = cond.shape[0]
        drop = torch.tensor([bool(torch.rand(1, generator=g) < self.text_drop_prob)
                             for g in per_sample_generators(batch["__seed__"], SALT_DROP)], device=cond.device)
        d = drop.view(b, 1, 1)
        batch["condition"] = torch.where(d, null.penultimate.float().to(cond.device), cond)
        batch["condition_pooled"] = torch.where(d, null.pooled.float().to(cond.device), pooled)
        batch["text_dropped"] = drop
        if self.mode == "vq":
            batch["masks"] = self._vq_masks(batch["__seed__"], self.num_tokens).to(cond.device)
        else:
            batch.update({k: v.to(cond.device) for k, v in self._kl_draws(batch["__seed__"]).items()})
        return batch

    def _kl_draws(self, seeds) -> dict[str, torch.Tensor]:
        """MaskGen-KL's training draws per sample (the model would draw them per rank from
        the global generator): posterior noise (B, C, 1, N), orders (B, N), DiffLoss's t and
        noise in its row order (m copies of the B*N tokens: (m*B*N,), (m*B*N, C))."""
        n, c, m = self.num_tokens, self.token_size, self.diffusion_mul
        noise, orders, t, eps = [], [], [], []
        for g in per_sample_generators(seeds, SALT_KL):
            noise.append(torch.randn(c, 1, n, generator=g))
            orders.append(torch.rand(n, generator=g).argsort())
            t.append(torch.randint(0, self.timesteps, (m, n), generator=g))
            eps.append(torch.randn(m, n, c, generator=g))
        return {"kl_noise": torch.stack(noise), "kl_orders": torch.stack(orders),
                "diff_t": torch.stack(t, 1).reshape(-1), "diff_noise": torch.stack(eps, 1).reshape(-1, c)}

    def _vq_masks(self, seeds, n: int) -> torch.Tensor:
        """(B, N) bool: per sample t ~ U(0, 1), ratio = arccos schedule, round(N * ratio) >= 1
        positions chosen uniformly (the official per-sample masking)."""
        from tatitok_fast.models.generators.maskgen import get_masking_ratio

        rows = []
        for g in per_sample_generators(seeds, SALT_MASK):
            t = torch.rand(1, generator=g)
            ratio = get_masking_ratio(t, "arccos").clamp(1e-6, 1.0)
            num = (n * ratio).round().clamp(min=1)
            rows.append(torch.rand(n, generator=g).argsort() < num)
        return torch.stack(rows)

    # ---- step ----
    def forward_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        aes = batch["aes_score"]
        if self.mode == "vq":
            from tatitok_fast.losses.generator import masked_token_loss

            tokens, masks = batch["tokens"], batch["masks"]
            logits, _ = model(tokens, batch["condition"], batch["condition_pooled"], aes, masks=masks)
            loss, metrics = masked_token_loss(logits.float(), tokens, masks, self.cfg.loss.label_smoothing,
                                              self.cfg.loss.unmasked_weight)
            metrics.pop("loss", None)
        else:
            # one masking rate per step (officially per batch), the same on every rank
            rate = per_sample_generators([self.cfg.training.seed * 1_000_003 + step], SALT_RATE)[0]
            loss, metrics = model(batch["tokens"], batch["condition"], batch["condition_pooled"], aes,
                                  noise=batch["kl_noise"], orders=batch["kl_orders"],
                                  mask_t=torch.rand(1, generator=rate), diff_t=batch["diff_t"],
                                  diff_noise=batch["diff_noise"])
            metrics = {k: v for k, v in metrics.items() if k != "loss"}
        metrics["text_dropped"] = batch["text_dropped"].float().mean()
        return StepOutput(loss, metrics)

    def flops_per_sample(self, model: nn.Module) -> float:
        """6 x (image-stream params x N + text-stream params x L) + attention, per sample:
        an estimate for MFU (per-sample adaLN projections and the DiffLoss MLP left out)."""
        blocks = list(model.blocks if self.mode == "vq" else model.decoder_blocks)
        n, s = self.num_tokens, model.text_context_length
        img = txt = 0
        for blk in blocks:
            for name, mod in blk.named_modules():
                if isinstance(mod, nn.Linear) and "norm" not in name:
                    text_side = "add_" in name or "context" in name
                    txt += mod.weight.numel() if text_side else 0
                    img += 0 if text_side else mod.weight.numel()
        dim = model.config["model"]["maskgen"]["decoder_embed_dim"]
        attn = 12 * len(blocks) * dim * (n + s) ** 2
        head = 6 * n * dim * (self.codebook_size or 0)
        return 6.0 * (img * n + txt * s) + attn + head

    # ---- outputs ----
    def log_samples(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """Images for the fixed prompts with the EMA weights, decoded by model.tokenizer."""
        prompts = self.cfg.samples.prompts
        if not prompts or not self.cfg.model.tokenizer:
            return {}
        tok = self._tokenizer()
        steps = self.cfg.samples.steps or None
        gen = torch.Generator(self.device).manual_seed(self.cfg.training.seed)
        if self.mode == "vq":
            ids = model.generate(prompts, text_encoder=self.text, generator=gen, use_cuda_graph=False,
                                 **({"num_sample_steps": steps} if steps else {}))
            images = tok.decode_tokens(ids, self.text(prompts).guidance.to(tok.decoder.class_embedding.dtype))
        else:
            z = model.sample_tokens(len(prompts), captions=prompts, text_encoder=self.text, generator=gen,
                                    use_cuda_graph=False, **({"num_iter": steps} if steps else {}))
            images = tok.decode_tokens(z, self.text(prompts).guidance)
        return {"generated": images.float().clamp(0, 1)}

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from tatitok_fast import TATiTok

            self._tok = TATiTok.from_pretrained(self.cfg.model.tokenizer, device=self.device).eval()
        return self._tok

    def export(self, model: nn.Module, out_dir) -> None:
        model.save_pretrained(out_dir)

