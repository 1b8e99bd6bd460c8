"""GGUF files (llama.cpp's single-file checkpoints) read one tensor at a time, through the `gguf` package.

`GGUFFile` memory-maps the file (`gguf.GGUFReader`), exposes its metadata as plain Python values and
dequantizes one tensor on request into float32 NumPy, shaped as Hugging Face holds it (matrices
`[out, in]`). Nothing is read for a tensor until it is asked for, so a converter's peak memory is about
one dequantized tensor plus what it writes.

Everything wrong with the file is a `CheckpointError` that names the file and the problem: not a GGUF
file, cut short (the header or a tensor's data runs past the end), or a tensor stored in a type this
reader does not dequantize (the error names the type and the tensor).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from polar_jax.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
# Tensor types dequantized here (all through gguf.quants, which follows ggml's block layouts). Each one is
# tested in tests/test_gguf_reader.py against an independent decoding of its blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def is_gguf_file(path: str | Path) -> bool:
    """True for an existing file that starts with the GGUF magic (or is named *.gguf)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _import_gguf():
    try:
        import gguf
    except ImportError:  # a core dependency; only a broken environment lacks it
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


class GGUFFile:
    """One GGUF file: metadata, tensor table, and per-tensor dequantization."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is not a file (expected a .gguf checkpoint)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(24)
        if len(head) < 4 or head[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (no GGUF magic at its start)")
        if len(head) < 24:
            raise CheckpointError(f"{self.path} is truncated: {size} bytes, shorter than a GGUF header")
        (version,) = struct.unpack("<I", head[4:8])
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        gguf = _import_gguf()
        self._gguf = gguf
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as e:
            # The reader maps every tensor's bytes while it parses: a file cut anywhere (header, tensor table or
            # data) fails here, so no tensor can later read past the end.
            raise CheckpointError(f"{self.path} is truncated or corrupt (cannot parse it as GGUF: {e})") from None
        self._reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue  # the reader's own bookkeeping (version, counts)
            try:
                self.metadata[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
                raise CheckpointError(f"{self.path} is corrupt: metadata field {key!r} cannot be read ({e})") from None
        self._tensors = {t.name: t for t in reader.tensors}

    # ---- tensor table ---------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._entry(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """HF-order shape (outermost first): ggml lists dimensions innermost first, so this is reversed."""
        return tuple(int(n) for n in reversed(self._entry(name).shape.tolist()))

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._tensors.values():
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out

    def check_types(self) -> None:
        """Raises CheckpointError naming every unsupported tensor type (and one tensor of each)."""
        bad: dict[str, str] = {}
        for t in self._tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                bad.setdefault(t.tensor_type.name, t.name)
        if bad:
            detail = ", ".join(f"{k} (e.g. {v!r})" for k, v in sorted(bad.items()))
            raise CheckpointError(
                f"{self.path}: tensor type {detail} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
            )

    def _entry(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    # ---- data -----------------------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, HF-order shape. A new array (the mapped bytes stay untouched)."""
        t = self._entry(name)
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has type {kind}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        out = np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if kind == "F32":
            out = out.copy()  # F32 comes back as a view of the read-only map
        shape = self.shape(name)
        if out.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {out.size} values, its shape says {shape}")
        return out.reshape(shape)

    def close(self) -> None:
        # GGUFReader keeps a read-only np.memmap; dropping the reference releases the mapping.
        self._reader = None
        self._tensors = {}
