"""The official training step (bytedance/1d-tokenizer, imported from a checkout) on our
benchmark case's config, weights and batch: model forward + its loss module, backward, grad
clipping, AdamW, under autocast fp16 with a GradScaler on CUDA (its configs'
`mixed_precision: fp16`), autocast bf16 on CPU.

Patches for running it at all (peer/README.md, TRAINING.md §0): MaskGen-KL's forward passes
`text_condition` to a DiffLoss that rejects it (dropped here), and draws its orders with a
hard-coded `.cuda()` (replaced on CPU); the loss module's pretrained perceptual networks are
built with random weights (the same compute) so nothing is downloaded. The MaskGIT step
imports modeling.maskgit (needs transformers).
"""
from __future__ import annotations

import contextlib
import copy
import io

import torch
import torch.nn as nn

from tatitok_fast.benchmarks.official import import_official, official_mixed_precision, official_model, offline_perceptual


def _config(case, **losses):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(case.model.config)
    cfg.losses = {**cfg.get("losses", {}), **losses}
    return cfg


def _tokenizer_loss(case, root):
    from omegaconf import OmegaConf

    import modeling.modules.lpips  # noqa: F401  (patched while the loss is built)
    from modeling.modules.losses import ReconstructionLoss_Single_Stage

    base = OmegaConf.load(root / "configs" / "training" / "TA-TiTok" / "tatitok_bl32_vq.yaml")
    cfg = OmegaConf.merge(base, OmegaConf.create({"model": case.model.config["model"]}))
    ours = case.cfg.loss
    cfg.losses.discriminator_start = ours.discriminator_start
    cfg.losses.perceptual_loss = ours.perceptual_loss
    with offline_perceptual():
        return ReconstructionLoss_Single_Stage(cfg)


def _maskgit_step(case, off, fp32: bool):
    """The official scripts/train_maskgit.py step: masking_input_tokens, forward with label
    dropout 0.1, MLMLoss, under autocast bf16 (its config's mixed_precision; fp32: none)
    without a scaler."""
    import modeling.maskgit as maskgit
    from modeling.modules.losses import MLMLoss

    from tatitok_fast.training.recipes.maskgit import official_state_dict

    cls = maskgit.UViTBert if case.model.config["model"]["generator"]["model_type"] == "UViT" else maskgit.ImageBert
    with contextlib.redirect_stdout(io.StringIO()):  # not on meta: HF BERT's position_ids buffers are made at init
        model = cls(copy.deepcopy(case.model.config))
    model.load_state_dict(official_state_dict(case.model), strict=True)  # the trained model keeps a fused qkv
    model = model.to(case.device).train()
    loss_module = MLMLoss(_config(case, label_smoothing=case.cfg.loss.label_smoothing,
                                  loss_weight_unmasked_token=case.cfg.loss.unmasked_weight))
    opt = torch.optim.AdamW(model.parameters(), lr=case.cfg.optimizer.lr, betas=tuple(case.cfg.optimizer.betas),
                            weight_decay=case.cfg.optimizer.weight_decay)
    b, dev = case.batch, case.device
    drop = case.recipe.label_dropout

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=not fp32):
            masked, masks = model.masking_input_tokens(b["tokens"])
            logits = model(masked, b["label"].clone(), cond_drop_prob=drop)
            loss, _ = loss_module(logits, b["tokens"], weights=masks)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


OFFICIAL_VIT_SIZES = ("small", "base", "large")
NOT_OFFICIAL = ("grid_anchored_latents", "decoder_init_canvas")  # our model options (the CPU demo's)


class NotOfficial(ValueError):
    """The case's model has options the official code cannot build: no official row."""


def check_official_config(config: dict) -> None:
    """Raise NotOfficial naming each option of `config` (a model config dict) that
    bytedance/1d-tokenizer lacks: a ViT size outside small/base/large, our demo options."""
    vq = config.get("model", {}).get("vq_model", {})
    bad = [f"{k} = {vq[k]!r}" for k in ("vit_enc_model_size", "vit_dec_model_size")
           if k in vq and vq[k] not in OFFICIAL_VIT_SIZES]
    bad += [f"{k} = {vq[k]!r}" for k in NOT_OFFICIAL if vq.get(k)]
    if bad:
        raise NotOfficial(f"the official code cannot build this model ({', '.join(bad)}; it knows the ViT sizes "
                          f"{', '.join(OFFICIAL_VIT_SIZES)} and none of {', '.join(NOT_OFFICIAL)}): no official row")


def step_fn(case, path: str, fp32: bool = False):
    """The official step in its configs' mixed precision, or in fp32 (`fp32`)."""
    check_official_config(case.model.config)
    if case.cfg.job.recipe == "titok":
        from tatitok_fast.benchmarks.official_titok_training import titok_step_fn

        return titok_step_fn(case, path, fp32)
    off = import_official(path)
    dev, b = case.device, case.batch
    kind = case.cfg.job.recipe
    if kind == "maskgit":
        return _maskgit_step(case, off, fp32)
    cls = off.TATiTok if kind == "tatitok" else (off.MaskGen_KL if case.recipe.mode == "vae" else off.MaskGen_VQ)
    model = official_model(cls, case.model).train().requires_grad_(True)
    loss_module = None
    if kind == "tatitok":
        loss_module = _tokenizer_loss(case, off.root).to(dev).train()
    elif case.recipe.mode == "vq":
        from modeling.modules.losses import MLMLoss

        loss_module = MLMLoss(_config(case, label_smoothing=case.cfg.loss.label_smoothing,
                                      loss_weight_unmasked_token=case.cfg.loss.unmasked_weight))
    else:
        diffloss = model.diffloss
        plain = type(diffloss).forward
        diffloss.forward = lambda target, z, mask=None, text_condition=None: plain(diffloss, target, z, mask)
        if dev.type != "cuda":
            n = model.seq_len
            model.sample_orders = lambda bsz: torch.rand(bsz, n).argsort(-1).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=case.cfg.optimizer.lr, betas=tuple(case.cfg.optimizer.betas),
                            weight_decay=case.cfg.optimizer.weight_decay)
    d_opt = (torch.optim.AdamW(loss_module.parameters(), lr=case.cfg.aux_optimizer.lr)
             if kind == "tatitok" else None)
    amp, backward_step = official_mixed_precision(dev, fp32)

    def step():
        with torch.autocast(**amp):
            if kind == "tatitok":
                recon, extra = model(b["image"], b["guidance"])
                loss, _ = loss_module(b["image"], recon, extra, 1, mode="generator")
            elif case.recipe.mode == "vq":
                logits, masks = model(b["tokens"], b["condition"], b["condition_pooled"], b["aes_score"])
                loss, _ = loss_module(logits, b["tokens"], masks)
            else:
                loss, _ = model(b["tokens"], b["condition"], b["condition_pooled"], b["aes_score"])
        backward_step(loss, model.parameters(), opt)
        if kind == "tatitok":
            with torch.autocast(**amp):
                d_loss, _ = loss_module(b["image"], recon, extra, 1, mode="discriminator")
            backward_step(d_loss, loss_module.parameters(), d_opt)
        return loss.detach()

    return step
