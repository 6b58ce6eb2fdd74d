"""TiTok's class-conditional MaskGIT generators (ImageBert, UViTBert) from class-labelled token
shards (`tatitok-fast tokenize --labels`, or `--from-jsonl` for the official pretokenized jsonl):
the official scripts/train_maskgit.py step.

    token shard --decode--> tokens (N,) int64, label
             + label dropout (p = loss.class_label_dropout -> the class-drop label C),
               training masks (the official masking_input_tokens draws)
        --forward_loss--> logits (B, N, K) -> MLMLoss: label-smoothed CE on every position,
                          weight 1 on masked and loss.unmasked_weight on visible ones

Masks and label dropout are drawn per sample in the data-loader workers from the sample's
seeded rng (not from the global RNG as the official forward does), so they do not depend on
the rank count, a resumed run draws the same ones, and the step does no host-side work; the
model then runs with cond_drop_prob 0.

model.config: titok_l32 / titok_b64 / titok_s128 (the official generator configs), tiny_maskgit
/ tiny_uvit (CPU tests), or a config.json path; model.overrides apply on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast.training.config import opt
from tatitok_fast.training.errors import ConfigError
from tatitok_fast.training.recipes import common
from tatitok_fast.training.spec import Recipe, StepOutput

def tiny_maskgit_config(model_type: str = "ViT") -> dict:
    """A 64-wide MaskGIT over 16 tokens of a 64-code tokenizer, 10 classes (CPU tests)."""
    layers = 2 if model_type == "ViT" else 3  # U-ViT: 1 in-block, the mid-block, 1 out-block
    return {"model": {"vq_model": {"codebook_size": 64, "num_latent_tokens": 16},
                      "generator": {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": layers,
                                    "num_attention_heads": 4, "intermediate_size": 128, "dropout": 0.1,
                                    "attn_drop": 0.1, "num_steps": 4, "class_label_dropout": 0.1,
                                    "image_seq_len": 16, "condition_num_classes": 10,
                                    "randomize_temperature": 1.0, "guidance_scale": 4.5,
                                    "guidance_decay": "constant"}},
            "dataset": {"preprocessing": {"crop_size": 32}}}


TINY = {"tiny_maskgit": "ViT", "tiny_uvit": "UViT"}


def maskgit_config(model_cfg) -> dict:
    """model.config + model.overrides -> the official generator config (model.vq_model +
    model.generator)."""
    from tatitok_fast import presets

    name = model_cfg.config
    if name in presets.TITOK_GENERATORS:
        config = presets.titok_generator_config(name)
    elif name in TINY:
        config = tiny_maskgit_config(TINY[name])
    elif name.endswith(".json") or Path(name).is_dir():
        config = common.model_config(model_cfg, "generator")  # reads the file, applies the overrides
        config["model"].pop("text_encoder", None)  # a class-conditional model has none
        return config
    else:
        raise ConfigError(f"model.config: {name!r} is not a MaskGIT generator preset "
                          f"({sorted(presets.TITOK_GENERATORS)}), {sorted(TINY)}, or a config.json path / directory")
    return common.apply_overrides(config, model_cfg.overrides)


def training_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, True = masked: the official ImageBert.masking_input_tokens draws for one row
    (maskgit.py:195-206), in its order: t ~ U(0, 1), ratio = arccos(t) / (pi / 2) clamped to
    [1e-6, 1], round(n * ratio) >= 1 positions, chosen by an argsort of U(0, 1) noise."""
    from tatitok_fast.models.generators.maskgen_schedules import get_masking_ratio

    t = torch.rand(1, generator=generator)
    num = (n * get_masking_ratio(t, "arccos").clamp(min=1e-6, max=1.0)).round().clamp(min=1)
    return (torch.rand(1, n, generator=generator).argsort(dim=-1) < num[:, None])[0]


def _train_with_fused_qkv(model: nn.Module) -> None:
    """ImageBert's attention shows its fused `qkv` as HF's query/key/value in state_dict() (a
    post-hook); DCP's state-dict helpers map state-dict keys back to parameters by name and fail
    on those. The trained model keeps `qkv.*` keys (checkpoints); the export, a fresh model,
    writes the official query/key/value again."""
    from tatitok_fast.models.generators.maskgit_blocks import _split_qkv_on_save

    for m in model.modules():
        hooks = getattr(m, "_state_dict_hooks", {})
        for key in [k for k, h in hooks.items() if h is _split_qkv_on_save]:
            del hooks[key]


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A trained model's state dict in the official layout (query/key/value split again)."""
    from tatitok_fast.models.generators.maskgit_blocks import BertSelfAttention, _split_qkv_on_save

    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, BertSelfAttention):
            _split_qkv_on_save(m, sd, f"{name}.", None)
    return sd


@dataclass
class MaskGITLossConfig:
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing (official losses.label_smoothing)")
    unmasked_weight: float = opt(0.1, "loss weight of unmasked positions (official loss_weight_unmasked_token)")
    class_label_dropout: float = opt(-1.0, "label dropout for CFG (-1 = the model config's class_label_dropout)")


class MaskGITRecipe(Recipe):
    name = "maskgit"
    loss_config = MaskGITLossConfig

    # ---- model ----
    def build_model(self) -> nn.Module:
        from tatitok_fast import ImageBert

        config = maskgit_config(self.cfg.model)
        try:
            cls = ImageBert.class_for_config(config)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"model.config {self.cfg.model.config}: {exc}") from None
        model = common.build(cls, config, self.cfg)
        _train_with_fused_qkv(model)
        self.num_tokens = model.image_seq_len
        self.codebook_size = model.target_codebook_size
        self.num_classes = model.condition_num_classes
        p = self.cfg.loss.class_label_dropout
        self.label_dropout = float(config["model"]["generator"].get("class_label_dropout", 0.1)) if p < 0 else p
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ConfigError(f"loss.class_label_dropout: expected a probability in [0, 1], got {self.label_dropout}")
        return model.train()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if hasattr(model, "model"):  # ImageBert: the BERT layers
            return list(model.model.encoder.layer)
        return [*model.in_blocks, model.mid_block, *model.out_blocks]

    def build_frozen(self) -> None:
        classes = self.cfg.samples.prompts
        if self.cfg.samples.interval and classes and self.cfg.model.tokenizer:
            if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < self.num_classes for c in classes):
                raise ConfigError(f"samples.prompts: the maskgit recipe samples class ids in [0, {self.num_classes}), "
                                  f"got {classes}")
            self._tokenizer()  # a missing or mismatched tokenizer fails here, before training
        self._inception = None
        e = self.cfg.eval
        if e.interval and e.reference:  # gFID: everything it needs is checked here, before training
            from tatitok_fast.evaluation.inception import InceptionFeatures
            from tatitok_fast.weight_files import WeightsFileError

            if not Path(e.reference).is_file():
                raise ConfigError(f"eval.reference: no such file: {e.reference}")
            if not self.cfg.model.tokenizer:
                raise ConfigError("eval.reference: gFID needs model.tokenizer (the TiTok that decodes the tokens)")
            if e.num_samples < 2:
                raise ConfigError(f"eval.num_samples: expected >= 2 for FID, got {e.num_samples}")
            self._tokenizer()
            try:
                self._inception = InceptionFeatures(e.inception_weights or None, device=self.device)
            except (WeightsFileError, ValueError, ImportError, OSError) as exc:
                raise ConfigError(f"eval.inception_weights: {exc}") from None

    # ---- data ----
    def decode_sample(self, sample: dict, rng: np.random.Generator) -> dict:
        """-> tokens (N,), label, and this sample's training draws (in the loader workers, from
        the sample's seeded rng): input_ids (N,) with masked positions = K, masks (N,) bool
        (the official masking_input_tokens draws), label_dropped, condition (C when dropped)."""
        from tatitok_fast.token_shards import decode_class_token_sample

        out = decode_class_token_sample(sample, num_tokens=self.num_tokens, codebook_size=self.codebook_size,
                                        num_classes=self.num_classes)
        g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        masks = training_masks(self.num_tokens, g)
        dropped = bool(torch.rand(1, generator=g) < self.label_dropout)
        out.update(input_ids=torch.where(masks, self.codebook_size, out["tokens"]), masks=masks,
                   label=torch.tensor(out["label"], dtype=torch.long), label_dropped=torch.tensor(dropped),
                   condition=torch.tensor(self.num_classes if dropped else out["label"], dtype=torch.long))
        return out

    # ---- step ----
    def forward_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        from tatitok_fast.losses.generator import masked_token_loss

        logits = model(batch["input_ids"], batch["condition"], cond_drop_prob=0.0)  # (B, N, K)
        loss, metrics = masked_token_loss(logits.float(), batch["tokens"], batch["masks"],
                                          self.cfg.loss.label_smoothing, self.cfg.loss.unmasked_weight)
        metrics.pop("loss", None)
        metrics["label_dropped"] = batch["label_dropped"].float().mean()
        return StepOutput(loss, metrics)

    def flops_per_sample(self, model: nn.Module) -> float:
        """6 x block params x (N + 1) + attention + the lm_head: an estimate for MFU."""
        n = self.num_tokens + 1
        params = sum(p.numel() for blk in self.blocks(model) for p in blk.parameters() if p.dim() == 2)
        attn = 12 * len(self.blocks(model)) * model.hidden_size * n ** 2
        return 6.0 * params * n + attn + 6.0 * self.num_tokens * model.hidden_size * self.codebook_size

    # ---- outputs ----
    def log_samples(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """Images of the classes in samples.prompts (class ids) with the EMA weights and the
        config's sampling settings (official training: guidance 4.5 constant, temperature 1.0,
        8 steps), decoded by model.tokenizer (a TiTok preset, Hub id or export)."""
        classes = self.cfg.samples.prompts
        if not classes or not self.cfg.model.tokenizer:
            return {}
        ids = self._generate(model, classes, torch.Generator(self.device).manual_seed(self.cfg.training.seed))
        tok = self._tokenizer()
        return {"generated": tok.detokenize(ids.view(ids.shape[0], 1, -1)).float().clamp(0, 1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """gFID (and sFID, IS, precision / recall) of eval.num_samples images, classes 0, 1, ...
        in turn, with the EMA weights and the config's sampling settings, against eval.reference
        (the numbers of `tatitok-fast eval fid`)."""
        import tempfile

        from tatitok_fast.evaluation.fid import evaluate_sample_batch

        if getattr(self, "_inception", None) is None:
            return {}
        n, bs = self.cfg.eval.num_samples, self.cfg.training.local_batch_size
        classes = [i % self.num_classes for i in range(n)]
        tok, images = self._tokenizer(), []
        gen = torch.Generator(self.device).manual_seed(self.cfg.training.seed)
        for i in range(0, n, bs):
            ids = self._generate(model, classes[i: i + bs], gen)
            x = tok.detokenize(ids.view(ids.shape[0], 1, -1)).float().clamp(0, 1)
            images.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "samples.npz"
            np.savez(path, arr_0=np.concatenate(images))
            out = evaluate_sample_batch(str(path), self.cfg.eval.reference, self._inception, batch_size=bs)
        return {k: float(out[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")
                if out.get(k) is not None}

    def _generate(self, model: nn.Module, classes: list[int], gen: torch.Generator) -> torch.Tensor:
        g = model.config["model"]["generator"]
        return model.generate(torch.tensor(classes, device=self.device),
                              guidance_scale=float(g.get("guidance_scale", 4.5)),
                              guidance_decay=g.get("guidance_decay", "constant"),
                              randomize_temperature=float(g.get("randomize_temperature", 1.0)),
                              num_sample_steps=self.cfg.samples.steps or int(g.get("num_steps", 8)),
                              generator=gen, use_cuda_graph=False)

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from tatitok_fast import TiTok

            self._tok = TiTok.from_pretrained(self.cfg.model.tokenizer, device=self.device).eval()
            if self._tok.codebook_size != self.codebook_size or self._tok.num_latent_tokens != self.num_tokens:
                raise ConfigError(f"model.tokenizer {self.cfg.model.tokenizer}: makes {self._tok.num_latent_tokens} "
                                  f"tokens of {self._tok.codebook_size} codes, the generator models "
                                  f"{self.num_tokens} of {self.codebook_size}")
        return self._tok
