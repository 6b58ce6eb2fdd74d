"""Helpers shared by the tests."""
import json
import math
import zlib
from pathlib import Path

import torch

from tatitok_fast.ops import has_kernel

HAS_CUDA = torch.cuda.is_available()


def devices_for(op: str):
    """CPU always; CUDA when a GPU and the op's CUDA kernel are both present."""
    out = ["cpu"]
    if HAS_CUDA and has_kernel(op, "cuda"):
        out.append("cuda")
    return out


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

TEXT_WIDTH = 64  # text_embed_dim of the tiny configs below


def tiny_text_encoder(seed: int = 0):
    """A CLIPTextEncoder over a random open_clip CLIP with a 64-wide, 2-layer text tower and
    the real ViT-L-14-336 tokenizer (its BPE ships with open_clip)."""
    import open_clip
    from open_clip.model import CLIP

    from tatitok_fast.text import CLIPTextEncoder

    torch.manual_seed(seed)
    model = CLIP(embed_dim=TEXT_WIDTH,
                 vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 4, "layers": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return CLIPTextEncoder.from_open_clip(model.eval(), open_clip.get_tokenizer("ViT-L-14-336"))


def tiny_tokenizer_config(mode: str = "vq", tokens: int = 16, crop: int = 32) -> dict:
    vq = {"quantize_mode": mode, "token_size": 8 if mode == "vq" else 4, "vit_enc_model_size": "small",
          "vit_dec_model_size": "small", "vit_enc_patch_size": 16, "vit_dec_patch_size": 16,
          "num_latent_tokens": tokens, "finetune_decoder": False, "is_legacy": False, "text_embed_dim": TEXT_WIDTH}
    if mode == "vq":
        vq.update(codebook_size=64, use_l2_norm=False, commitment_cost=0.25, clustering_vq=False)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": crop}}}


def tiny_generator_config(mode: str = "vq", tokens: int = 16) -> dict:
    cfg = tiny_tokenizer_config(mode, tokens)
    mg = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4, "micro_condition": True,
          "micro_condition_embed_dim": 256, "text_drop_prob": 0.1, "sample_aesthetic_score": 6.5}
    if mode == "vq":
        mg.update(condition_num_classes=10, cfg=12.0, num_iter=8, temperature=2.0)
    else:
        cfg["model"]["vq_model"]["scale_factor"] = 0.7525
        mg.update(cfg=3.0, cfg_schedule="linear", num_iter=6, temperature=1.0)
        cfg["losses"] = {"diffloss_d": 2, "diffloss_w": 32, "num_sampling_steps": "10"}
    cfg["model"]["maskgen"] = mg
    return cfg
