"""TiTok tokenizer training on image shards (TITOK.md §8): the official two stages, and
single-stage TiTok (VQ / VAE) with TA-TiTok's one-stage losses.

The stage follows from the model config (model.vq_model):

    stage 1 (finetune_decoder = false, is_legacy): images --frozen MaskGIT-VQGAN encode--> 16x16
        codes (the targets, on the fly, no grad) ; images --TiTok--> logits (B, 1024, G, G)
        --> proxy_code_loss = CE(logits, codes) + quantizer_weight * quantizer_loss
    stage 2 (finetune_decoder = true): from a stage-1 export (model.init_from) plus the VQGAN's
        decoder.* / quantize.* as pixel_decoder.* / pixel_quantize.*; encoder, quantizer and
        latent tokens frozen (TiTok does it); TokenizerLoss "vq" (= ReconstructionLoss_Stage2:
        L2 + ConvNeXt-S perceptual + hinge GAN with LeCAM from loss.discriminator_start)
    single-stage (finetune_decoder = false, is_legacy = false): TokenizerLoss "vq" / "vae"
        (= ReconstructionLoss_Single_Stage), as the TA-TiTok recipe.

The MaskGIT-VQGAN is a frozen helper on the recipe (never sharded, optimized or saved), built
from loss.vqgan_weights: the official maskgit-vqgan-imagenet-f16-256.bin, a local file, or
"random" (a seeded stand-in of the same classes, loss.vqgan_hidden_channels wide: tiny runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast import presets
from tatitok_fast.losses.tokenizer import TokenizerLoss, TokenizerLossConfig, _f, proxy_code_loss
from tatitok_fast.training.config import ConfigError
from tatitok_fast.training.data import decode_image
from tatitok_fast.training.recipes import common
from tatitok_fast.training.recipes.tatitok import IMAGE_KEYS, random_resized_crop
from tatitok_fast.training.spec import Recipe, StepOutput

# tiny configs (not official ViT sizes: "tiny" is 128 wide, 4 layers); crop 64, 16 tokens
TINY = {
    "tiny_titok_stage1": lambda: _tiny_two_stage(finetune_decoder=False),
    "tiny_titok_stage2": lambda: _tiny_two_stage(finetune_decoder=True),
    "tiny_titok_vq": lambda: presets.tiny_titok_config("vq", tokens=16, crop=64),
    "tiny_titok_vae": lambda: presets.tiny_titok_config("vae", tokens=16, crop=64),
}
# model.vq_model entries a stage-2 run must share with its stage-1 checkpoint (official defaults)
GEOMETRY = {"vit_enc_model_size": None, "vit_dec_model_size": None, "vit_enc_patch_size": None,
            "vit_dec_patch_size": None, "num_latent_tokens": None, "token_size": None, "codebook_size": None,
            "use_l2_norm": None, "quantize_mode": "vq", "is_legacy": True}


def _tiny_two_stage(finetune_decoder: bool) -> dict:
    config = presets.tiny_titok_config("vq", tokens=16, crop=64, two_stage=True)
    config["model"]["vq_model"]["finetune_decoder"] = finetune_decoder
    return config


@dataclass
class TiTokLossConfig(TokenizerLossConfig):
    """TokenizerLossConfig (stage 2, single-stage) plus the frozen MaskGIT-VQGAN (stage-1
    targets; stage-2 pixel decoder init). Stage 1 reads quantizer_weight only."""

    vqgan_weights: str = _f("pretrained", "MaskGIT-VQGAN: pretrained (maskgit-vqgan-imagenet-f16-256.bin from "
                            "$TATITOK_MASKGIT_VQGAN, the HF cache of fun-research/TiTok, the torch hub cache, or a "
                            "download unless HF_HUB_OFFLINE), a local .bin / folder, or random (seeded stand-in)")
    vqgan_seed: int = _f(0, "vqgan_weights = random: the seed of the stand-in's init")
    vqgan_hidden_channels: int = _f(128, "vqgan_weights = random: width of the stand-in (official 128); stage 2 "
                                    "keeps TiTok's own seeded full-size pixel decoder then")


def stage_of(config: dict) -> str:
    vq = config["model"]["vq_model"]
    if vq.get("finetune_decoder", True):
        return "stage2"
    return "stage1" if vq.get("is_legacy", True) else "single"


def frozen_vqgan(loss_cfg: TiTokLossConfig, image_size: int, device: torch.device):
    """The frozen MaskGIT-VQGAN (tatitok_fast.MaskGITVQGAN) of loss.vqgan_weights, in eval on `device`."""
    from tatitok_fast.models.tokenizers.vqgan import Decoder, Encoder, MaskGITVQGAN, PixelQuantizer

    if loss_cfg.vqgan_weights == "random":
        conf = dict(presets.MASKGIT_VQGAN_CONFIG, hidden_channels=loss_cfg.vqgan_hidden_channels)
        with torch.device("meta"):  # the wrapper only; its parts are rebuilt below
            vq = MaskGITVQGAN(image_size=image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(loss_cfg.vqgan_seed)
            vq.encoder, vq.decoder = Encoder(conf), Decoder(conf)
            vq.quantize = PixelQuantizer(*presets.MASKGIT_VQGAN_CODEBOOK)
        vq.config["maskgit_vqgan"] = conf
    else:
        vq = MaskGITVQGAN(vqgan_file(loss_cfg), image_size=image_size)
    return vq.to(device).eval().requires_grad_(False)


def vqgan_file(loss_cfg: TiTokLossConfig) -> str:
    """The local MaskGIT-VQGAN .bin; ConfigError naming the file and the Hub repo when missing."""
    import os

    from tatitok_fast.models.tokenizers.vqgan import vqgan_weights_path
    from tatitok_fast.weight_files import WeightsFileError

    w = loss_cfg.vqgan_weights
    try:
        return vqgan_weights_path(None if w == "pretrained" else w,
                                  local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""))
    except (WeightsFileError, OSError) as exc:
        raise ConfigError(f"loss.vqgan_weights {w!r}: {exc} In training: --loss.vqgan_weights PATH.") from None


class TiTokRecipe(Recipe):
    name = "titok"
    loss_config = TiTokLossConfig

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.aux_start_step = cfg.loss.discriminator_start
        self._preview: torch.Tensor | None = None
        self.vqgan = None

    # ---- model ----
    def build_model(self) -> nn.Module:
        from tatitok_fast import TiTok

        config = common.model_config(self.cfg.model, "tokenizer", table=presets.TITOK_TOKENIZERS, tiny=TINY)
        self.stage = stage_of(config)
        if self.stage == "stage2" and not self.cfg.model.init_from and self.device.type != "meta":
            raise ConfigError("model.init_from: stage 2 (model.vq_model.finetune_decoder = true) fine-tunes the "
                              "decoder of a trained stage-1 TiTok: pass its export, e.g. --model.init_from "
                              "outputs/titok_l32_stage1/export/step-N (or an official two-stage TiTok: titok_l32, "
                              "a Hub id or a folder)")
        if self.stage == "stage1" and self.device.type != "meta" and self.cfg.loss.vqgan_weights != "random":
            vqgan_file(self.cfg.loss)  # the targets' network missing: say so before building a large model
        init_from = self.cfg.model.init_from
        if self.stage == "stage2" and init_from:  # the stage-1 -> stage-2 load is done here, not by common.build
            self.cfg.model.init_from = ""
            try:
                model = common.build(TiTok, config, self.cfg)
            finally:
                self.cfg.model.init_from = init_from
            self._init_stage2(model, init_from)
        else:
            model = common.build(TiTok, config, self.cfg)
        self.mode, self.crop = model.quantize_mode, self.cfg.data.crop_size or model.image_size
        self.codebook_size = model.codebook_size  # kept: forward_loss gets the DDP wrapper, not the model
        if self.crop != model.image_size:
            raise ConfigError(f"data.crop_size: {self.crop} differs from the model's crop_size {model.image_size}")
        return model.train()

    def _init_stage2(self, model: nn.Module, init_from: str) -> None:
        """A stage-1 checkpoint of the same config (+ the VQGAN's pixel weights), or a complete
        two-stage TiTok (fine-tuning: strict)."""
        from tatitok_fast.checkpoint import CheckpointError, cfg_get, load_state_dict_file, resolve

        try:
            src_cfg, sd = resolve(init_from, kind="TiTok")
        except (CheckpointError, KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"model.init_from {init_from}: {exc}") from None
        if sd is None:
            raise ConfigError(f"model.init_from {init_from}: no weights found")
        src, own = cfg_get(src_cfg, "model.vq_model", None), model.config["model"]["vq_model"]
        if not isinstance(src, dict):
            raise ConfigError(f"model.init_from {init_from}: not a TiTok checkpoint (its config has no model.vq_model)")
        diff = [f"model.vq_model.{k} = {src.get(k, d)!r} there, {own.get(k, d)!r} here" for k, d in GEOMETRY.items()
                if src.get(k, d) != own.get(k, d)]
        crop = cfg_get(src_cfg, "dataset.preprocessing.crop_size", None)
        if crop != model.image_size:
            diff.append(f"dataset.preprocessing.crop_size = {crop!r} there, {model.image_size!r} here")
        if diff:
            raise ConfigError(f"model.init_from {init_from}: a checkpoint of another TiTok config than this stage-2 "
                              f"run ({model.config['model']['vq_model'].get('vit_enc_model_size')}...): "
                              + "; ".join(diff))
        if src.get("finetune_decoder", True):  # a two-stage TiTok: fine-tune all of it
            common.load_initial_weights(model, init_from, strict=True)
            return
        pixel = ("pixel_decoder.", "pixel_quantize.")
        if self.cfg.loss.vqgan_weights != "random":  # the VQGAN's decoder / codebook, renamed (official stage 2)
            vq_sd = load_state_dict_file(vqgan_file(self.cfg.loss))
            sd = {**sd, **{"pixel_" + k: v for k, v in vq_sd.items() if k.startswith(("decoder.", "quantize."))}}
        stray = [k for k in sd if k.startswith(pixel)] if self.cfg.loss.vqgan_weights == "random" else []
        missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in stray}, strict=False)
        missing = [k for k in missing if not (self.cfg.loss.vqgan_weights == "random" and k.startswith(pixel))]
        if missing or unexpected:
            raise ConfigError(f"model.init_from {init_from}: the stage-1 weights do not fit this model: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
        model.post_load()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.encoder.transformer) + list(model.decoder.transformer)

    def build_loss(self) -> nn.Module | None:
        if self.stage == "stage1":  # no discriminator: the proxy-code CE has no trainable loss side
            return None
        try:
            self.loss_module = TokenizerLoss.from_config(self.cfg.loss, self.mode)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss: {exc}") from None
        return self.loss_module

    def build_frozen(self) -> None:
        if self.stage == "stage1":  # fails here (offline, no file) before any step
            self.vqgan = frozen_vqgan(self.cfg.loss, self.crop, self.device)

    # ---- data ----
    def decode_sample(self, sample: dict, rng: np.random.Generator) -> dict:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')}: no image ({'/'.join(IMAGE_KEYS)})")
        image = random_resized_crop(decode_image(sample[key]), self.crop, rng, self.cfg.data.random_flip)
        return {"image": image, "__key__": sample["__key__"]}

    def batch_transform(self, batch: dict) -> dict:
        if self.stage == "stage1":
            batch["codes"] = self.vqgan.encode(batch["image"])  # (B, G*G) int64, the proxy targets
        if self._preview is None:  # a fixed batch for the reconstruction grids
            self._preview = batch["image"][: self.cfg.samples.num].detach().clone()
        return batch

    # ---- step ----
    def forward_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        x = batch["image"]
        out, extra = model(x)
        if self.stage == "stage1":
            loss, logs = proxy_code_loss(out, batch["codes"], extra, self.cfg.loss.quantizer_weight)
            logs["code_accuracy"] = (out.detach().flatten(2).argmax(1) == batch["codes"].reshape(x.shape[0], -1)
                                     ).float().mean()
            recon = None
        else:
            recon = out.float()
            loss, logs = self.loss_module.generator_loss(x, recon, extra, step)
        logs = {k: v for k, v in logs.items() if k != "total_loss"}
        if self.mode == "vq" and self.stage != "stage2" and isinstance(extra, dict):
            ids = extra["min_encoding_indices"].reshape(-1)
            logs["codebook_usage"] = torch.unique(ids).numel() / self.codebook_size
        return StepOutput(loss, logs, {} if recon is None else {"recon": recon.detach()})

    def aux_loss(self, loss_module: nn.Module, batch: dict, extras: dict, step: int) -> StepOutput | None:
        if self.stage == "stage1" or not loss_module.discriminator_active(step):
            return None
        loss, logs = loss_module.discriminator_loss(batch["image"], extras["recon"], step)
        return StepOutput(loss, {f"disc/{k}": v for k, v in logs.items()})

    def flops_per_sample(self, model: nn.Module) -> float:
        """6 x linear params x tokens per ViT + attention, for MFU (convs left out)."""
        g2, n = model.encoder.grid_size ** 2, model.num_latent_tokens
        total = 0.0
        for vit, seq, trained in ((model.encoder, 1 + g2 + n, self.stage != "stage2"), (model.decoder, 1 + g2 + n, True)):
            params = sum(m.weight.numel() for m in vit.transformer.modules() if isinstance(m, nn.Linear))
            total += (6.0 if trained else 2.0) * params * seq + 12.0 * vit.num_layers * vit.width * seq ** 2
        return total

    # ---- outputs ----
    @torch.no_grad()
    def log_samples(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if self._preview is None:
            return {}
        out, _ = model(self._preview.to(self.device))
        if self.stage == "stage1":  # the predicted codes through the frozen VQGAN's decoder
            out = self.vqgan.decode(out.float().argmax(1))
        return {"originals": self._preview, "reconstructions": out.float().clamp(0, 1)}
