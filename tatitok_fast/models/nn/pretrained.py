"""from_pretrained / save_pretrained shared by TATiTok, MaskGen_VQ and MaskGen_KL."""
from __future__ import annotations

import os
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from tatitok_fast import checkpoint


class PretrainedModel(nn.Module):
    """Models built from the official config dict, loadable from official checkpoints.

    Subclasses set `config_kind` ("tokenizer" or "generator" and the quantize mode checks in
    `validate_config`), `tied_weights` (state-dict aliases), and may override `post_load()`
    to rebuild non-persistent state after weights are loaded.
    """

    tied_weights: ClassVar[Mapping[str, str]] = {}
    preset_role: ClassVar[str] = "tokenizer"  # "generator": a TiTok preset name means its generator's Hub repo
    config: dict

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        config = checkpoint.as_config_dict(config)
        self.validate_config(config)
        self.config = config

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        """Raise ValueError when `config` describes another kind of model."""

    @classmethod
    def class_for_config(cls, config: Mapping[str, Any]) -> type["PretrainedModel"]:
        """The class from_pretrained builds for `config` (a base class may pick a subclass)."""
        return cls

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                        config: Mapping | None = None, revision: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, device: torch.device | str | None = None,
                        torch_dtype: torch.dtype | None = None):
        """Load official weights unchanged.

        name_or_path: a directory with config.json + model.safetensors (or pytorch_model.bin),
        a Hub repo id (e.g. "turkeyju/tokenizer_tatitok_bl32_vae"), a preset name
        ("tatitok_bl32_vae": its Hub repo, or `weights=` a raw official .bin), or a weights
        file named after a preset. Pickles load with weights_only=True.
        """
        cfg, sd = checkpoint.resolve(name_or_path, weights=weights, config=config, revision=revision,
                                     cache_dir=cache_dir, local_files_only=local_files_only, kind=cls.__name__,
                                     role=cls.preset_role)
        cls = cls.class_for_config(cfg)
        cls.validate_config(cfg)
        with torch.device("meta"):
            model = cls(cfg)
        sd = checkpoint.check_and_fill(model, sd, f"weights of {name_or_path}", cls.tied_weights)
        model = model.to_empty(device="cpu")
        model.load_state_dict(sd, strict=True)
        model.post_load()
        model.eval()
        if device is not None or torch_dtype is not None:
            model = model.to(device=device, dtype=torch_dtype)
        return model

    def post_load(self) -> None:
        """Re-tie shared weights and rebuild non-persistent buffers after `to_empty`."""

    def save_pretrained(self, save_directory: str | os.PathLike, *, safe_serialization: bool = True):
        """Write config.json + model.safetensors (or pytorch_model.bin): the official layout,
        readable by the reference code's from_pretrained."""
        return checkpoint.save(self, self.config, save_directory, safe_serialization=safe_serialization)


def default_text_encoder(model: nn.Module, device: torch.device | str):
    """The reference's text tower (open_clip ViT-L-14-336, OpenAI weights) for a model called
    without one: made on first use, then kept on the model (outside its state dict)."""
    enc = model.__dict__.get("_default_text_encoder")
    if enc is None:
        from tatitok_fast.text import CLIPTextEncoder

        enc = model.__dict__["_default_text_encoder"] = CLIPTextEncoder(device=device)
    return enc.to(device)
