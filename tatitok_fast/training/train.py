"""The training loop (torchtitan's shape): config -> Trainer -> train() -> close().

    torchrun --nproc-per-node 8 -m tatitok_fast.training.train --config training/recipes/NAME.toml \\
        [--section.key value ...]
    tatitok-fast train --config ... [--section.key value ...]        # the same, one process

The recipe (spec.py) provides the model, frozen helpers, loss and batch transform; this file
owns the order of things. Running again with the same job.dump_folder resumes from the latest
checkpoint. The data is checked before any model is built or anything is written into the run
folder; SIGTERM / SIGUSR1 end the run after the current step with a checkpoint (exit 0);
non-finite losses follow training.nonfinite (guards.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast.training import data, fp8, optim, parallel
from tatitok_fast.training.checkpoint import CheckpointManager, full_state_dict
from tatitok_fast.training.config import ConfigError, JobConfig, describe, load_config, write_config
from tatitok_fast.training.ema import EMA
from tatitok_fast.training.guards import NonFiniteGuard, Preemption
from tatitok_fast.training.metrics import MetricsLogger, annotate
from tatitok_fast.training.spec import recipe_class


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        t = cfg.training
        # distributed, determinism
        self.world = world = parallel.init_distributed(t.device)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed % 2 ** 32)
        random.seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(cfg.job.dump_folder)
        # the data, checked against the recipe before any model is built or any file written
        self.recipe = recipe = recipe_class(cfg.job.recipe)(cfg, world.device)
        check_data(cfg)
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.run_dir / "config.toml")
        # model (fp32, loaded), FP8 swap, loss, frozen helpers, parallelism
        self.inner = model = recipe.build_model()
        self.model_cls = type(model)  # before fully_shard swaps in its FSDP subclass
        self.mode = parallel.resolve_mode(cfg.parallelism.mode, world)
        if cfg.fp8.backend == "te":
            model.to(world.device)  # te.Linear layers are made on the weights' (CUDA) device
        self.fp8_plan = fp8.apply_fp8(model, cfg.fp8, self.mode == "fsdp", world.device)
        self.fp8_count, self.fp8_ctx = self.fp8_plan.converted, self.fp8_plan.autocast
        # "fp8: N of M projections converted (backend, recipe)"; fp8/layers in the first metrics row
        self._first_row = {"fp8/layers": float(self.fp8_count)} if cfg.fp8.backend != "none" else {}
        if world.is_main and self._first_row:
            print(self.fp8_plan.summary(), file=sys.stderr)
        loss_module = recipe.build_loss()
        recipe.build_frozen()
        self.model = parallel.parallelize(model, recipe.blocks(model), cfg.parallelism, world, t.mixed_precision)
        # optimizers (after sharding), EMA; skipping a non-finite step needs fused AdamW's found_inf,
        # which fused = "auto" gives on CPU and CUDA (config.validate refuses "off" with skip)
        self.optimizer = optim.build_optimizer(model.named_parameters(), cfg.optimizer, recipe.no_decay, world.device)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enable else None
        self.aux = self.aux_optimizer = self.aux_scheduler = None
        if loss_module is not None:
            self.aux = loss_module.to(world.device)  # replicated; gradients averaged in _aux_step
            if any(p.requires_grad for p in loss_module.parameters()):
                self.aux_optimizer = optim.build_optimizer(loss_module.named_parameters(), cfg.aux_optimizer,
                                                           recipe.no_decay, world.device)
                self.aux_scheduler = optim.build_scheduler(
                    self.aux_optimizer, cfg.aux_lr_scheduler, t.steps - getattr(recipe, "aux_start_step", 0))
        # resume, then the data stream from where the checkpoint left it
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", world, cfg.checkpoint.keep_latest_k,
                                      cfg.checkpoint.allow_restart)
        self.step, position, skipped = 0, None, 0
        if cfg.checkpoint.enable:
            loaded = self.ckpt.load_latest(self.model, self.optimizer, self._parts(), self._aux_pair())
            if loaded is not None:
                self.step, saved = loaded
                position = self._resumed_position(saved)
                skipped = max(int(s.get("skipped_steps", 0)) for s in saved)
                if world.is_main:
                    print(f"resumed from {self.ckpt.path(self.step)}"
                          + (f" (saved on {len(saved)} ranks, now {world.world_size})"
                             if len(saved) != world.world_size else ""), file=sys.stderr)
        self.guard = NonFiniteGuard(t.nonfinite, world.device, skipped)
        self.loader, self.position = data.build_loader(cfg, recipe, world.rank, world.world_size,
                                                       t.local_batch_size, position)
        global_batch = t.local_batch_size * t.grad_accum_steps * world.world_size
        self.metrics = MetricsLogger(self.run_dir, cfg, is_main=world.is_main, total_steps=t.steps,
                                     start_step=self.step, global_batch=global_batch,
                                     flops_per_sample=recipe.flops_per_sample(model), device=world.device)

    def _resumed_position(self, saved: list[dict]) -> dict | None:
        """This rank's data position (and RNG) from the checkpoint's local states, one per
        saved rank; a changed world size re-splits the stream (data.reshard_position)."""
        w = self.world
        if len(saved) == w.world_size:
            return saved[w.rank].get("data")
        if w.rank >= len(saved):  # a rank that did not exist: its own seeded RNG streams
            torch.manual_seed(self.cfg.training.seed * 1000003 + w.rank * 7919 + self.step)
            np.random.seed((self.cfg.training.seed + w.rank * 7919 + self.step) % 2 ** 32)
            random.seed(f"{self.cfg.training.seed}/{w.rank}/{self.step}")
        return data.reshard_position([s.get("data") for s in saved], w.rank, self.cfg.data.split)

    # ---- pieces of state ----
    def _parts(self) -> dict:
        parts = {"scheduler": self.scheduler}
        if self.ema is not None:
            parts["ema"] = self.ema
        if self.aux_scheduler is not None:
            parts["aux_scheduler"] = self.aux_scheduler
        if self.aux is not None and self.aux_optimizer is None:  # buffers only (no trainable part)
            parts["aux_state"] = self.aux
        return parts

    def _aux_pair(self):
        return (self.aux, self.aux_optimizer) if self.aux_optimizer is not None else None

    def _autocast(self):
        if self.cfg.training.mixed_precision == "bf16" and self.mode != "fsdp":  # FSDP2: MixedPrecisionPolicy
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_batch(self, it) -> dict:
        with annotate("data"):
            batch = next(it)
            self.position.update(batch)
            batch = {k: v.to(self.world.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            with torch.no_grad():
                return self.recipe.batch_transform(batch)

    def _grad_sync(self, last: bool):
        if self.mode == "ddp" and not last:
            return self.model.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ---- one optimizer step ----
    def train_step(self, it) -> dict[str, torch.Tensor]:
        t = self.cfg.training
        accum = t.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, torch.Tensor] = {}
        kept = []  # (batch, extras) for the loss-side step
        for micro in range(accum):
            batch = self._next_batch(it)
            with self._grad_sync(micro == accum - 1):
                with annotate("forward"), self._autocast(), self.fp8_ctx():
                    out = self.recipe.forward_loss(self.model, batch, self.step)
                with annotate("backward"):
                    (out.loss / accum).backward()
            parallel.apply_deferred_updates(self.inner)  # FSDP2: the codebook refresh, into the shards
            for k, v in {"loss": out.loss, **out.metrics}.items():
                logged[k] = logged.get(k, 0) + torch.as_tensor(v).detach().float() / accum
            kept.append((batch, out.extras))
        with annotate("optimizer"):
            if t.max_norm > 0:
                norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.max_norm)
            else:  # not clipped, but checked
                norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if t.max_norm > 0:
                logged["grad_norm"] = norm
            bad = self.guard.flag(logged, norm)  # device bool, no sync
            if t.nonfinite == "skip":
                self.optimizer.found_inf = bad.float()  # fused AdamW leaves everything as it was
            self.optimizer.step()
            self.scheduler.step()
            fp8.torchao_after_step(self.model, self.cfg.fp8, self.mode == "fsdp")
            if self.ema is not None:
                self.ema.update()
        logged["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        if self.aux_optimizer is not None:
            logged.update(self._aux_step(kept, accum, bad))
            if "aux_loss" in logged:
                bad = bad | self.guard.flag({"aux_loss": logged["aux_loss"]}, None)
        self.guard.record(bad, self.step + 1)
        logged["__bad__"] = bad
        return logged

    def _aux_step(self, kept, accum, model_bad: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss-side module's step on the same micro-batches (official order: the model's
        step first, then the discriminator's)."""
        self.aux_optimizer.zero_grad(set_to_none=True)
        logged = {}
        for batch, extras in kept:
            with self._autocast():
                out = self.recipe.aux_loss(self.aux, batch, extras, self.step)
            if out is None:
                return {}
            (out.loss / accum).backward()
            for k, v in {"aux_loss": out.loss, **out.metrics}.items():
                logged[k] = logged.get(k, 0) + torch.as_tensor(v).detach().float() / accum
        parallel.average_gradients(self.aux, self.world)
        if self.cfg.training.max_norm > 0:
            nn.utils.clip_grad_norm_(self.aux.parameters(), self.cfg.training.max_norm)
        if self.cfg.training.nonfinite == "skip":  # a poisoned model step or its own NaN: no update
            self.aux_optimizer.found_inf = (model_bad | ~torch.isfinite(logged["aux_loss"])).float()
        self.aux_optimizer.step()
        self.aux_scheduler.step()
        logged["aux_lr"] = torch.tensor(self.aux_scheduler.get_last_lr()[0])
        return logged

    # ---- the loop ----
    def train(self) -> None:
        cfg, total = self.cfg, self.cfg.training.steps
        stop = min(total, cfg.training.stop_after or total)
        with Preemption(self.world, cfg.checkpoint.on_signal) as preemption:
            it = iter(self.loader)  # after the handlers are in: forked loader workers inherit them
            window: dict[str, torch.Tensor] = {}
            n = torch.zeros(())  # good steps in the window (a device tensor once steps ran)
            while self.step < stop:
                logged = self.train_step(it)
                bad = logged.pop("__bad__")
                self.step += 1
                self.metrics.advance()
                for k, v in logged.items():  # skipped (non-finite) steps stay out of the averages
                    window[k] = window.get(k, 0.0) + torch.where(bad, 0.0, v)
                n = n + (~bad).float()
                signal_name = preemption.requested()
                last, stopping = self.step == total, self.step == stop or signal_name is not None
                if self.step % cfg.metrics.log_freq == 0 or stopping:
                    skipped = self.guard.check(self.world, f"logging step {self.step}")
                    counts = {f"data/{k}": torch.tensor(float(v)) for k, v in self.position.totals().items()}
                    values = parallel.all_reduce_mean({**{k: v / n for k, v in window.items()}, **counts},
                                                      self.world)
                    # sums over ranks (integers; the mean went through float32)
                    values.update({k: float(round(values[k] * self.world.world_size)) for k in counts})
                    values["skipped_steps"] = float(skipped)
                    values.update(self._first_row)
                    self._first_row = {}
                    self.metrics.log(self.step, values)
                    window, n = {}, torch.zeros(())
                if cfg.samples.interval and (self.step % cfg.samples.interval == 0 or last):
                    self.guard.check(self.world, f"logging samples at step {self.step}")
                    self._log_samples()
                if cfg.eval.interval and (self.step % cfg.eval.interval == 0 or last):
                    self._evaluate()
                if cfg.checkpoint.enable and (self.step % cfg.checkpoint.interval == 0 or stopping):
                    self.guard.check(self.world, f"saving checkpoint step-{self.step}")  # never save a poisoned one
                    self.save_checkpoint()
                if (cfg.checkpoint.export_interval and self.step % cfg.checkpoint.export_interval == 0) or last:
                    self.guard.check(self.world, f"exporting step {self.step}")
                    self.export()
                if signal_name is not None:
                    if self.world.is_main:
                        saved = (f"checkpoint saved to {self.ckpt.path(self.step)}" if cfg.checkpoint.enable
                                 else "no checkpoint saved (checkpoint.enable = false)")
                        print(f"preempted ({signal_name}) after step {self.step} of {total}: {saved}; "
                              "run the same command again to resume", file=sys.stderr)
                    break

    def _ema_weights(self):
        return self.ema.swap() if self.ema is not None and self.cfg.checkpoint.export_ema else contextlib.nullcontext()

    def _log_samples(self) -> None:
        with self._ema_weights(), torch.no_grad():
            self.inner.eval()
            images = self.recipe.log_samples(self.inner, self.step)
            self.inner.train()
        self.metrics.images(self.step, images, self.run_dir)

    def _evaluate(self) -> None:
        evaluate = getattr(self.recipe, "evaluate", None)
        if evaluate is None:
            return
        with self._ema_weights(), torch.no_grad():
            self.inner.eval()
            values = evaluate(self.inner, self.step)
            self.inner.train()
        if values:
            self.metrics.log(self.step, {f"eval/{k}": v for k, v in values.items()})

    def save_checkpoint(self) -> Path:
        with annotate("checkpoint"):
            return self.ckpt.save(self.step, self.model, self.optimizer, self._parts(), self._aux_pair(),
                                  local={"data": self.position.state_dict(), "skipped_steps": int(self.guard.count)})

    def export(self) -> Path:
        """Official-layout weights (EMA when on) in <run>/export/step-N, loadable by from_pretrained."""
        out = self.run_dir / "export" / f"step-{self.step}"
        with self._ema_weights():
            sd = full_state_dict(self.model)  # every rank takes part (FSDP gathers)
        if self.world.is_main:
            sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}  # TE's FP8 metadata
            with torch.device("meta"):
                fresh = self.model_cls(self.inner.config)
            fresh.load_state_dict(sd, strict=True, assign=True)
            fresh.post_load()
            self.recipe.export(fresh.float(), out)
        parallel.barrier(self.world)
        return out

    def close(self) -> None:
        self.metrics.close()
        if self.world.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------

def check_data(cfg: JobConfig) -> list[str]:
    """data.shards expanded (every local file must exist) and its first samples decoded by a
    probe of the recipe whose model lives on the meta device (no memory, no init_from
    download): a DataError / ConfigError before any real model is built. -> the shard URLs."""
    urls = data.expand_shards(cfg.data.shards)
    probe_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=""))
    probe = recipe_class(cfg.job.recipe)(probe_cfg, torch.device("meta"))
    with torch.device("meta"):
        probe.build_model()  # sets what decode_sample needs: sizes, codebook, mode
    data.check_first_samples(urls, probe.decode_sample, cfg.job.recipe)
    return urls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tatitok_fast.training.train", description=__doc__.split("\n\n")[0],
                                     epilog="Any config key: --section.key value (see --help-config).")
    parser.add_argument("--config", default=None, help="a TOML recipe (training/recipes/*.toml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (also TATITOK_FAST_DEBUG=1)")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.help_config:
            from tatitok_fast.training.spec import loss_config_class

            recipe = load_config(args.config, rest).job.recipe if args.config else None
            print(describe(loss_config_class(recipe) if recipe else None))
            return 0
        cfg = load_config(args.config, rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg)
    except BaseException:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    from tatitok_fast.cli.errors import debug_requested, report_errors

    sys.exit(report_errors(main, debug_requested(None)))
