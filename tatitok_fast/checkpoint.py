"""Official checkpoints in and out: config.json + model.safetensors / pytorch_model.bin
directories (the Hub layout), Hub repo ids, preset names and raw official state dicts.

Everything is checked before any weight is copied: a missing file, a corrupt file, a missing
or unexpected key and a shape mismatch each raise an error naming what was expected.
Tied tensors stored once (safetensors keeps a shared tensor under its alphabetically first
name) are re-tied. Writes go to a temporary file renamed into place, so an interrupted save
never leaves a half-written checkpoint over a good one.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from tatitok_fast import presets

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, or does not fit the model."""


# ---------------------------------------------------------------------------------------
# Config access (the official schema is nested: model.vq_model.*, model.maskgen.*, ...)

def cfg_get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def cfg_require(config: Mapping[str, Any], dotted: str, what: str = "config") -> Any:
    value = cfg_get(config, dotted, _MISSING)
    if value is _MISSING:
        raise KeyError(f"{what}: missing required entry {dotted!r}")
    return value


_MISSING = object()


def as_config_dict(config: Any) -> dict:
    """Accept a dict, an OmegaConf config, or a path to a config.json."""
    if isinstance(config, (str, os.PathLike)):
        return read_config(Path(config))
    if hasattr(config, "_content") and hasattr(config, "keys"):  # OmegaConf DictConfig
        from omegaconf import OmegaConf  # only when the caller already uses it

        return OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a dict (official config.json schema) or a path, got {type(config).__name__}")
    try:
        return resolve_interpolations(copy.deepcopy(dict(config)))
    except KeyError as exc:
        raise ValueError(f"config: {exc.args[0]}") from None


def read_config(path: Path) -> dict:
    """config.json with OmegaConf-style `${a.b}` interpolations resolved (the official TiTok /
    MaskGIT save writes them unresolved, e.g. image_seq_len: "${model.vq_model.num_latent_tokens}")."""
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"config file {path} is not valid JSON: {exc}") from exc
    try:
        return resolve_interpolations(config)
    except KeyError as exc:
        raise CheckpointError(f"config file {path}: {exc.args[0]}") from None


_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")


def resolve_interpolations(config: Any) -> Any:
    """A copy of `config` with every `${dotted.path}` string replaced by the value at that
    absolute path (a whole-string reference keeps the value's type; one inside a longer string is
    formatted into it), recursively, as OmegaConf.to_container(resolve=True) does for plain
    references. Custom resolvers (`${oc.env:X}`) and relative paths are not supported: KeyError
    names the entry and the reference."""
    def value_at(ref: str, where: str, stack: tuple[str, ...]) -> Any:
        if ref in stack:
            raise KeyError(f"config entry {where!r}: interpolation cycle through ${{{ref}}}")
        node: Any = config
        for part in ref.strip().split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise KeyError(f"config entry {where!r}: interpolation ${{{ref}}} names no config entry")
        return walk(node, ref, stack + (ref,))

    def walk(node: Any, where: str, stack: tuple[str, ...]) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, f"{where}.{k}" if where else str(k), stack) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}.{i}", stack) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            whole = _INTERPOLATION.fullmatch(node)
            if whole:
                return value_at(whole.group(1), where, stack)
            return _INTERPOLATION.sub(lambda m: str(value_at(m.group(1), where, stack)), node)
        return node

    return walk(config, "", ())


# ---------------------------------------------------------------------------------------
# Reading weights

def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a pickle (.bin/.pt/.pth, loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a checkpoint
        raise CheckpointError(f"could not read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return dict(sd)


def _weights_in_dir(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"no weights in {directory}: expected {SAFETENSORS_NAME} or {PICKLE_NAME}")


def _hub_download(repo_id: str, revision: str | None, cache_dir: str | None, local_files_only: bool) -> Path:
    """config.json and the weights of a Hub repo, from the cache or the network."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    tried = []
    config_path = None
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only))
        for name in (SAFETENSORS_NAME, PICKLE_NAME):
            try:
                hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
                return config_path.parent
            except EntryNotFoundError as exc:
                tried.append(f"{name} ({type(exc).__name__})")
    except Exception as exc:
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub"
            + (" (offline mode, and it is not in the cache)" if offline else "")
            + f": {type(exc).__name__}: {exc}. Tried {CONFIG_NAME} + {SAFETENSORS_NAME}/{PICKLE_NAME}"
            + (f" in cache {cache_dir}" if cache_dir else " in the default Hugging Face cache")
            + ". Pass a local directory, or a preset name with weights=<local file>."
        ) from exc
    raise CheckpointError(f"{repo_id!r} on the Hub has {CONFIG_NAME} but no weights; tried {tried}")


def resolve(name_or_path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
            config: Mapping | None = None, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, kind: str = "model",
            role: str = "tokenizer") -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(config dict, state dict) for a local directory, a local weights file, a preset name or a
    Hub repo id. `weights` overrides where the weights come from (e.g. a raw official .bin).
    role ("tokenizer" / "generator") picks the Hub repo of a TiTok preset name, which names both."""
    src = str(name_or_path)
    path = Path(src).expanduser()
    cfg = as_config_dict(config) if config is not None else None
    weights_path = Path(weights).expanduser() if weights is not None else None

    if path.is_dir():
        cfg = cfg if cfg is not None else read_config(path / CONFIG_NAME)
        weights_path = weights_path or _weights_in_dir(path)
    elif path.is_file():  # a bare weights file: the config comes from `config` or a preset named like it
        if cfg is None:
            stem = path.stem
            if path.name in presets.TITOK_RAW_FILES:  # an official raw TiTok .bin (fun-research/TiTok)
                stem = presets.TITOK_RAW_FILES[path.name][0]
            known = {**presets.TOKENIZERS, **presets.GENERATORS, **presets.TITOK_TOKENIZERS}
            if stem not in known:
                raise CheckpointError(
                    f"{src} is a weights file without a config: pass config=... or name it after a preset "
                    f"({sorted(known)}) or an official raw file ({sorted(presets.TITOK_RAW_FILES)})")
            cfg = presets.preset_config(stem)
        weights_path = weights_path or path
    elif src in presets.TOKENIZERS or src in presets.GENERATORS or src in presets.TITOK_TOKENIZERS:
        cfg = cfg if cfg is not None else presets.preset_config(src)
        if weights_path is None:
            try:
                repo = presets.hub_repo(src, role)
            except KeyError as exc:
                raise CheckpointError(f"{kind}: {exc.args[0]}") from None
            repo_dir = _hub_download(repo, revision, cache_dir, local_files_only)
            weights_path = _weights_in_dir(repo_dir)
    elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
        repo_dir = _hub_download(src, revision, cache_dir, local_files_only)
        cfg = cfg if cfg is not None else read_config(repo_dir / CONFIG_NAME)
        weights_path = weights_path or _weights_in_dir(repo_dir)
    else:
        raise CheckpointError(
            f"{kind}: {src!r} is not a directory, a weights file, a preset name "
            f"({sorted({**presets.HUB_REPOS, **presets.TITOK_HUB_REPOS})}) "
            "or a Hub repo id (owner/name)")
    return cfg, load_state_dict_file(weights_path)


def check_and_fill(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                   tied: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Strict key and shape check of `state_dict` against `model` (which may live on the meta
    device). `tied` maps a state-dict name to the name it shares storage with; a tied tensor
    the file stores once is re-filled from its twin. Returns the dict to load."""
    expected = model.state_dict()
    sd = dict(state_dict)
    for alias, source_name in (tied or {}).items():
        if alias not in sd and source_name in sd:
            sd[alias] = sd[source_name]
        elif source_name not in sd and alias in sd:
            sd[source_name] = sd[alias]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def _few(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + (f"{len(missing)} missing keys [{_few(missing)}]" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected keys [{_few(unexpected)}]" if unexpected else "")
            + ". Is the config the one these weights were trained with?")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        k, got, want = bad[0]
        raise CheckpointError(f"{source}: {len(bad)} tensors have the wrong shape, e.g. {k}: file {got}, model {want}. "
                              "Is the config the one these weights were trained with?")
    return sd


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for tensors that are the same tied parameter."""
    return (t.device.type, t.data_ptr(), tuple(t.shape), t.stride())


# ---------------------------------------------------------------------------------------
# Writing

def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: torch.nn.Module, config: Mapping, directory: str | os.PathLike, *, safe_serialization: bool = True) -> Path:
    """Write config.json and model.safetensors (or pytorch_model.bin), the official layout:
    float tensors as stored, shared tensors once under their alphabetically first name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name in sorted(sd):
        t = sd[name]
        key = _storage_key(t)
        if safe_serialization and t.numel() and key in seen:
            continue  # tied: kept under the first name only
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=4)))
    if safe_serialization:
        from safetensors.torch import save_file

        _atomic_write(directory / SAFETENSORS_NAME, lambda p: save_file(out, p, metadata={"format": "pt"}))
    else:
        _atomic_write(directory / PICKLE_NAME, lambda p: torch.save(out, p))
    return directory
