"""The official TiTok training steps (scripts/train_titok.py) on a benchmark case of the
`titok` recipe: the same config, weights and synthetic batch as ours.

    stage 1: TiTok(x) -> logits (B, 1024, G, G) -> ReconstructionLoss_Stage1(codes, logits, q)
    stage 2 / single-stage: TiTok(x) -> images -> ReconstructionLoss_Stage2 /
        ReconstructionLoss_Single_Stage (generator, then discriminator with its own AdamW)

The MaskGIT-VQGAN's target codes are part of the synthetic batch (the frozen helper runs
outside the timed step on both sides, as the text tower does for TA-TiTok); fp16 autocast with
a GradScaler on CUDA (the configs' mixed_precision), bf16 autocast on CPU; perceptual
networks with random weights (official.offline_perceptual).

On CPU the official loss runs its perceptual networks in bf16 (its
`torch.cuda.amp.autocast(enabled=False)` leaves CPU autocast on) while ours keeps the loss in
fp32, as both do on CUDA: for recipes with a perceptual term the CPU ratio is not like for like
(measured: the official single-stage generator loss 0.45 s in bf16 vs 4.6 s in fp32, ours 1.2 s
in fp32; B=4, 64 px, 2 cores).
"""
from __future__ import annotations

import torch

from tatitok_fast.benchmarks.official import import_official, official_mixed_precision, official_model


def titok_batch(case, g: torch.Generator) -> dict:
    """Images (B, 3, S, S) in [0, 1] and, for stage 1, random VQGAN codes (B, G*G)."""
    b, s, dev = case.batch_size, case.model.image_size, case.device
    out = {"image": torch.rand(b, 3, s, s, generator=g).to(dev)}
    if case.recipe.stage == "stage1":
        out["codes"] = torch.randint(0, 1024, (b, (s // 16) ** 2), generator=g).to(dev)
    return out


def _loss(case, root, stage: str):
    from omegaconf import OmegaConf

    import modeling.modules.lpips  # noqa: F401  (patched while the loss is built)
    from modeling.modules import losses

    from tatitok_fast.benchmarks.official import offline_perceptual

    c = case.cfg.loss
    cfg = OmegaConf.create({"model": case.model.config["model"], "losses": {
        "quantizer_weight": c.quantizer_weight, "reconstruction_loss": c.reconstruction_loss,
        "reconstruction_weight": c.reconstruction_weight, "perceptual_loss": c.perceptual_loss,
        "perceptual_weight": c.perceptual_weight, "discriminator_start": c.discriminator_start,
        "discriminator_factor": c.discriminator_factor, "discriminator_weight": c.discriminator_weight,
        "lecam_regularization_weight": c.lecam_regularization_weight, "lecam_ema_decay": c.lecam_ema_decay,
        "kl_weight": c.kl_weight, "logvar_init": c.logvar_init}})
    if stage == "stage1":
        return losses.ReconstructionLoss_Stage1(cfg)
    cls = losses.ReconstructionLoss_Stage2 if stage == "stage2" else losses.ReconstructionLoss_Single_Stage
    with offline_perceptual():
        return cls(cfg)


def titok_step_fn(case, path: str, fp32: bool = False):
    off = import_official(path)
    from modeling.titok import TiTok

    dev, b, stage = case.device, case.batch, case.recipe.stage
    model = official_model(TiTok, case.model).train()
    for name, p in model.named_parameters():  # the official freezing (TiTok.__init__ / stage 2)
        p.requires_grad_(stage != "stage2" or not name.startswith(("encoder.", "quantize.", "latent_tokens")))
    loss_module = _loss(case, off.root, stage).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=case.cfg.optimizer.lr, betas=tuple(case.cfg.optimizer.betas),
                            weight_decay=case.cfg.optimizer.weight_decay)
    d_opt = torch.optim.AdamW(loss_module.parameters(), lr=case.cfg.aux_optimizer.lr) if stage != "stage1" else None
    amp, backward_step = official_mixed_precision(dev, fp32)

    def step():
        with torch.autocast(**amp):
            out, extra = model(b["image"])
            if stage == "stage1":
                loss, _ = loss_module(b["codes"], out, extra)
            else:
                loss, _ = loss_module(b["image"], out, extra, 1, mode="generator")
        backward_step(loss, params, opt)
        if d_opt is not None:
            with torch.autocast(**amp):
                d_loss, _ = loss_module(b["image"], out, extra, 1, mode="discriminator")
            backward_step(d_loss, list(loss_module.parameters()), d_opt)
        return loss.detach()

    return step
