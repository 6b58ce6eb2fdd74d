"""ImageNet class-to-image sampling for gFID (the official sample_imagenet_titok.py, made
robust): many ranks, resumable, one .npz in the ADM evaluator's format at the end.

Plan. Sample i (0 <= i < per_class * num_classes) has label i % num_classes (the official
`list(range(1000)) * 50`). Samples are cut into chunks of `batch` consecutive indices; chunk k
is one generate() call, after torch.manual_seed(chunk_seed(seed, k)) (a SeedSequence of
(seed, k): generate() draws on the device's global RNG, so the chunk is the seeding unit).
A chunk's images depend only on (models, settings, seed, batch, k, device kind): not on the
number of ranks, on which rank made it, nor on resumption. Changing --batch changes the images.

Work folder FILE.parts beside FILE.npz: manifest.json (the plan, models and settings; a rerun
with other ones is refused) and chunk_{k:06d}.npy (uint8 n x H x W x 3), each written to a
temporary name and renamed, so a killed run leaves only whole chunks. A rerun lists the chunks
present, deals the missing ones to the ranks (rank r takes every W-th), never rewrites a
finished one, and rank 0 streams all chunks into FILE.npz (`arr_0` images, `arr_1` labels, as
ADM's labelled batches) once every rank is done. Images are converted as the official
sample_fn does: clamp to [0, 1], x 255, truncated to uint8. The folder must be shared by all
ranks (one machine, or a shared file system across nodes).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class SamplingPlan:
    num_classes: int = 1000
    per_class: int = 50
    batch: int = 125
    seed: int = 0

    def __post_init__(self):
        for name in ("num_classes", "per_class", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")

    @property
    def num_samples(self) -> int:
        return self.num_classes * self.per_class

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.batch)

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.batch, min((k + 1) * self.batch, self.num_samples)

    def chunk_labels(self, k: int) -> np.ndarray:
        start, stop = self.chunk_range(k)
        return np.arange(start, stop, dtype=np.int64) % self.num_classes

    def chunk_seed(self, k: int) -> int:
        return int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0])


def work_dir_for(output: str | os.PathLike) -> Path:
    """FILE.npz -> FILE.parts (beside it)."""
    output = Path(output)
    return output.with_name(output.name[:-len(".npz")] + ".parts" if output.name.endswith(".npz")
                            else output.name + ".parts")


def chunk_path(work: Path, k: int) -> Path:
    return work / f"chunk_{k:06d}.npy"


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float -> (B, H, W, 3) uint8: clamp [0, 1], x 255, truncate (the official
    sample_fn, demo_util.py:130-131)."""
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SamplingError(ValueError):
    """A work folder that does not belong to this run, or a damaged chunk."""


def prepare_work_dir(work: Path, manifest: dict) -> None:
    """Create `work` with `manifest`, or check that the one there is the same (rank 0 only)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / MANIFEST
    record = {"format": MANIFEST_FORMAT, **manifest}
    if path.exists():
        check_manifest(work, manifest)
        return
    _atomic_write_bytes(path, lambda f: f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode()))


def check_manifest(work: Path, manifest: dict) -> None:
    path = work / MANIFEST
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SamplingError(f"{path}: unreadable manifest ({exc}); delete the folder {work} to start over") from None
    want = json.loads(json.dumps({"format": MANIFEST_FORMAT, **manifest}, sort_keys=True))
    if found != want:
        diff = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
        details = "; ".join(f"{k}: there {found.get(k)!r}, now {want.get(k)!r}" for k in diff)
        raise SamplingError(f"{work} holds chunks of another run ({details}); resume with the same settings, "
                            f"or delete {work} / choose another -o")


def finished_chunks(work: Path, plan: SamplingPlan, image_shape: tuple[int, int, int] | None = None) -> set[int]:
    """Chunk ids whose files are present (their headers checked against the plan)."""
    done = set()
    for k in range(plan.num_chunks):
        path = chunk_path(work, k)
        if not path.exists():
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise SamplingError(f"{path}: damaged chunk ({exc}); delete it and rerun") from None
        start, stop = plan.chunk_range(k)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != stop - start or \
                (image_shape is not None and arr.shape[1:] != tuple(image_shape)):
            raise SamplingError(f"{path}: holds {arr.dtype} {arr.shape}, expected {stop - start} uint8 images"
                                f"{'' if image_shape is None else ' of ' + str(tuple(image_shape))}; delete it and rerun")
        done.add(k)
    return done


@torch.no_grad()
def sample_chunk(pipe: Callable[..., torch.Tensor], plan: SamplingPlan, k: int, settings: dict,
                 device: torch.device | str) -> np.ndarray:
    """Chunk k's images, (n, H, W, 3) uint8. pipe(labels (n,) int64 on device, **settings)
    -> (n, 3, H, W) float images (a ClassToImage)."""
    labels = torch.from_numpy(plan.chunk_labels(k)).to(device)
    torch.manual_seed(plan.chunk_seed(k))
    return to_uint8_nhwc(pipe(labels, **settings))


def write_chunk(work: Path, k: int, images: np.ndarray) -> None:
    _atomic_write_bytes(chunk_path(work, k), lambda f: np.save(f, images, allow_pickle=False))


def assemble(output: Path, work: Path, plan: SamplingPlan) -> tuple[int, ...]:
    """Stream every chunk into `output` (arr_0 images, arr_1 labels); returns arr_0's shape."""
    from tatitok_fast.evaluation.npz import write_npz_stream

    first = np.load(chunk_path(work, 0), mmap_mode="r")
    shape = (plan.num_samples, *first.shape[1:])
    chunks = (np.load(chunk_path(work, k), mmap_mode="r") for k in range(plan.num_chunks))
    labels = (plan.chunk_labels(k) for k in range(plan.num_chunks))
    write_npz_stream(output, {"arr_0": (shape, np.uint8, chunks), "arr_1": ((plan.num_samples,), np.int64, labels)})
    return shape


@dataclass
class Rank:
    """This process's place in the run (rank, world size, a barrier over all ranks)."""
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None


def run_sampling(pipe: Callable[..., torch.Tensor], plan: SamplingPlan, output: str | os.PathLike, *,
                 manifest: dict, settings: dict, device: torch.device | str = "cpu", rank: Rank | None = None,
                 progress: bool = False, remove_chunks: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make (or finish) the samples of `plan` into `output` (see the module doc). `manifest`:
    what identifies the run beyond the plan (models, settings, device kind, image size).
    Returns {"made": chunks made by this rank, "skipped": chunks already there, "output",
    "shape" (rank 0)}."""
    import time

    from tqdm import tqdm

    rank = rank or Rank()
    output = Path(output)
    work = work_dir_for(output)
    full_manifest = {"plan": asdict(plan), **manifest}
    if (work / MANIFEST).exists():  # every rank reads it: a mismatch stops them all alike
        check_manifest(work, full_manifest)
    elif rank.rank == 0:
        prepare_work_dir(work, full_manifest)
    rank.barrier()  # the manifest exists before anyone reads it
    check_manifest(work, full_manifest)
    done = finished_chunks(work, plan)
    rank.barrier()  # everyone listed the chunks before anyone writes one
    todo = [k for k in range(plan.num_chunks) if k not in done]
    mine = todo[rank.rank::rank.world_size]
    if rank.rank == 0:
        log(f"sample-imagenet: {plan.num_samples} samples in {plan.num_chunks} chunks of {plan.batch}; "
            f"{len(done)} done, {len(todo)} to make on {rank.world_size} rank(s); work folder {work}")
    n_mine = sum(plan.chunk_range(k)[1] - plan.chunk_range(k)[0] for k in mine)
    bar = tqdm(total=n_mine, unit="img", desc=f"sample rank 0/{rank.world_size}",
               disable=not progress or rank.rank != 0, smoothing=0.1)
    t0 = time.perf_counter()
    for k in mine:
        images = sample_chunk(pipe, plan, k, settings, device)
        write_chunk(work, k, images)
        bar.update(len(images))
    bar.close()
    seconds = time.perf_counter() - t0
    rank.barrier()  # every chunk is written
    out: dict[str, Any] = {"made": mine, "skipped": sorted(done), "output": str(output), "seconds": seconds,
                           "images_per_second": n_mine / seconds if n_mine and seconds > 0 else None}
    if rank.rank == 0:
        finished_chunks(work, plan)  # every chunk whole before the npz is built
        out["shape"] = assemble(output, work, plan)
        log(f"wrote {output}: arr_0 {out['shape']} uint8, arr_1 labels"
            + (f"; {n_mine / seconds:.1f} images/s on rank 0" if n_mine and seconds > 0 else ""))
        if remove_chunks:
            shutil.rmtree(work)
        else:
            log(f"chunks kept in {work} (delete it to free the space)")
    return out
