"""What both recipes need: the official config a run trains (preset / tiny / file, plus dotted
overrides), starting weights (init_from) and the frozen CLIP text tower."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from tatitok_fast import presets
from tatitok_fast.training.config import ConfigError

TINY = {"tiny_vq": "vq", "tiny_vae": "vae"}


def model_config(model_cfg, kind: str, table: dict | None = None, tiny: dict | None = None) -> dict:
    """model.config (a zoo preset, tiny_vq / tiny_vae, or a config.json path) + model.overrides
    -> an official-schema config dict. kind: "tokenizer" or "generator"; another family passes
    its own presets (`table`) and tiny configs (`tiny`: name -> callable returning a config) and
    gets no text_encoder entry."""
    from tatitok_fast.checkpoint import CheckpointError, read_config

    name = model_cfg.config
    own = table is not None
    if table is None:
        table = presets.TOKENIZERS if kind == "tokenizer" else presets.GENERATORS
    if tiny is None:
        make = presets.tiny_tokenizer_config if kind == "tokenizer" else presets.tiny_generator_config
        tiny = {n: (lambda m=m: make(m)) for n, m in TINY.items()}
    if name in table:
        config = presets.preset_config(name)
    elif name in tiny:
        config = tiny[name]()
    elif name.endswith(".json") or Path(name).is_dir():
        path = Path(name) / "config.json" if Path(name).is_dir() else Path(name)
        try:
            config = read_config(path)
        except CheckpointError as exc:
            raise ConfigError(f"model.config: {exc}") from None
    else:
        raise ConfigError(f"model.config: {name!r} is not a {kind} preset ({sorted(table)}), "
                          f"{sorted(tiny)}, or a config.json path / directory")
    config = apply_overrides(config, model_cfg.overrides)
    if not own:
        config.setdefault("model", {})["text_encoder"] = dict(model_cfg.text_encoder)
    return config


def apply_overrides(config: dict, overrides: dict) -> dict:
    """A copy of `config` with model.overrides applied ({"model.vq_model.token_size": 8, ...})."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"model.overrides.{dotted}: {p} is not a table in the model config")
        node[leaf] = value
    return config


def load_initial_weights(model: nn.Module, init_from: str, strict: bool) -> None:
    """Copy weights from a preset, Hub id or directory (an export of ours or an official
    checkpoint) into `model`; strict=False keeps keys the source lacks (official stage 2)."""
    from tatitok_fast.checkpoint import CheckpointError, check_and_fill, resolve

    try:
        _, sd = resolve(init_from, kind=type(model).__name__)
    except (CheckpointError, KeyError, ValueError) as exc:
        raise ConfigError(f"model.init_from {init_from}: {exc}") from None
    if sd is None:
        raise ConfigError(f"model.init_from {init_from}: no weights found")
    tied = getattr(model, "tied_weights", {})
    if strict:
        try:
            sd = check_and_fill(model, sd, f"model.init_from {init_from}", tied)
        except (CheckpointError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        model.load_state_dict(sd, strict=True)
    else:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(sd, strict=False)
    if hasattr(model, "post_load"):
        model.post_load()


def text_encoder(spec: dict, device: torch.device, cache: int = 0):
    """The frozen CLIP text tower a run's model.text_encoder names, keeping the outputs of up
    to `cache` captions (model.text_cache); offline errors name the file that is missing."""
    from tatitok_fast.text import CLIPTextEncoder

    try:
        enc = CLIPTextEncoder.from_spec(spec, device=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"model.text_encoder {spec}: {exc}") from None
    return enc.eval().requires_grad_(False).cache_captions(cache)


def build(cls: type, config: dict, cfg) -> nn.Module:
    """`cls(config)` initialised under training.seed (the global RNG left as it was), then
    model.init_from's weights when given; a config the class rejects is a ConfigError."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.training.seed)
            model = cls(config)
    except (KeyError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"model.config {cfg.model.config}: {exc}") from None
    if cfg.model.init_from:
        load_initial_weights(model, cfg.model.init_from, cfg.model.init_strict)
    return model
