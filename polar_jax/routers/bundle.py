"""Sparsity bundle: router parameters + SparsityConfig + the signature of the model they were made for.

On disk, a folder with `sparsity.json` (format marker, config, model signature) and `routers.safetensors`
(tensors `attn.{layer}.w|b`, `mlp.{layer}.a|b`, and with hidden-layer attention routers (config
`attn_hidden` h > 0) also `attn.{layer}.w1|b1`; never pickle). Loading checks the model signature when a
model is given and refuses a bundle trained for another model.

Format versions: 1 = linear attention routers (`attn.{layer}.w` [d, U]); 2 = hidden-layer attention
routers (`attn.{layer}.w1` [d, h], `b1` [h], `w` [h, U]). A linear bundle is still written as version 1,
so older polar-jax keeps reading it; a version-2 bundle is refused by those readers with a clear message
instead of being misread as a linear router.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polar_jax.checkpoint import model_signature, same_model
from polar_jax.errors import CheckpointError, InputError, PolarError
from polar_jax.files import read_json
from polar_jax.outputs import OutputKind, atomic_folder
from polar_jax.routers.config import SparsityConfig
from polar_jax.routers.logits import attn_logits

FORMAT = "polar-jax-sparsity"
VERSION = 2  # the newest format this code reads and writes (see the module docstring)
LINEAR_VERSION = 1
META_FILE = "sparsity.json"
WEIGHTS_FILE = "routers.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "default_sparsity"
BUNDLE_OUTPUT = OutputKind("sparsity bundle", META_FILE, FORMAT, owns=lambda name: name in (META_FILE, WEIGHTS_FILE))


class ModelMismatchError(PolarError):
    """A bundle or collected data set was made for a different model than the one given."""


@dataclasses.dataclass
class SparsityBundle:
    config: SparsityConfig
    params: dict[str, np.ndarray]  # float32 arrays; layer 0 (dense) has none
    signature: dict

    def attn(self, layer: int) -> tuple[np.ndarray, ...] | None:
        """The layer's attention-router arrays as `logits.attn_logits` takes them after x: (w, b) for a
        linear router, (w, b, w1, b1) with a hidden layer; None for a dense layer. Compute logits with
        `attn_logits` (never `x @ w + b` by hand: that is wrong for a hidden-layer router)."""
        key = f"attn.{layer}.w"
        if key not in self.params:
            return None
        out = (self.params[key], self.params[f"attn.{layer}.b"])
        if self.config.attn_hidden:
            out += (self.params[f"attn.{layer}.w1"], self.params[f"attn.{layer}.b1"])
        return out

    def attn_logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Attention-router logits [..., U] (float32 NumPy) of router inputs x [..., d] for one layer."""
        arrays = self.attn(layer)
        if arrays is None:
            raise InputError(f"layer {layer} is dense: it has no attention router")
        return np.asarray(attn_logits(np.asarray(x, np.float32), *arrays))

    def mlp(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        key = f"mlp.{layer}.a"
        return (self.params[key], self.params[f"mlp.{layer}.b"]) if key in self.params else None

    def check_model(self, model: Any) -> None:
        """Raises ModelMismatchError unless `model` is the one this bundle was made for."""
        check_signature(self.signature, model_signature(model), "sparsity bundle")

    def save(self, path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
        """Writes the bundle folder (polar_jax.outputs rules: `overwrite` replaces only a bundle folder, never
        one of `inputs`; written beside it and renamed, so an interrupted save leaves the old bundle). Saving
        over the folder the bundle was loaded from (calibrating in place) is safe: it is read fully first."""
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
        version = VERSION if self.config.attn_hidden else LINEAR_VERSION
        meta = {"format": FORMAT, "version": version, "config": self.config.to_dict(), "signature": self.signature}
        with atomic_folder(path, BUNDLE_OUTPUT, inputs, overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        return Path(path)


def check_signature(expected: dict, actual: dict, what: str) -> None:
    if not same_model(expected, actual):
        a, b = expected.get("arch", {}), actual.get("arch", {})
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        detail = f"architecture differs: {diff}" if diff else "same architecture but different weights"
        raise ModelMismatchError(f"this {what} was made for another model ({detail})")


def load_bundle(path: str | Path) -> SparsityBundle:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"sparsity bundle {path} does not exist (expected a folder with {META_FILE})")
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{path} is not a sparsity bundle: {p.name} is missing")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a polar-jax sparsity bundle")
    if not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > VERSION:
        raise CheckpointError(f"sparsity bundle version {meta.get('version')!r} is not one this polar-jax reads")
    try:
        params = {k: np.asarray(v, np.float32) for k, v in load_file(str(weights_path)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights_path}: {e}") from None
    try:
        cfg = SparsityConfig.from_dict(meta["config"])
        signature = dict(meta["signature"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is malformed ({type(e).__name__}: {e})") from None
    if cfg.attn_hidden and meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: hidden-layer attention routers (attn_hidden {cfg.attn_hidden}) need format "
                              f"version {VERSION}, the file says {meta.get('version')!r}")
    bundle = SparsityBundle(cfg, params, signature)
    _check_shapes(bundle)
    return bundle


def _attn_shapes(c: SparsityConfig, d: int | None) -> dict[str, tuple[int | None, ...]]:
    """Expected attention-router tensor shapes per name suffix (None: any size)."""
    u, h = c.attn_units, c.attn_hidden
    if not h:
        return {"w": (d, u), "b": (u,)}
    return {"w1": (d, h), "b1": (h,), "w": (h, u), "b": (u,)}


def _check_shapes(b: SparsityBundle) -> None:
    c = b.config
    d = b.signature.get("arch", {}).get("hidden_size")
    want = _attn_shapes(c, int(d) if isinstance(d, int) else None)
    kind = f"hidden-layer (attn_hidden {c.attn_hidden})" if c.attn_hidden else "linear"
    for i in range(c.num_layers):
        if i in c.dense_layers:
            continue
        for name, shape in want.items():
            key = f"attn.{i}.{name}"
            if key not in b.params:
                raise CheckpointError(f"sparsity bundle: attention router of layer {i} is missing {key} "
                                      f"(a {kind} router needs {', '.join(want)})")
            got = b.params[key].shape
            if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
                raise CheckpointError(f"sparsity bundle: attention router of layer {i} is mis-shaped: {key} is "
                                      f"{list(got)}, a {kind} router needs {[s if s is not None else 'any' for s in shape]}")
        if not c.attn_hidden and any(f"attn.{i}.{n}" in b.params for n in ("w1", "b1")):
            raise CheckpointError(f"sparsity bundle: layer {i} has hidden-layer tensors (attn.{i}.w1/b1) but the "
                                  "config says linear routers (attn_hidden 0)")
        if c.mlp_router:
            m = b.mlp(i)
            if m is None or m[0].shape[1] != c.mlp_rank or m[1].shape != (c.mlp_rank, c.ffn):
                raise CheckpointError(f"sparsity bundle: MLP router of layer {i} is missing or mis-shaped")


def load_sparsity(path: str | Path, model: Any = None) -> SparsityBundle:
    """Loads a sparsity bundle ("default" = the one trained for the embedded default model). With `model`,
    refuses (ModelMismatchError) a bundle made for another model."""
    bundle = load_bundle(DEFAULT_DIR if str(path) == "default" else path)
    if model is not None:
        bundle.check_model(model)
    return bundle
