"""Checkpoints of a run: DCP (torch.distributed.checkpoint) in <run>/checkpoints/step-N/.

Saved: model and optimizer (get_state_dict: works for one process, DDP and FSDP2 shards),
scheduler, EMA, loss-side modules and their optimizer/scheduler, step — through DCP — plus,
per rank, every RNG state (torch CPU/CUDA, numpy, python) and the data position in
`rank-R.pt`. A step is written into `step-N.partial` and renamed to `step-N` only after every
rank finished and `COMPLETE` is written, so resume never picks a half-written step; a step
that fails to load is reported and the previous one is used.
"""
from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tatitok_fast.training.parallel import World, barrier

COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Save/load the Trainer's state. `parts` maps names to objects with state_dict /
    load_state_dict (schedulers, EMA, loss module, ...); the model and its optimizer go through
    DCP's get_state_dict / set_state_dict; `aux` is (module, optimizer) for loss-side training."""

    def __init__(self, folder: Path, world: World, keep_latest_k: int):
        self.folder, self.world, self.keep = Path(folder), world, keep_latest_k
        if world.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)

    # ---- listing ----
    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first."""
        out = []
        for d in self.folder.glob("step-*"):
            if d.suffix != ".partial" and (d / COMPLETE).is_file():
                try:
                    out.append(int(d.name.split("-", 1)[1]))
                except ValueError:
                    continue
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    # ---- state ----
    def _state(self, model, optimizer, parts: dict, aux) -> dict:
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optimizer": osd}
        for name, obj in parts.items():
            state[name] = obj.state_dict()
        if aux is not None:
            amod, aopt = aux
            amsd, aosd = get_state_dict(amod, aopt)
            state["aux_model"], state["aux_optimizer"] = amsd, aosd
        return state

    def save(self, step: int, model, optimizer, parts: dict, aux=None, local: dict | None = None) -> Path:
        """Write step-N (DCP + per-rank local state), atomically; prune old steps."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".partial")
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.world)
        state = self._state(model, optimizer, parts, aux)
        state["step"] = step
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save({"rng": rng_state(), **(local or {})}, tmp / f"rank-{self.world.rank}.pt")
        barrier(self.world)
        if self.world.is_main:  # the manifest: every file and its size, checked on load
            files = sorted(f for f in tmp.iterdir() if f.is_file())
            (tmp / COMPLETE).write_text("".join(f"{f.name} {f.stat().st_size}\n" for f in files))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        barrier(self.world)
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for step in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def load_latest(self, model, optimizer, parts: dict, aux=None) -> tuple[int, dict] | None:
        """Restore the newest loadable checkpoint; returns (step, this rank's local state) or
        None when there is none. A checkpoint that fails to load is skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                return step, self._load(step, model, optimizer, parts, aux)
            except Exception as exc:  # a corrupt / truncated checkpoint: fall back to the previous one
                warnings.warn(f"checkpoint {self.path(step)} could not be loaded ({type(exc).__name__}: {exc}); "
                              "trying the previous one", RuntimeWarning, stacklevel=2)
        return None

    def _load(self, step: int, model, optimizer, parts: dict, aux) -> dict:
        path = self.path(step)
        for line in (path / COMPLETE).read_text().splitlines():
            name, size = line.rsplit(" ", 1)
            f = path / name
            if not f.is_file() or f.stat().st_size != int(size):
                raise OSError(f"{f} is missing or truncated ({f.stat().st_size if f.is_file() else 'missing'} "
                              f"bytes, expected {size})")
        local_file = path / f"rank-{self.world.rank}.pt"
        if not local_file.is_file():
            raise FileNotFoundError(f"{local_file} is missing (saved with a different number of processes?)")
        local = torch.load(local_file, weights_only=False)  # our own file: RNG states are numpy/python objects
        state = self._state(model, optimizer, parts, aux)
        state["step"] = -1
        dcp.load(state, checkpoint_id=str(path))
        if state["step"] != step:
            raise ValueError(f"step entry {state['step']} does not match the folder name")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for name, obj in parts.items():
            obj.load_state_dict(state[name])
        if aux is not None:
            set_state_dict(aux[0], aux[1], model_state_dict=state["aux_model"], optim_state_dict=state["aux_optimizer"])
        set_rng_state(local["rng"])
        return local


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on the CPU, on every rank (for export)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
