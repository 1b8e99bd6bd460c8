"""Minimal safetensors reading and streaming writing, without torch and without loading whole files.

Reading memory-maps each file and hands out NumPy views, so a converter touches one tensor at a time.
Writing takes the full list of names/shapes/dtypes first (the header comes first in the format) and then
streams each tensor's bytes as it is produced, so no second copy of the model is ever held.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from polar_jax.errors import CheckpointError

_ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _check_entry(path: Path, name: str, e: object, data_size: int) -> None:
    """One header entry: a known dtype, a shape of non-negative integers, and a byte range inside the data
    section whose length matches the shape (anything else: the file is incomplete or corrupt)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} {why} (file incomplete or corrupt)")

    if not isinstance(e, dict):
        raise bad("has a malformed header entry")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_TO_NP:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data offsets {offsets!r}")
    start, end = offsets
    if end - start != math.prod(shape) * _ST_TO_NP[dtype].itemsize or end > data_size:
        raise bad("is truncated or inconsistent with its header")


class SafetensorsFile:
    """One memory-mapped .safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing weights file {self.path}")
        self._fh = open(self.path, "rb")
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path} has a corrupt safetensors header (length {n})")
        try:
            header = json.loads(self._fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{self.path} has a corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} has a corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self._data_start = 8 + n
        for name, e in header.items():
            _check_entry(self.path, name, e, size - self._data_start)
        self._entries = header
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def data_order(self) -> list[str]:
        """Tensor names in the order their bytes are stored."""
        return sorted(self._entries, key=lambda name: self._entries[name]["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _ST_TO_NP[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the mapped file (no copy)."""
        e = self._entries[name]
        start, end = e["data_offsets"]
        dt = _ST_TO_NP[e["dtype"]]
        if end == start:
            return np.zeros(e["shape"], dt)
        buf = memoryview(self._mm)[self._data_start + start : self._data_start + end]
        return np.frombuffer(buf, dtype=dt).reshape(e["shape"])

    def close(self) -> None:
        # Views handed out keep the map alive; closing the file handle is enough.
        self._fh.close()


class WeightSource:
    """All tensors of a checkpoint folder: one file, or shards listed by a `*.safetensors.index.json`."""

    def __init__(self, folder: str | Path, stem: str = "model"):
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        index = folder / f"{stem}.safetensors.index.json"
        single = folder / f"{stem}.safetensors"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map)") from None
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"missing shard {shard} listed in {index.name}")
                self._files[shard] = SafetensorsFile(folder / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard].keys():
                    raise CheckpointError(f"{index.name} says {name!r} is in {shard}, but it is not")
                self._where[name] = shard
        elif single.is_file():
            self._files[single.name] = SafetensorsFile(single)
            self._where = {k: single.name for k in self._files[single.name].keys()}
        else:
            others = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(others) == 1:
                f = SafetensorsFile(folder / others[0])
                self._files[others[0]] = f
                self._where = {k: others[0] for k in f.keys()}
            else:
                torch_files = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
                hint = f" (found PyTorch pickles {torch_files}; polar-jax reads safetensors only)" if torch_files else ""
                raise CheckpointError(f"no {stem}.safetensors or index in {folder}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        return self._files[self._where[name]].get(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def write_streaming(
    path: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Writes a safetensors file whose tensors are produced one at a time by `produce(name)`.

    `specs` fixes every name, shape and dtype up front; each produced array must match its spec.
    """
    specs = list(specs)
    header: dict[str, object] = {}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {arr.dtype}{arr.shape}, declared {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(name)


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    f = SafetensorsFile(path)
    for k in f.keys():
        yield k, f.get(k)
