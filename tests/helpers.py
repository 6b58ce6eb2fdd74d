"""Helpers shared by the tests."""
import importlib
import json
import math
import os
import zlib
from pathlib import Path

import pytest
import torch

from tatitok_fast.ops import has_kernel
from tatitok_fast.presets import tiny_generator_config, tiny_tokenizer_config  # noqa: F401

HAS_CUDA = torch.cuda.is_available()


def devices_for(op: str):
    """CPU always; CUDA when a GPU and the op's CUDA kernel are both present."""
    out = ["cpu"]
    if HAS_CUDA and has_kernel(op, "cuda"):
        out.append("cuda")
    return out


# ---------------------------------------------------------------------------------------
# The official code (bytedance/1d-tokenizer), the reference of the parity tests

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (development machines, CI), or shared/ inside it (device machines)
_CHECKOUTS = (REPO.parent / "shared" / "peer" / "1d-tokenizer", REPO / "shared" / "peer" / "1d-tokenizer")
OFFICIAL = next((p for p in _CHECKOUTS if p.is_dir()), _CHECKOUTS[0])


def in_ci() -> bool:
    """True when the environment says CI (CI=true, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def official_unavailable(reason: str):
    """A test that compares with the official code cannot run: skip it with `reason`, or,
    under CI=true, fail with it, so that parity tests cannot go silently green in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the tests against the official code must run here)", pytrace=False)
    pytest.skip(reason)


def require_official(deps=(), path: Path | None = None) -> Path:
    """The official checkout at `path` (default OFFICIAL), with the packages `deps` that the
    imported official modules need; official_unavailable() naming what is missing otherwise."""
    path = OFFICIAL if path is None else path
    if not (path / "modeling" / "tatitok.py").is_file():
        official_unavailable(f"official code not found at {path.resolve()} "
                             "(expected a checkout of bytedance/1d-tokenizer there)")
    for dep in deps:
        try:
            importlib.import_module(dep)
        except ImportError as e:
            official_unavailable(f"the official code at {path.resolve()} needs {dep}, which does not import: {e}")
    return path


def poison_allocator(device: str, nbytes: int = 1 << 22) -> None:
    """Fill a block with 0xFF bytes (NaN as float, -1 as int) and free it, so that outputs
    allocated next on `device` start as garbage rather than zeros: an element a kernel
    forgets to write then shows up (reliably with CUDA's caching allocator)."""
    t = torch.full((nbytes,), 255, dtype=torch.uint8, device=device)
    del t


# ---------------------------------------------------------------------------------------
# Parity cases (tests/fixtures/parity/<case>/: config.json + case.pt made by running the
# reference implementation on synthetic weights; see tests/fixtures/README.md)

FIXTURES = Path(__file__).parent / "fixtures"


def synthetic_weight(name: str, shape, seed: int, kind: str | None) -> torch.Tensor:
    """The deterministic weight recipe of the parity cases: a float64 normal draw seeded by
    (seed, crc32(name)), shaped by the tensor's kind, stored as float32."""
    if kind is None:  # buffers such as embed_prob start at zero
        return torch.zeros(shape)
    g = torch.Generator().manual_seed((seed * 1000003) ^ zlib.crc32(name.encode()))
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    if kind == "norm_weight":
        t = 1.0 + 0.1 * t
    elif kind == "bias":
        t = 0.05 * t
    elif kind == "matrix":
        t = t / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else shape[0])
    elif kind != "codebook":
        t = 0.2 * t
    return t.float()


def load_parity_case(name: str):
    """(config dict, case dict) of a parity case."""
    case_dir = FIXTURES / "parity" / name
    config = json.loads((case_dir / "config.json").read_text())
    case = torch.load(case_dir / "case.pt", weights_only=False)
    return config, case


def write_parity_checkpoint(name: str, out_dir: Path, *, tied_once: bool = True) -> tuple[dict, dict]:
    """Write an official-layout checkpoint directory (config.json + model.safetensors, a tied
    tensor stored once under its alphabetically first name) for a parity case."""
    from safetensors.torch import save_file

    config, case = load_parity_case(name)
    sd = {k: synthetic_weight(k, shape, case["seed"], case["kinds"].get(k)).contiguous()
          for k, shape in case["shapes"].items()}
    if tied_once:
        for alias, source in case.get("tied", {}).items():
            keep, drop = sorted([alias, source])
            sd.pop(drop, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    save_file(sd, str(out_dir / "model.safetensors"))
    return config, case


# ---------------------------------------------------------------------------------------
# Tiny random models for end-to-end tests (no downloads)


def tiny_text_encoder(seed: int = 0):
    from tatitok_fast.text import CLIPTextEncoder

    return CLIPTextEncoder.tiny(seed)


def assert_same_init(got: dict, want: dict, min_numel: int = 256) -> None:
    """Two freshly initialised state dicts (ours, the official model's) come from the same
    init: same keys and shapes, equal constant tensors (zeros, ones), and the std of every
    tensor with at least min_numel elements within 15 %."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g, w = got[key].float(), w.float()
        assert g.shape == w.shape, key
        if torch.all(w == 0) or torch.all(w == 1):
            assert torch.equal(g, w), f"{key}: expected constant {w.flatten()[0].item()}"
        elif w.numel() >= min_numel:
            ratio = g.std().item() / w.std().item()
            assert 0.85 < ratio < 1.18, f"{key}: init std {g.std().item():.4g}, official {w.std().item():.4g}"
