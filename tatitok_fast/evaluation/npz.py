"""Sample batches as .npz files, streamed: the ADM evaluator's format (`arr_0`: uint8
N x H x W x 3) without holding all N images in memory (50 000 images at 256 px are 9.8 GB).

    write_npz_stream(path, {"arr_0": (shape, dtype, chunks), ...})   # chunks: arrays along axis 0
    with NpzArray(path, "arr_0") as a: a.shape; for batch in a.batches(64): ...

The writer makes what np.savez makes (stored, uncompressed .npy members, zip64), so
np.load reads it; the reader also reads np.savez_compressed files.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np


def write_npz_stream(path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype, Iterable]]) -> None:
    """Write an .npz from {name: (shape, dtype, chunks)}, each chunk an array of shape[1:] rows,
    atomically (a temporary file beside `path`, renamed when complete). Raises ValueError when
    the chunks do not add up to `shape` or have another row shape / dtype."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in arrays.items():
                dtype = np.dtype(dtype)
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": tuple(int(s) for s in shape)}
                rows = 0
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, header)
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk)
                        if chunk.dtype != dtype or chunk.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"{name}: chunk of {chunk.dtype} {chunk.shape}, expected {dtype} rows "
                                             f"of {tuple(shape[1:])}")
                        rows += chunk.shape[0]
                        if rows > shape[0]:
                            raise ValueError(f"{name}: more than the {shape[0]} rows declared")
                        f.write(chunk.tobytes())
                if rows != shape[0]:
                    raise ValueError(f"{name}: {rows} rows written, {shape[0]} declared")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class NpzArray:
    """One array of an .npz, read in batches along axis 0 without loading it whole."""

    def __init__(self, path: str | os.PathLike, name: str = "arr_0"):
        self.path, self.name = str(path), name
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{self.path}: not a readable .npz file ({exc})") from None
        if f"{name}.npy" not in self._zip.namelist():
            keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            self._zip.close()
            raise ValueError(f"{self.path}: no array {name!r} (it holds {keys})")
        self._f = self._zip.open(f"{name}.npy")
        try:
            version = np.lib.format.read_magic(self._f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version}")
            self.shape, fortran, self.dtype = read_header(self._f)
        except ValueError as exc:
            self.close()
            raise ValueError(f"{self.path}: {name} is not a .npy array ({exc})") from None
        if fortran or self.dtype.hasobject:
            self.close()
            raise ValueError(f"{self.path}: {name} is Fortran-ordered or holds objects; expected a C-ordered array")
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._next = 0

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Successive (<= batch_size, *shape[1:]) arrays; once per reader."""
        while self._next < len(self):
            n = min(batch_size, len(self) - self._next)
            data = self._f.read(n * self._row_bytes)
            if len(data) != n * self._row_bytes:
                raise ValueError(f"{self.path}: {self.name} ends after {self._next} of {len(self)} rows (truncated file)")
            self._next += n
            yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
        self._zip.close()

    def __enter__(self) -> "NpzArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def npz_keys(path: str | os.PathLike) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
