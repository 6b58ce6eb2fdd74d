"""Builds the official loss-side modules (../shared/peer/1d-tokenizer) offline, for parity tests:
torchvision builders patched to weights=None and LPIPS.load_pretrained to a no-op while they
are constructed (see shared/peer/README.md), so every network has random weights that the
tests then copy into ours."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from tests.helpers import OFFICIAL, require_official

TA_TITOK_CONFIG = OFFICIAL / "configs" / "training" / "TA-TiTok" / "tatitok_bl32_vq.yaml"


def import_official(module: str, deps=("omegaconf", "einops", "accelerate", "torchvision")):
    """Import `module` from the official code; when it (or one of `deps`, the packages it
    imports) is not there, the test skips, or fails under CI=true (helpers.require_official)."""
    require_official(deps)
    if str(OFFICIAL) not in sys.path:
        sys.path.insert(0, str(OFFICIAL))
    import importlib

    return importlib.import_module(module)


@contextmanager
def offline_official_builders():
    """torchvision's vgg16 / convnext_small build with weights=None and LPIPS skips its
    download, while official modules are constructed (the benchmarks' patch, used here too)."""
    from tatitok_fast.benchmarks.official import offline_perceptual

    import_official("modeling.modules.lpips")
    with offline_perceptual():
        yield


def official_loss_config(quantize_mode: str = "vq", **losses):
    """The TA-TiTok training config (configs/training/TA-TiTok/*.yaml) with `losses` overrides."""
    from omegaconf import OmegaConf

    import_official("modeling")
    cfg = OmegaConf.load(TA_TITOK_CONFIG)
    cfg.model.vq_model.quantize_mode = quantize_mode
    for k, v in losses.items():
        cfg.losses[k] = v
    return cfg


def build_official_loss(quantize_mode: str = "vq", **losses):
    """ReconstructionLoss_Single_Stage with random perceptual and discriminator weights."""
    losses_mod = import_official("modeling.modules.losses")
    with offline_official_builders():
        return losses_mod.ReconstructionLoss_Single_Stage(official_loss_config(quantize_mode, **losses))


def copy_official_perceptual(official_perceptual, ours) -> None:
    """Copy the official PerceptualLoss's networks into ours (tatitok_fast PerceptualLoss)."""
    if ours.lpips is not None:
        sd = official_perceptual.lpips.state_dict()
        # official VGG slices keep torchvision's indices: net.slice{k}.{i}.* -> features.{i}.*
        vgg = {"features." + k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("net.slice")}
        ours.lpips.load_vgg16(vgg)
        ours.lpips.load_heads(sd)
    if ours.convnext is not None:
        ours.convnext.load_state_dict(official_perceptual.convnext.state_dict(), strict=True)
