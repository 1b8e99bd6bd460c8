"""Router training data: run the model on text and stream per-layer statistics to disk in chunks.

Layout of a collection folder:
- `collect.json`: format marker, model name + signature, token counts, fields and shapes, chunk list,
  `complete` (false until the last chunk is written; readers refuse incomplete data).
- `chunk_NNNNN.<field>.npy` (plain .npy, read with allow_pickle=False, memory-mapped):
  `router_input` [L, n, d] float16 (pre-attention norm output), `unit_norm` [L, n, U] float32 (per-head
  attention output L2 norm; per KV group for GQA), `mlp_active` [L, n, ceil(N/8)] uint8 (bit-packed
  ReLU > 0; ReLU models only), `tokens` [n] int32, `window` [n] int32 (global window id, for splits).
Memory stays bounded by one chunk whatever the token count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from polar_jax.checkpoint import model_signature
from polar_jax.errors import InputError
from polar_jax.files import read_json, read_text
from polar_jax.models.collect import forward_with_stats, group_norms
from polar_jax.outputs import OutputKind, atomic_folder
from polar_jax.routers.bundle import check_signature
from polar_jax.routers.config import attention_units
from polar_jax.validate import check, check_optional, check_positions

FORMAT = "polar-jax-router-data"
VERSION = 1
META_FILE = "collect.json"
_CHUNK_RE = re.compile(r"^chunk_\d{5}\.[a-z_]+\.npy$")
COLLECT_OUTPUT = OutputKind("router-data folder", META_FILE, FORMAT,
                            owns=lambda name: name == META_FILE or bool(_CHUNK_RE.match(name)))


def read_text_tokens(tokenizer: Any, paths: Sequence[str | Path], max_tokens: int | None = None) -> list[np.ndarray]:
    """Token ids of each text file (max_tokens split evenly across the files). Clear errors for missing or
    empty files."""
    if not paths:
        raise InputError("no text file given")
    if tokenizer is None:
        raise InputError("the checkpoint has no tokenizer files; text cannot be tokenized")
    check_optional("max_tokens", max_tokens)
    out = []
    for p in paths:
        p = Path(p)
        text = read_text(p)
        if not text.strip():
            raise InputError(f"text file {p} is empty")
        # Long files are tokenized in line blocks so a huge file never becomes one giant string op.
        cap = None if max_tokens is None else max(1, max_tokens // len(paths))
        ids: list[int] = []
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 2000):
            ids.extend(tokenizer.encode("".join(lines[i : i + 2000])))
            if cap is not None and len(ids) >= cap:
                break
        out.append(np.asarray(ids[:cap] if cap is not None else ids, np.int32))
    return out


def make_collect_windows(streams: list[np.ndarray], seq_len: int) -> np.ndarray:
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    wins = [s[: (len(s) // seq_len) * seq_len].reshape(-1, seq_len) for s in streams]
    windows = np.concatenate(wins) if wins else np.zeros((0, seq_len), np.int32)
    if len(windows) == 0:
        total = sum(len(s) for s in streams)
        raise InputError(f"text has {total} tokens, fewer than one window of {seq_len}")
    return windows


def collect(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str | Path],
    out_dir: str | Path,
    seq_len: int = 256,
    batch_size: int = 16,
    max_tokens: int | None = None,
    chunk_tokens: int = 32768,
    overwrite: bool = False,
    progress: bool = True,
    model_name: str = "",
    unit: str | None = None,
) -> Path:
    """Runs the model over the text(s) in non-overlapping windows and writes the router data to `out_dir`.
    `unit`: what the attention labels score (see `attention_units`; "head" = query heads of a GQA model)."""
    cfg = model.config
    check("seq_len", seq_len)
    check("batch_size", batch_size)
    check("chunk_tokens", chunk_tokens)
    check_positions(cfg, seq_len, f"seq_len {seq_len}")
    streams = read_text_tokens(tokenizer, texts, max_tokens)
    windows = make_collect_windows(streams, seq_len)
    units, kind = attention_units(cfg, unit)
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "complete": False, "model": model_name,
        "signature": model_signature(model), "seq_len": seq_len, "windows": int(len(windows)),
        "tokens": int(windows.size), "texts": [{"path": str(p), "tokens": int(len(s))} for p, s in zip(texts, streams)],
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "units": units, "unit": kind,
        "ffn": cfg.intermediate_size, "mlp_active": bool(cfg.relu_mlp), "chunks": [],
    }
    # the model's folder (when model_name is a path) and the texts are inputs the output may not replace
    inputs = [*texts, *([model_name] if model_name and model_name != "default" else [])]
    with atomic_folder(out_dir, COLLECT_OUTPUT, inputs=inputs, overwrite=overwrite) as out:
        _write_chunks(model, windows, out, meta, batch_size, chunk_tokens, kind, progress)
    return Path(out_dir)


def _write_chunks(model: Any, windows: np.ndarray, out: Path, meta: dict[str, Any], batch_size: int,
                  chunk_tokens: int, kind: str, progress: bool) -> None:
    cfg = model.config
    buf: dict[str, list[np.ndarray]] = {}
    n_buf = 0

    def flush() -> None:
        nonlocal buf, n_buf
        if n_buf == 0:
            return
        name = f"chunk_{len(meta['chunks']):05d}"
        for field, parts in buf.items():
            axis = 0 if field in ("tokens", "window") else 1
            np.save(out / f"{name}.{field}.npy", np.concatenate(parts, axis=axis), allow_pickle=False)
        meta["chunks"].append({"name": name, "tokens": n_buf})
        buf, n_buf = {}, 0

    starts = range(0, len(windows), batch_size)
    for s in tqdm(starts, desc="collect", unit="batch", disable=not progress):
        batch = windows[s : s + batch_size]
        _, stats = forward_with_stats(model, batch)
        stats = jax.device_get(stats)
        b, t = batch.shape
        n = b * t
        norms = stats["head_norm"]
        if kind == "group":
            norms = np.asarray(group_norms(norms, cfg.num_kv_heads))
        fields = {
            "router_input": np.asarray(stats["router_input"], np.float16).reshape(cfg.num_layers, n, -1),
            "unit_norm": np.asarray(norms, np.float32).reshape(cfg.num_layers, n, -1),
            "tokens": batch.reshape(-1).astype(np.int32),
            "window": np.repeat(np.arange(s, s + b, dtype=np.int32), t),
        }
        if cfg.relu_mlp:
            act = np.asarray(stats["mlp_active"]).reshape(cfg.num_layers, n, -1)
            fields["mlp_active"] = np.packbits(act, axis=-1)
        for k, v in fields.items():
            buf.setdefault(k, []).append(v)
        n_buf += n
        if n_buf >= chunk_tokens:
            flush()
    flush()
    meta["complete"] = True
    (out / META_FILE).write_text(json.dumps(meta, indent=1))


class CollectedData:
    """Reader for a collection folder (memory-mapped, one layer at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise InputError(f"{self.path} is not a collection folder (no {META_FILE}); run `polar-jax collect`")
        self.meta = read_json(meta_path, InputError)
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{meta_path} is not a polar-jax router-data marker")
        if not self.meta.get("complete"):
            raise InputError(f"{self.path} is incomplete (collection was interrupted): collect again with --overwrite")

    @property
    def num_tokens(self) -> int:
        return int(self.meta["tokens"])

    def check_model(self, model: Any) -> None:
        check_signature(self.meta["signature"], model_signature(model), "collected data")

    def _load(self, chunk: str, field: str) -> np.ndarray:
        p = self.path / f"{chunk}.{field}.npy"
        if not p.is_file():
            raise InputError(f"{p} is missing: the collection folder is damaged")
        return np.load(p, mmap_mode="r", allow_pickle=False)

    def field(self, field: str, layer: int | None = None) -> np.ndarray:
        """One field over all chunks; per-layer fields need `layer`. mlp_active comes back unpacked (bool)."""
        if field == "mlp_active" and not self.meta.get("mlp_active"):
            raise InputError("this collection has no MLP activation masks (the model's MLP is not ReLU)")
        parts = []
        for c in self.meta["chunks"]:
            a = self._load(c["name"], field)
            parts.append(np.asarray(a if layer is None else a[layer]))
        out = np.concatenate(parts, axis=0)
        if field == "mlp_active":
            out = np.unpackbits(out, axis=-1, count=int(self.meta["ffn"])).astype(bool)
        elif field == "router_input":
            out = out.astype(np.float32)
        return out

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) token indices, split by whole windows (no leakage between neighbouring tokens)."""
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"validation fraction must be in (0, 1), got {val_fraction}")
        win = self.field("window")
        n_win = int(self.meta["windows"])
        rng = np.random.default_rng(seed)
        n_val = max(1, int(round(val_fraction * n_win)))
        if n_val >= n_win:
            raise InputError(f"only {n_win} windows collected: too few for a validation split; collect more text")
        val_windows = np.zeros(n_win, bool)
        val_windows[rng.permutation(n_win)[:n_val]] = True
        is_val = val_windows[win]
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
