"""Checkpoints of a run: DCP (torch.distributed.checkpoint) in <run>/checkpoints/step-N/.

Saved: model and optimizer (get_state_dict: works for one process, DDP and FSDP2 shards),
scheduler, EMA, loss-side modules and their optimizer/scheduler, step — through DCP — plus,
per rank, every RNG state (torch CPU/CUDA, numpy, python, as tensors) and the data position
(plain ints) in `rank-R.pt`. A step is written into `step-N.partial` and renamed to `step-N`
only after every rank finished and `COMPLETE` (the manifest: every file and its size) is
written, so resume never picks a half-written step.

Loading (load_latest):
- a step whose files do not match its manifest (truncated, missing) is corrupt: it is named
  in the log and the previous step is used; so is one whose data fails to read;
- a step that is intact but does not fit this run (other model, other keys or shapes) stops
  the run with a ResumeError, checked before anything is written into the model; with
  checkpoint.allow_restart the run starts over from step 0 instead and the unusable steps are
  renamed `step-N.unloadable`;
- a run folder is data, not code: the per-rank files load with weights_only=True, the DCP
  metadata through an unpickler that knows only DCP's metadata classes, and DCP's non-tensor
  entries with weights_only=True; anything else is refused with a ResumeError;
- Transformer Engine's `_extra_state` (empty on a fresh module, a pickled blob after
  DelayedScaling FP8 steps: TransformerEngine issue #1860) is loaded into a buffer of the
  saved size, so the blob reaches the module's set_extra_state;
- the world size may change: DCP reshards model and optimizer; every rank then reads all old
  ranks' local files (RNG of the same rank when it existed, data positions for the re-split).
"""
from __future__ import annotations

import contextlib
import io
import pickle
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tatitok_fast.training.parallel import World, barrier

COMPLETE = "COMPLETE"


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot be resumed from (it does not fit this run, or a file
    in it is refused); the message names the step folder and what is wrong."""


# ---- RNG states as tensors and plain numbers (loadable with weights_only=True) ----

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- reading a run folder without running its code ----

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "PureWindowsPath")}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a global outside the allow-list (not a damaged file)."""


def _is_refusal(exc: BaseException) -> bool:
    """A weights_only / allow-list refusal, as opposed to a damaged (unreadable) pickle."""
    return isinstance(exc, _RefusedGlobal) or "Unsupported global" in str(exc) or "Unsupported class" in str(exc)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: allow only DCP's own metadata classes, torch.Size,
    dtypes and paths, so a crafted file cannot name a callable that runs code."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if (module in _DCP_MODULES and isinstance(getattr(sys.modules[module], name, None), type)) \
                or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"refused global {module}.{name}")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except _RefusedGlobal as exc:
            raise ResumeError(f"{path}: refused ({exc}); a checkpoint's metadata holds only DCP's metadata "
                              "classes") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:  # damaged
            raise OSError(f"{path.name} does not read ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise ResumeError(f"{path}: refused (a {type(metadata).__name__}, not DCP metadata)")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's non-tensor entries (scheduler state, step, param groups) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            if not _is_refusal(exc):
                raise
            raise ResumeError(f"checkpoint entry {read_item.dest_index.fqn}: refused ({exc})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_local_file(path: Path) -> dict:
    """A rank-R.pt file: tensors and plain data only (weights_only=True), else ResumeError;
    a damaged file -> OSError (the step is corrupt)."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        if not (isinstance(exc, pickle.UnpicklingError) and _is_refusal(exc)):
            raise OSError(f"{path.name} does not read ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResumeError(f"{path}: refused: it holds objects other than tensors and plain data, which could "
                          f"run code on load ({first})") from None


@contextlib.contextmanager
def _quiet_single_process(world: World):
    """DCP warns on every save/load in one process ("torch.distributed is disabled ...,
    assuming the intent is to save in a single process"): that is our intent; silence only that."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _Corrupt(Exception):
    """A step folder that does not match its manifest or whose data does not read; `touched`:
    the read failed inside dcp.load, so part of the model may already hold its values."""

    def __init__(self, message: str, touched: bool = False):
        super().__init__(message)
        self.touched = touched


class CheckpointManager:
    """Save/load the Trainer's state. `parts` maps names to objects with state_dict /
    load_state_dict (schedulers, EMA, loss module, ...); the model and its optimizer go through
    DCP's get_state_dict / set_state_dict; `aux` is (module, optimizer) for loss-side training."""

    def __init__(self, folder: Path, world: World, keep_latest_k: int, allow_restart: bool = False,
                 log=None):
        self.folder, self.world, self.keep, self.allow_restart = Path(folder), world, keep_latest_k, allow_restart
        self.log = log or (lambda msg: print(msg, file=sys.stderr) if world.is_main else None)

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
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.world)
        state = self._state(model, optimizer, parts, aux)
        state["step"] = step
        with _quiet_single_process(self.world):
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save({"rng": rng_state(), "world_size": self.world.world_size, **(local or {})},
                   tmp / f"rank-{self.world.rank}.pt")
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

    def load_latest(self, model, optimizer, parts: dict, aux=None) -> tuple[int, list[dict]] | None:
        """Restore the newest usable checkpoint (see the module doc); returns (step, every saved
        rank's local state, by rank) or None when there is none (or when starting over)."""
        steps = self.steps()
        read_failed = None
        for step in reversed(steps):
            try:
                return step, self._load(step, model, optimizer, parts, aux)
            except _Corrupt as exc:
                warnings.warn(f"checkpoint {self.path(step)} could not be loaded: it is corrupt ({exc}); "
                              "falling back to the previous one", RuntimeWarning, stacklevel=2)
                read_failed = read_failed or exc.touched
            except ResumeError as exc:
                if not self.allow_restart:
                    raise ResumeError(f"{exc}\n(set --checkpoint.allow_restart true to start over from step 0, "
                                      "or use another job.dump_folder)") from None
                self.log(f"warning: {exc}; checkpoint.allow_restart: starting over from step 0")
                self._set_aside(steps)
                return None
        if steps:
            if read_failed or not self.allow_restart:  # after a failed read the model is half-loaded
                raise ResumeError(f"no checkpoint in {self.folder} could be loaded (steps {steps}, all corrupt)"
                                  + ("" if read_failed else "; set --checkpoint.allow_restart true to start over"))
            self.log(f"warning: every checkpoint in {self.folder} is corrupt; starting over from step 0")
            self._set_aside(steps)
        return None

    def _set_aside(self, steps: list[int]) -> None:
        barrier(self.world)
        if self.world.is_main:
            for s in steps:
                self.path(s).rename(self.path(s).with_name(f"step-{s}.unloadable"))
        barrier(self.world)

    def _max_over_ranks(self, value: int) -> int:
        if not self.world.distributed:
            return value
        t = torch.tensor([value], device=self.world.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def _verify(self, path: Path) -> None:
        for line in (path / COMPLETE).read_text().splitlines():
            name, size = line.rsplit(" ", 1)
            f = path / name
            if not f.is_file() or f.stat().st_size != int(size):
                raise _Corrupt(f"{name} is {'missing' if not f.is_file() else f'{f.stat().st_size} bytes'}, "
                               f"the manifest says {size} bytes")

    def _load(self, step: int, model, optimizer, parts: dict, aux) -> list[dict]:
        path = self.path(step)
        self._verify(path)
        files = {int(f.stem.split("-", 1)[1]): f for f in path.glob("rank-*.pt")}
        if sorted(files) != list(range(len(files))) or not files:
            raise _Corrupt(f"rank files {sorted(files)} are not ranks 0..N-1")
        refused = None
        try:
            if len(files) == self.world.world_size:
                own = load_local_file(files[self.world.rank])
                locals_ = [own if r == self.world.rank else {} for r in range(len(files))]
            else:  # world size changed: every rank reads all (small) local files
                locals_ = [load_local_file(files[r]) for r in range(len(files))]
        except ResumeError as exc:
            refused = exc
        except OSError as exc:
            refused = _Corrupt(str(exc))
        # every rank takes the same way (none waits in dcp.load): 2 = refused, 1 = corrupt somewhere
        worst = self._max_over_ranks(2 if isinstance(refused, ResumeError) else 1 if refused else 0)
        if worst == 2:
            raise refused if isinstance(refused, ResumeError) else \
                ResumeError(f"{path}: another rank refused its rank file (its error names it)")
        if worst == 1:
            raise refused or _Corrupt("another rank's rank file does not read")
        reader = _SafeReader(str(path))
        state = self._state(model, optimizer, parts, aux)
        state["step"] = -1
        try:
            metadata = reader.read_metadata()
        except (OSError, EOFError) as exc:
            raise _Corrupt(f"metadata does not read: {exc}") from exc
        fit_extra_state(state["model"], metadata, "model")
        if aux is not None:
            fit_extra_state(state["aux_model"], metadata, "aux_model")
        check_compatible(state, metadata, path)
        try:
            with _quiet_single_process(self.world):
                dcp.load(state, storage_reader=reader, planner=_SafePlanner())
        except (Exception, CheckpointException) as exc:  # DCP wraps every rank's error (a BaseException)
            causes = [e for e, _ in exc.failures.values()] if isinstance(exc, CheckpointException) else [exc]
            refused = next((e for e in causes if isinstance(e, ResumeError)), None)
            if refused is not None:
                raise ResumeError(str(refused)) from None
            # the files passed the manifest but their content does not read
            first = causes[0] if causes else exc
            raise _Corrupt(f"{type(first).__name__}: {first}", touched=True) from exc
        if state["step"] != step:
            raise ResumeError(f"{path}: its step entry {state['step']} does not match the folder name")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for name, obj in parts.items():
            obj.load_state_dict(state[name])
        if aux is not None:
            set_state_dict(aux[0], aux[1], model_state_dict=state["aux_model"], optim_state_dict=state["aux_optimizer"])
        if self.world.rank < len(locals_):
            set_rng_state(locals_[self.world.rank]["rng"])
        return locals_


def fit_extra_state(msd: dict, metadata: Metadata, prefix: str) -> None:
    """Give every `_extra_state` tensor of `msd` the saved size and dtype, so DCP loads the
    saved blob (TE: empty before FP8 steps, pickled FP8 metadata after; issue #1860)."""
    for key, value in list(msd.items()):
        if not key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        saved = metadata.state_dict_metadata.get(f"{prefix}.{key}")
        if isinstance(saved, TensorStorageMetadata) and (tuple(saved.size) != tuple(value.shape)
                                                         or saved.properties.dtype != value.dtype):
            msd[key] = torch.empty(saved.size, dtype=saved.properties.dtype, device=value.device)


def check_compatible(state: dict, metadata: Metadata, path: Path) -> None:
    """Every entry this run loads exists in the checkpoint with the same global shape:
    a ResumeError before dcp.load writes anything into the model."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    missing = [k for k in flat if k not in saved]
    wrong = []
    for k, v in flat.items():
        if k in saved and isinstance(v, torch.Tensor):
            md = saved[k]
            if not isinstance(md, TensorStorageMetadata):
                wrong.append(f"{k}: saved a non-tensor, this run has a tensor {tuple(v.shape)}")
            elif tuple(md.size) != tuple(v.shape):
                wrong.append(f"{k}: saved {tuple(md.size)}, this run has {tuple(v.shape)}")
    if missing or wrong:
        lines = [f"{len(missing)} entries missing (e.g. {missing[:3]})"] if missing else []
        lines += [f"{len(wrong)} of other shapes (e.g. {wrong[:3]})"] if wrong else []
        raise ResumeError(f"checkpoint {path} does not fit this run's model / optimizer: {'; '.join(lines)}")


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on the CPU, on every rank (for export): copies,
    never the model's own tensors. (On the CPU, one process or DDP, get_model_state_dict
    returns the live parameters themselves: a later in-place write, such as EMA.swap()
    restoring the live weights, would change what was taken.)"""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    own = {_storage(t) for t in (*model.parameters(), *model.buffers())}
    copies: dict[int, torch.Tensor] = {}  # one copy per tensor: tied weights stay tied
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and _storage(v) in own:
            if id(v) not in copies:
                copies[id(v)] = v.detach().clone()
            sd[k] = copies[id(v)]
    return sd


def _storage(t: torch.Tensor) -> int:
    """The address of t's storage (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().data_ptr()
