"""Streaming webdataset input, deterministic and exactly resumable.

Each data-loader worker reads a stream of tar shards, groups files into samples
(`__key__` + one entry per extension, raw bytes), shuffles them through a buffer, decodes them
with the recipe's `decode_sample` and yields collated batches. Every random choice (shard
order, resampling, shuffle buffer, per-sample augmentation) comes from generators seeded by
(training.seed, stream id, epoch / sample index), so the stream is a pure function of the
config and of the position in it.

Position and resume: every batch carries its worker's raw stream position (and corrupt-data
counters); the checkpoint stores each worker's last one (rank-R.pt). A resumed run rebuilds
the streams and skips raw samples up to those positions before decoding anything (no image
decode, no model), so it continues with exactly the batches it would have seen. Loader worker
ids are rotated by the number of batches consumed, so the round-robin over workers resumes at
the right one. A resume on another number of ranks re-splits the stream (reshard_position).

Before a run builds anything, expand_shards checks that every local shard exists and
check_first_samples decodes the first samples with the recipe's decode_sample (a DataError
naming what does not fit); remote shards are opened only when read.

Splits:
- shard (default, scales): shard lists are assigned per (rank, worker); with resampling each
  stream draws shards with replacement from its own seeded generator.
- sample: every rank reads the same stream and keeps every world_size-th sample, so the
  global batch is the same at any world size (reads world_size times the bytes: for tests and
  small data sets).

Corrupt data never kills a run: an unreadable shard or sample is skipped, counted
(data/bad_samples, data/bad_shards in the metrics) and reported; a shard that yields nothing
but errors is reported by name; the run stops with an error when more than
data.max_bad_fraction of what was read is bad, or when no shard yields a sample.
"""
from __future__ import annotations

import glob
import io
import itertools
import os
import random
import tarfile
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class DataError(RuntimeError):
    """The data cannot feed the run (no readable shard, too many corrupt samples)."""


REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE)


def expand_shards(patterns: list[str], key: str = "data.shards") -> list[str]:
    """Brace patterns, local globs and '::'-joined lists -> shard URLs (webdataset's expansion,
    then glob for local paths with * ? [). Local files must all exist (DataError naming the missing ones); remote URLs (pipe:, http(s)://,
    s3://, gs://) are opened only when read, as webdataset does."""
    import webdataset as wds

    urls = []
    for p in patterns:
        for part in p.split("::"):
            if not part:
                continue
            for url in wds.shardlists.expand_urls(part):
                if not is_remote(url) and any(c in url for c in "*?["):  # a local glob
                    found = sorted(glob.glob(url.removeprefix("file:")))
                    if not found:
                        raise DataError(f"{key}: {url!r} matches no file")
                    urls += found
                else:
                    urls.append(url)
    if not urls:
        raise DataError(f"{key}: {patterns} expand to no shard")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u.removeprefix("file:"))]
    if missing:
        raise DataError(f"{key}: {len(missing)} of {len(urls)} shard files do not exist: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (from {patterns})")
    return urls


def check_first_samples(urls: list[str], decode: Callable[[dict, np.random.Generator], dict], recipe: str,
                        max_samples: int = 8, max_shards: int = 3) -> None:
    """Read the first samples of the first local shards and decode them as the recipe will:
    a DataError, before any model is built, when none of them fits (wrong kind of shard,
    tokens of another tokenizer or codebook, missing fields). Corrupt samples among good
    ones pass here; the stream skips and counts them. Remote shards are not opened here."""
    local = [u for u in urls if not is_remote(u)][:max_shards]
    errors, tried = [], 0
    for url in local:
        try:
            for raw in read_shard(url):
                tried += 1
                try:
                    decode(raw, np.random.default_rng(0))
                    return
                except Exception as exc:  # what the recipe rejects, named in the error below
                    errors.append(f"{raw.get('__key__')}: {type(exc).__name__}: {exc}")
                if tried >= max_samples:
                    break
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            errors.append(f"{url} does not read as a tar shard ({type(exc).__name__}: {exc})")
        if tried >= max_samples:
            break
    if local:
        first = errors[0] if errors else "no sample in it"
        raise DataError(f"data.shards: the first {tried} samples of {local[0]}"
                        f"{f' (and {len(local) - 1} more shards)' if len(local) > 1 else ''} do not fit "
                        f"recipe {recipe!r}: {first}")


def _open(url: str):
    if is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one tar shard: {"__key__", "__url__", ext: bytes, ...}, grouped as webdataset
    groups them (the key is the file name up to its first dot). tarfile errors propagate."""
    with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        current: dict | None = None
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue
            prefix, dot, ext = info.name.partition(".")
            if not dot:
                continue
            data = tar.extractfile(info).read()
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            current[ext.lower()] = data
        if current is not None:
            yield current


class ShardStream(IterableDataset):
    """Batches of decoded samples for one rank (see the module doc)."""

    def __init__(self, urls: list[str], decode: Callable[[dict, np.random.Generator], dict],
                 collate: Callable[[list[dict]], dict], batch_size: int, *, seed: int, rank: int, world_size: int,
                 num_workers: int, resampled: bool, split: str, shuffle_buffer: int, shuffle_initial: int,
                 start_batch: int = 0, resume: dict | None = None, max_bad_fraction: float = 0.5,
                 salt: str = "", start_pos: int = -1):
        self.urls, self.decode, self.collate, self.batch_size = urls, decode, collate, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.resampled, self.split = resampled, split
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, min(shuffle_initial, shuffle_buffer)
        self.start_batch, self.max_bad_fraction = start_batch, max_bad_fraction
        self.resume = {int(k): v for k, v in (resume or {}).items()}  # worker -> its last stats (pos, counters)
        # after a world-size change (reshard_position): shard streams get a new salt, and
        # split=sample streams continue after start_pos, the last global position read
        self.salt, self.start_pos = salt, start_pos
        if split == "shard" and not resampled and len(urls) < world_size * self.num_workers:
            raise DataError(f"data.shards: {len(urls)} shards cannot be split over {world_size} ranks x "
                            f"{self.num_workers} workers without resampling; use data.resampled = true, "
                            "data.split = 'sample', or fewer workers")

    # ---- which stream this worker is ----
    def _worker(self) -> int:
        """Effective worker id: loader worker ids rotated by the start position, so that the
        loader's round-robin (which starts at worker 0) resumes at the right stream."""
        info = get_worker_info()
        return 0 if info is None else (info.id + self.start_batch) % info.num_workers

    def _shards(self, part: int, parts: int) -> Iterator[str]:
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}/{part}/{parts}/{epoch}{self.salt}")
            if self.resampled:
                for _ in range(max(1, len(self.urls))):
                    yield rng.choice(self.urls)
            else:
                order = list(self.urls)
                random.Random(f"{self.seed}/order/{epoch}{self.salt}").shuffle(order)
                yield from order[part::parts]
            epoch += 1

    def _raw_samples(self, part: int, parts: int, stats: dict) -> Iterator[dict]:
        shards_without_sample = 0
        for url in self._shards(part, parts):
            got = errors = 0
            try:
                for sample in read_shard(url):
                    got += 1
                    yield sample
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                errors += 1
                stats["bad_shards"] += 1
                warnings.warn(f"data: shard {url} is unreadable after {got} samples ({type(exc).__name__}: {exc}); "
                              "skipping the rest of it", RuntimeWarning, stacklevel=2)
            if got == 0:
                shards_without_sample += 1
                if not errors:
                    warnings.warn(f"data: shard {url} holds no sample", RuntimeWarning, stacklevel=2)
                if shards_without_sample >= max(8, 2 * len(self.urls)):
                    raise DataError(f"data.shards: {shards_without_sample} shards in a row gave no sample "
                                    f"(last: {url})")
            else:
                shards_without_sample = 0

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """A shuffle buffer as webdataset's: the first sample is drawn after shuffle_initial
        reads; then each draw is followed by two reads instead of one until the buffer holds
        shuffle_buffer, so it grows while it yields. Draws come from `rng` only: the order is
        a pure function of the seed (what exact resume relies on)."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        samples = iter(samples)
        buf: list[dict] = []

        def draw() -> dict:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            return buf.pop()

        for s in samples:
            buf.append(s)
            if len(buf) < self.shuffle_initial:
                continue
            yield draw()
            if len(buf) + 1 < self.shuffle_buffer:  # growing: one extra read (the loop's makes it full)
                buf.extend(itertools.islice(samples, 1))
        while buf:
            yield draw()

    def __iter__(self) -> Iterator[dict]:
        worker = self._worker()
        n = self.num_workers if get_worker_info() is not None else 1
        if self.split == "sample":  # one global stream, every (rank, worker) keeps its residue class
            part, parts, keep_every, keep_at = 0, 1, self.world_size * n, self.rank * n + worker
        else:  # each (rank, worker) reads its own shards
            part, parts, keep_every, keep_at = self.rank * n + worker, self.world_size * n, 1, 0
        resume = self.resume.get(worker, {})
        stats = {k: resume.get(k, 0) for k in ("bad_samples", "bad_shards", "samples")}
        last = resume.get("pos", self.start_pos)  # raw stream position of the last sample already handed out
        stream = self._shuffled(self._raw_samples(part, parts, stats),
                                random.Random(f"{self.seed}/shuffle/{part}{self.salt}"))
        batch: list[dict] = []
        for pos, raw in enumerate(stream):
            if pos % keep_every != keep_at or pos <= last:
                continue
            # per-sample seed from the position in the (global, for split=sample) stream: the same
            # sample at the same position gets the same draws, on any rank count, after resume
            seed = hash((self.seed, part, parts, pos) + ((self.salt,) if self.salt else ())) & ((1 << 62) - 1)
            try:
                sample = self.decode(raw, np.random.default_rng(seed))
            except Exception as exc:  # corrupt sample: skip, count, never kill the run
                stats["bad_samples"] += 1
                if stats["bad_samples"] <= 5:
                    warnings.warn(f"data: skipping sample {raw.get('__key__')} of {raw.get('__url__')}: "
                                  f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                read = stats["samples"] + stats["bad_samples"]
                if read >= 20 and stats["bad_samples"] > self.max_bad_fraction * read:
                    raise DataError(f"data: {stats['bad_samples']} of {read} samples are corrupt "
                                    f"(more than data.max_bad_fraction = {self.max_bad_fraction}); last error: "
                                    f"{exc}") from exc
                continue
            sample["__seed__"] = seed
            stats["samples"] += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                out["__stats__"] = dict(stats, worker=worker, pos=pos)
                yield out
                batch = []


def _identity(batch):
    return batch


COUNTERS = ("bad_samples", "bad_shards", "samples")


class DataPosition:
    """Batches consumed, and each worker's latest report (raw stream position of its last
    sample, corrupt-data counters): what a checkpoint stores to resume the stream exactly.
    `base`: counters carried over a world-size change (rank 0 only), `salt` / `start_pos`:
    how the streams were re-split then (see reshard_position). Plain ints and strings, so the
    checkpoint's rank file loads with weights_only=True."""

    def __init__(self, consumed: int = 0, workers: dict | None = None, base: dict | None = None,
                 salt: str = "", start_pos: int = -1):
        self.consumed = consumed
        self.workers: dict[int, dict] = {int(k): v for k, v in (workers or {}).items()}
        self.base, self.salt, self.start_pos = dict(base or {}), salt, start_pos

    def update(self, batch: dict) -> None:
        st = batch.pop("__stats__", None)
        if st is not None:
            self.workers[st["worker"]] = {k: v for k, v in st.items() if k != "worker"}
        self.consumed += 1

    def totals(self) -> dict[str, int]:
        return {k: self.base.get(k, 0) + sum(s.get(k, 0) for s in self.workers.values()) for k in COUNTERS}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "workers": dict(self.workers), "base": dict(self.base),
                "salt": self.salt, "start_pos": self.start_pos}


def reshard_position(saved: list[dict], rank: int, split: str) -> dict:
    """The position of `rank` when a run saved on len(saved) ranks resumes on another number
    of ranks. Counters (samples, bad samples, bad shards) are summed into rank 0's `base`, so
    the global counts go on. split=sample: every rank read residues of one global stream, so
    the new ranks continue that stream after the last position any old rank read (exact when
    no sample was corrupt). split=shard: the per-rank shard streams cannot be mapped onto the
    new ranks; they restart with a salt naming the step, so they do not replay the start of
    the run (a partly read pass is not finished; with resampling nothing changes in kind)."""
    saved = [p or {} for p in saved]
    workers = [w for p in saved for w in p.get("workers", {}).values()]
    totals = {k: sum(p.get("base", {}).get(k, 0) for p in saved) + sum(w.get(k, 0) for w in workers)
              for k in COUNTERS}
    consumed = max((p.get("consumed", 0) for p in saved), default=0)
    last = max([w.get("pos", -1) for w in workers] + [p.get("start_pos", -1) for p in saved])
    salt = saved[0].get("salt", "")
    if split != "sample":
        salt += f"/resplit-{len(saved)}-at-{consumed}"
    return {"consumed": consumed, "workers": {}, "base": totals if rank == 0 else {}, "salt": salt,
            "start_pos": last if split == "sample" else -1}


def build_loader(cfg, recipe, rank: int, world_size: int, batch_size: int, position: dict | None = None):
    """(DataLoader over ShardStream, DataPosition). cfg: the whole JobConfig; position: a
    DataPosition.state_dict() from a checkpoint to continue from."""
    d = cfg.data
    position = position or {}
    start_batch = position.get("consumed", 0)
    stream = ShardStream(expand_shards(d.shards), recipe.decode_sample, recipe.collate, batch_size,
                         seed=cfg.training.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                         resampled=d.resampled, split=d.split, shuffle_buffer=d.shuffle_buffer,
                         shuffle_initial=d.shuffle_initial, start_batch=start_batch,
                         resume=position.get("workers"), max_bad_fraction=d.max_bad_fraction,
                         salt=position.get("salt", ""), start_pos=position.get("start_pos", -1))
    loader = DataLoader(stream, batch_size=None, num_workers=d.num_workers, collate_fn=_identity,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if d.num_workers > 0 else None,
                        # its own generator: starting an iterator must not draw from the global RNG
                        # (a resumed run restores that RNG and must continue it exactly)
                        generator=torch.Generator().manual_seed(cfg.training.seed))
    return loader, DataPosition(start_batch, position.get("workers"), position.get("base"),
                                position.get("salt", ""), position.get("start_pos", -1))


def decode_image(data: bytes):
    """Image bytes (jpg/png/webp) -> RGB PIL image; ValueError when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image: {exc}") from None
    return img.convert("RGB")
