"""Sparsity bundle: router parameters + SparsityConfig + the signature of the model they were made for.

On disk, a folder with `sparsity.json` (format marker, config, model signature) and `routers.safetensors`
(tensors `attn.{layer}.w|b`, `mlp.{layer}.a|b`; never pickle). Loading checks the model signature when a
model is given and refuses a bundle trained for another model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polar_jax.checkpoint import model_signature, same_model
from polar_jax.errors import CheckpointError, PolarError
from polar_jax.files import read_json
from polar_jax.outputs import OutputKind, atomic_folder
from polar_jax.routers.config import SparsityConfig

FORMAT = "polar-jax-sparsity"
VERSION = 1
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

    def attn(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        key = f"attn.{layer}.w"
        return (self.params[key], self.params[f"attn.{layer}.b"]) if key in self.params else None

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
        meta = {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(), "signature": self.signature}
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
    bundle = SparsityBundle(cfg, params, signature)
    _check_shapes(bundle)
    return bundle


def _check_shapes(b: SparsityBundle) -> None:
    c = b.config
    for i in range(c.num_layers):
        if i in c.dense_layers:
            continue
        at = b.attn(i)
        if at is None or at[0].shape[1:] != (c.attn_units,) or at[1].shape != (c.attn_units,):
            raise CheckpointError(f"sparsity bundle: attention router of layer {i} is missing or mis-shaped")
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
