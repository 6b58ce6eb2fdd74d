"""Training step rate: one optimizer step (forward, loss, backward, clip, AdamW) of a recipe,
ours in bf16 (and fp32 on CPU), FP8 through torchao and Transformer Engine (where installed),
and the official training step (model + its loss, autocast fp16 + GradScaler on CUDA as its
configs run, autocast bf16 on CPU) on the same config, weights and batch, in the same run.
On CPU the official step is also timed in fp32, its faster mode on CPUs without bf16 units:
`vs official best` divides by the faster of the two official rows.

Inputs are synthetic tensors of the real shapes: token ids / posterior parameters / images,
and CLIP conditions of the right size (the frozen text tower and data loading are outside
the timed step, for both sides). images/s = batch / step time; MFU from the recipe's FLOPs
per sample and the GPU's dense bf16 peak; peak extra memory of one step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from tatitok_fast.benchmarks.harness import (Measurement, Report, load_average, measure_interleaved, run_header,
                                             to_mib)

RECIPE_DIR = Path(__file__).resolve().parents[2] / "training" / "recipes"
BACKENDS = ("bf16", "fp32", "torchao", "te")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="maskgen_vq_xl_stage1",
                        help="a recipe in training/recipes (name) or a TOML path (quick: a tiny recipe)")
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default: the recipe's)")
    parser.add_argument("--backends", default=None,
                        help=f"ours: comma-separated of {BACKENDS} (default: bf16,torchao,te; on CPU fp32 too)")
    parser.add_argument("--official", default=None, metavar="PATH",
                        help="a checkout of bytedance/1d-tokenizer: also time its training step")


def _recipe_path(name: str, quick: bool) -> Path:
    if quick and not name.endswith(".toml") and "tiny" not in name and name.startswith("titok"):
        name = "titok_tiny_stage1" if "stage1" in name else "titok_tiny_stage2" if "stage2" in name else "titok_vq_tiny"
    if quick and not name.endswith(".toml") and "tiny" not in name:
        name = "tatitok_vq_tiny" if name.startswith("tatitok") else ("maskgit_tiny" if name.startswith("maskgit") else
                                                                      "maskgen_kl_tiny" if "_kl" in name
                                                                      else "maskgen_vq_tiny")
    path = Path(name) if name.endswith(".toml") else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise SystemExit(f"--recipe: {name} is not a recipe in {RECIPE_DIR} or a TOML file")
    return path


class Step:
    """One recipe's model, loss and synthetic batch on a device, for timing."""

    def __init__(self, path: Path, device: str, batch: int | None, quick: bool, loss: bool = True):
        from tatitok_fast.training.config import load_config
        from tatitok_fast.training.spec import recipe_class

        over = ["--data.shards", "synthetic.tar", "--training.device", device]
        if batch:
            over += ["--training.local_batch_size", str(batch)]
        cfg = load_config(path, over)
        if quick and "titok" in path.stem:  # official ViT sizes (the official code knows no "tiny" ViT),
            cfg.model.overrides = {**cfg.model.overrides,  # added to the recipe's own overrides
                                   "model.vq_model.vit_enc_model_size": "small",
                                   "model.vq_model.vit_dec_model_size": "small"}
        if cfg.job.recipe == "tatitok":  # timing: every official term on, random weights (no files needed)
            cfg.loss.discriminator_start, cfg.loss.perceptual_weights = 0, "random"
            cfg.loss.perceptual_loss = "lpips-convnext_s-1.0-0.1"
        if cfg.job.recipe == "titok":  # timing: the GAN on, random perceptual nets and VQGAN (no files)
            cfg.loss.discriminator_start, cfg.loss.perceptual_weights, cfg.loss.vqgan_weights = 0, "random", "random"
            if cfg.loss.perceptual_loss == "none":  # a tiny recipe: the full recipes' term
                cfg.loss.perceptual_loss = "convnext_s" if "stage2" in path.stem else "lpips-convnext_s-1.0-0.1"
        self.cfg, self.device = cfg, torch.device(device)
        self.recipe = recipe_class(cfg.job.recipe)(cfg, self.device)
        torch.manual_seed(0)
        self.model = self.recipe.build_model()
        self.loss_module = self.recipe.build_loss() if loss else None  # loss=False: model and batch only
        self.batch_size = cfg.training.local_batch_size
        self.batch = self._synthetic_batch()
        self.notes: list[str] = []
        self.fp8_plans: dict = {}  # backend -> fp8.FP8Plan of its step (the converted-layer count)

    def _synthetic_batch(self) -> dict:
        g = torch.Generator().manual_seed(0)
        b, dev, r = self.batch_size, self.device, self.recipe
        width = self.model.config["model"]["vq_model"].get("text_embed_dim", 768)
        if self.cfg.job.recipe == "maskgit":  # class-labelled tokens, the recipe's own masks / label drops
            import numpy as np

            ids = torch.randint(0, r.codebook_size, (b, r.num_tokens), generator=g)
            labels = torch.randint(0, r.num_classes, (b,), generator=g)
            samples = [r.decode_sample(_class_token_sample(i, ids[i], int(labels[i]), r), np.random.default_rng(i))
                       for i in range(b)]
            return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in r.collate(samples).items()}
        if self.cfg.job.recipe == "titok":
            from tatitok_fast.benchmarks.official_titok_training import titok_batch

            return titok_batch(self, g)
        if self.cfg.job.recipe == "tatitok":
            s = self.model.image_size
            return {"image": torch.rand(b, 3, s, s, generator=g).to(dev),
                    "guidance": torch.randn(b, self.model.decoder.text_context_length, width,
                                            generator=g).to(dev)}
        out = {"condition": torch.randn(b, self.model.text_context_length, width, generator=g).to(dev),
               "condition_pooled": torch.randn(b, 1, width, generator=g).to(dev),
               "aes_score": torch.full((b,), 6.0, device=dev), "text_dropped": torch.zeros(b, device=dev)}
        if r.mode == "vq":
            out["tokens"] = torch.randint(0, r.codebook_size, (b, r.num_tokens), generator=g).to(dev)
            out["masks"] = r._vq_masks(list(range(b)), r.num_tokens).to(dev)
        else:
            c = r.token_size
            out["tokens"] = torch.cat([torch.randn(b, c, 1, r.num_tokens, generator=g),
                                       torch.full((b, c, 1, r.num_tokens), -2.0)], 1).to(dev)
            out.update({k: v.to(dev) for k, v in r._kl_draws(list(range(b))).items()})  # the per-sample draws
        return out

    def ours(self, backend: str):
        """A step closure of our model for `backend` (bf16 autocast; fp32; FP8 projections)."""
        from tatitok_fast.losses.tokenizer import TokenizerLoss
        from tatitok_fast.training import fp8, optim

        model = copy.deepcopy(self.model)
        ctx = contextlib.nullcontext
        amp = backend != "fp32"
        if backend not in ("bf16", "fp32"):
            fp8_cfg = copy.deepcopy(self.cfg.fp8)
            fp8_cfg.backend, fp8_cfg.emulate = backend, self.device.type != "cuda"
            if backend == "te":
                model.to(self.device)  # te.Linear layers are made on the weights' (CUDA) device
            plan = fp8.apply_fp8(model, fp8_cfg, False, self.device)
            self.fp8_plans[backend], ctx = plan, plan.autocast
            self.notes.append(f"{self.device.type} {plan.summary()}")  # the recipe says "emulated" off FP8 hardware
        model.to(self.device).train()
        aux = copy.deepcopy(self.loss_module).to(self.device) if self.loss_module is not None else None
        if backend == "bf16" and self.device.type == "cpu" and isinstance(aux, TokenizerLoss):
            # like for like: the official loss computes its perceptual nets in bf16 under CPU autocast
            aux.cfg = dataclasses.replace(aux.cfg, perceptual_precision="bf16")
            self.notes.append("cpu bf16: ours with loss.perceptual_precision = bf16, as the official loss computes "
                              "its perceptual networks under CPU autocast")
        opt = optim.build_optimizer(model.named_parameters(), self.cfg.optimizer, self.recipe.no_decay, self.device)
        aux_opt = (optim.build_optimizer(aux.named_parameters(), self.cfg.aux_optimizer, self.recipe.no_decay,
                                         self.device) if aux is not None else None)

        def step():
            if aux is not None:  # this backend's loss module (the recipe object is shared by every row)
                self.recipe.loss_module = aux
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp), ctx():
                out = self.recipe.forward_loss(model, self.batch, 1)
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if aux is not None:
                aux_opt.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    d = self.recipe.aux_loss(aux, self.batch, out.extras, 1)
                if d is not None:
                    d.loss.backward()
                    aux_opt.step()
            return out.loss.detach()

        return step

    def official(self, path: str, fp32: bool = False):
        """The official training step on the same config, weights and batch (fp32: without its
        mixed precision)."""
        from tatitok_fast.benchmarks import official_training

        return official_training.step_fn(self, path, fp32)


def _class_token_sample(i: int, ids: torch.Tensor, label: int, recipe) -> dict:
    """A raw class-labelled token sample (what `tatitok-fast tokenize --labels` writes)."""
    from tatitok_fast.token_shards import encode_class_token_sample, shard_metadata

    meta = shard_metadata(tokenizer="synthetic", mode="vq", num_tokens=recipe.num_tokens, token_size=1,
                          codebook_size=recipe.codebook_size)
    return {k: v.encode() if isinstance(v, str) and k != "__key__" else v
            for k, v in encode_class_token_sample(f"{i:09d}", ids.numpy(), label, meta).items()}


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    report = Report(header=run_header(list(devices)))
    spec = args.backends or ("bf16,fp32,torchao,te" if all(d == "cpu" for d in devices) else "bf16,torchao,te")
    backends = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise SystemExit(f"--backends: expected a comma-separated list of {BACKENDS}, got {bad}")
    path = _recipe_path(args.recipe, args.quick)
    for device in devices:
        case = Step(path, device, args.batch or (4 if args.quick else None), args.quick)
        flops = case.recipe.flops_per_sample(case.model)
        shapes = f"{path.stem} B={case.batch_size}"
        fns = []
        for backend in backends:
            try:
                fns.append(("tatitok_fast", backend, case.ours(backend)))
            except Exception as exc:  # FP8 backend missing here: say why, keep the other rows
                report.notes.append(f"{device} {backend}: not run ({type(exc).__name__}: {exc})")
        if args.official:
            from tatitok_fast.benchmarks.official_training import NotOfficial

            official_amp = "fp16 + GradScaler" if device == "cuda" and case.cfg.job.recipe != "maskgit" else \
                "autocast bf16"  # the official MaskGIT config trains in bf16
            try:
                fns.append(("official", official_amp, case.official(args.official)))
                if device == "cpu":  # its faster mode where the CPU has no bf16 units
                    fns.append(("official", "fp32", case.official(args.official, fp32=True)))
            except NotOfficial as exc:  # the demo's tokenizer: our rows only, and why
                report.notes.append(f"{device} official: {exc}")
        rows = []
        # interleaved rounds on CPU (ours and the official step alike under a shared machine's load)
        timings = measure_interleaved([fn for *_, fn in fns], device=device, min_run_time=0.2 if args.quick else 3.0)
        for (impl, dtype, _), t in zip(fns, timings):
            plan = case.fp8_plans.get(dtype) if impl == "tatitok_fast" else None
            # the FP8 rows say how many projections ran in FP8 (and the recipe)
            variant = f"{plan.converted} of {plan.total} layers FP8 ({plan.recipe})" if plan else dtype
            ips = case.batch_size / (t.median_ms * 1e-3)
            rows.append(Measurement(suite="train", case="train step", impl=impl, device=device, dtype=dtype,
                                    shapes=shapes, median_ms=t.median_ms, iqr_ms=t.iqr_ms,
                                    peak_extra_mb=to_mib(t.peak_extra_bytes), variant=variant, items_per_s=ips,
                                    tflops=flops * ips / 1e12 if flops else None, timer=t.timer))
        report.notes += case.notes
        base = next((r for r in rows if r.impl == "official"), None)  # the configs' mixed precision
        for r in rows:
            if base is not None and r.impl != "official":
                r.speedup = base.median_ms / r.median_ms
        report.rows += rows
    report.notes.append("speedup = official step time in its configs' mixed precision / ours; TFLOP/s from the "
                        "recipe's FLOPs per sample (MFU = that / the GPU's dense bf16 peak); items/s = images per "
                        "second; synthetic batch, frozen text tower and data loading outside the step")
    report.header["load_avg_1m_end"] = load_average()
    return report
