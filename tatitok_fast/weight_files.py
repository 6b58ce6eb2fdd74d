"""Local files of pretrained auxiliary networks (loss and metric networks: VGG16, LPIPS heads,
ConvNeXt-S, InceptionV3), found without surprises offline.

Lookup order for each file: an explicit path (a command-line / config option), then an
environment variable, then the cache (torch hub's `checkpoints/` folder, plus any extra
places the caller names), then, when allowed, a download into that cache. When none works,
`WeightsFileError` says which file is missing, where it was looked for and how to provide it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path


class WeightsFileError(FileNotFoundError):
    """A pretrained weights file is missing, unreadable or corrupt."""


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file is: its file name in the cache, where it comes from, the
    environment variable that may hold a local path, the option that may too, and its md5."""

    what: str  # e.g. "LPIPS linear heads"
    filename: str
    url: str
    env: str
    option: str  # the option naming a local path, for the error message
    md5: str | None = None
    extra_locations: tuple[str, ...] = field(default=())  # other places: may use $VARS and {hub} (torch hub dir)

    def cache_path(self) -> Path:
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(spec: WeightsFile, path: Path, source: str) -> Path:
    if not path.is_file():
        raise WeightsFileError(f"{spec.what}: {source} points to {path}, which is not a file")
    if spec.md5 is not None and _md5(path) != spec.md5:
        raise WeightsFileError(f"{spec.what}: {path} (from {source}) has md5 {_md5(path)}, expected {spec.md5}; "
                               f"re-download {spec.filename} from {spec.url}")
    return path


def resolve_weights_file(spec: WeightsFile, path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The local path of `spec`'s file (see the module doc for the order); raises
    WeightsFileError naming the file, the URL, the environment variable and the option."""
    if path:
        return _check(spec, Path(path).expanduser(), spec.option)
    if os.environ.get(spec.env):
        return _check(spec, Path(os.environ[spec.env]).expanduser(), f"${spec.env}")
    import torch

    cache = spec.cache_path()
    extra = [os.path.expandvars(p.format(hub=torch.hub.get_dir())) for p in spec.extra_locations]
    candidates = [cache] + [Path(p).expanduser() for p in extra if "$" not in p]  # unset variables: skipped
    for c in candidates:
        if c.is_file():
            return _check(spec, c, "the cache")
    failure = "downloads are off"
    if download:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(cache), progress=False)
            return _check(spec, cache, "the download")
        except WeightsFileError:
            cache.unlink(missing_ok=True)
            raise
        except Exception as exc:  # no network, proxy, HTTP error, disk full...
            cache.unlink(missing_ok=True)
            failure = f"downloading it failed ({type(exc).__name__}: {exc})"
    looked = ", ".join(str(c) for c in candidates)
    raise WeightsFileError(
        f"{spec.what}: weights file {spec.filename} not found (looked in {looked}; {failure}). "
        f"Download {spec.url} on a machine with internet access, then either set {spec.env}=/path/to/"
        f"{spec.filename}, pass it with {spec.option}, or copy it to {cache}.")


def load_state_dict_file(path: Path) -> dict:
    """A state dict from a .pth/.pt/.bin (torch.load, weights only) or .safetensors file."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsFileError(f"could not read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(sd, dict):
        raise WeightsFileError(f"weights file {path}: expected a state dict, got {type(sd).__name__}")
    return sd
