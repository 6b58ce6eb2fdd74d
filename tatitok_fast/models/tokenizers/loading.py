"""Pick and load the right tokenizer class for a name: TA-TiTok, TiTok or the MaskGIT-VQGAN.

TA-TiTok and single-stage TiTok configs share one schema, so a checkpoint folder / Hub repo of
neither zoo is told apart by its weights: TA-TiTok's decoder has text_guidance_proj.*.
"""
from __future__ import annotations

import os
from pathlib import Path

from tatitok_fast import checkpoint, presets

TEXT_KEY_PREFIX = "decoder.text_guidance_proj."


def _weight_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(checkpoint.load_state_dict_file(path))


def _is_vqgan(src: str) -> bool:
    path = Path(src).expanduser()
    if src in (presets.MASKGIT_VQGAN, presets.TITOK_RAW_WEIGHTS_REPO) or path.name == presets.MASKGIT_VQGAN_FILE:
        return True
    return (path.is_dir() and (path / presets.MASKGIT_VQGAN_FILE).is_file()
            and not (path / checkpoint.CONFIG_NAME).is_file())


def tokenizer_class(name_or_path: str | os.PathLike, *, cache_dir: str | None = None, local_files_only: bool = False):
    """TATiTok, TiTok or MaskGITVQGAN for a preset name, Hub repo id, checkpoint folder or weights file."""
    from tatitok_fast.models.tokenizers.tatitok import TATiTok
    from tatitok_fast.models.tokenizers.titok import TiTok
    from tatitok_fast.models.tokenizers.vqgan import MaskGITVQGAN

    src = str(name_or_path)
    if _is_vqgan(src):
        return MaskGITVQGAN
    preset = presets.PRESET_OF_REPO.get(src, src)
    if preset in presets.TITOK_TOKENIZERS or Path(src).name in presets.TITOK_RAW_FILES:
        return TiTok
    if preset in presets.TOKENIZERS:
        return TATiTok
    path = Path(src).expanduser()
    if path.is_dir():
        weights = checkpoint._weights_in_dir(path)
    elif path.is_file():
        weights = path
    elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
        weights = checkpoint._weights_in_dir(checkpoint._hub_download(src, None, cache_dir, local_files_only))
    else:
        return TATiTok  # its from_pretrained names what is wrong with `src`
    return TATiTok if any(k.startswith(TEXT_KEY_PREFIX) for k in _weight_keys(weights)) else TiTok


def load_tokenizer(name_or_path: str | os.PathLike, *, cache_dir: str | None = None, local_files_only: bool = False):
    """The tokenizer `name_or_path` names, loaded unchanged (eval). Errors: CheckpointError,
    WeightsFileError (the MaskGIT-VQGAN file), ValueError / KeyError (a bad config)."""
    from tatitok_fast.models.tokenizers.vqgan import MaskGITVQGAN

    cls = tokenizer_class(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
    if cls is MaskGITVQGAN:
        return MaskGITVQGAN.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
    return cls.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
