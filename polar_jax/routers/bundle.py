"""Sparsity bundle: router parameters + SparsityConfig + the signature of the model they were made for.

On disk, a folder with `sparsity.json` (format marker, config, model signature) and `routers.safetensors`
(tensors `attn.{layer}.w|b`, `mlp.{layer}.a|b`, and with hidden-layer attention routers (config
`attn_hidden` h > 0) also `attn.{layer}.w1|b1`; never pickle). Loading checks the model signature when a
model is given and refuses a bundle trained for another model.

Format versions: 1 = linear attention routers (`attn.{layer}.w` [d, U]); 2 = hidden-layer attention
routers (`attn.{layer}.w1` [d, h], `b1` [h], `w` [h, U]); 3 = several attention-router sets, each trained
at one density (config `attn_sets`, sorted by training density, and `attn_set_rule`; set i's tensors are
`attn_set{i}.{layer}.w|b[|w1|b1]`, every set of the same shapes; the MLP routers are shared). A
single-set bundle is still written as version 1 (linear) or 2 (hidden layer), so older polar-jax keeps
reading it; a newer version is refused by those readers with a clear message instead of being misread.

Which set serves a density is the config's `attn_set_rule` (`config.ATTN_SET_RULE`, "nearest_k": the set
whose training label count k is nearest the count served). `SparsityBundle.for_density(rho)` returns that
set as a single-set bundle; the sparsifier, the decode selector and calibration go through it.
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
from polar_jax.routers.config import (ATTN_SET_RULE, AttnRouterSet, SparsityConfig, check_density,
                                      check_train_densities, nearest_attn_set)
from polar_jax.routers.logits import attn_logits

FORMAT = "polar-jax-sparsity"
VERSION = 3  # the newest format this code reads and writes (see the module docstring)
LINEAR_VERSION = 1
HIDDEN_VERSION = 2
SETS_VERSION = 3
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
        if self.config.attn_sets:
            raise InputError(f"this bundle holds {len(self.config.attn_sets)} attention-router sets (training "
                             f"densities {list(self.config.attn_train_densities)}): pick one with "
                             "bundle.for_density(rho) or bundle.attention_set(i)")
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

    @property
    def num_attn_sets(self) -> int:
        return len(self.config.attn_sets) or 1

    def attention_set(self, index: int) -> "SparsityBundle":
        """Attention-router set `index` as a single-set bundle (the MLP routers and tables shared); a
        single-set bundle is its own set 0."""
        if not self.config.attn_sets:
            self.config.for_set(index)  # refuses index != 0
            return self
        if not 0 <= index < len(self.config.attn_sets):
            raise InputError(f"attention-router set {index} does not exist (the bundle has {self.num_attn_sets})")
        prefix = f"{set_prefix(index)}."
        params = {k: v for k, v in self.params.items() if not k.startswith(ATTN_SET_PREFIX)}
        params.update({"attn." + k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)})
        return SparsityBundle(self.config.for_set(index), params, self.signature)

    def for_density(self, rho: float | None = None) -> "SparsityBundle":
        """The attention-router set that serves density rho (default: the bundle's attn_density) under the
        bundle's `attn_set_rule`, as a single-set bundle; a single-set bundle returns itself."""
        return self.attention_set(self.config.attn_set_index(rho))

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
        version = format_version(self.config)
        meta = {"format": FORMAT, "version": version, "config": self.config.to_dict(), "signature": self.signature}
        with atomic_folder(path, BUNDLE_OUTPUT, inputs, overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        return Path(path)


ATTN_SET_PREFIX = "attn_set"


def set_prefix(index: int) -> str:
    """Tensor-name prefix of attention-router set `index` in a multi-set bundle."""
    return f"{ATTN_SET_PREFIX}{index}"


def format_version(config: SparsityConfig) -> int:
    """The format version a bundle with this config is written as (the oldest that can hold it)."""
    if config.attn_sets:
        return SETS_VERSION
    return HIDDEN_VERSION if config.attn_hidden else LINEAR_VERSION


def merge_attention_sets(bundles: Sequence[SparsityBundle], attn_density: float | None = None) -> SparsityBundle:
    """One multi-set bundle from single-set bundles of one model (each trained at its own density, same
    router shapes; the MLP routers, tables and dense layers of the first are kept). `attn_density` is the
    merged bundle's default density (default: the first bundle's)."""
    if len(bundles) < 2:
        raise InputError("merging needs at least two bundles")
    first = bundles[0]
    for b in bundles:
        if b.config.attn_sets:
            raise InputError("merge single-set bundles (one of them already holds several attention-router sets)")
        check_signature(first.signature, b.signature, "sparsity bundle (merged with the first)")
        for name in ("num_layers", "attn_units", "unit", "attn_hidden", "dense_layers"):
            if getattr(b.config, name) != getattr(first.config, name):
                raise InputError(f"cannot merge bundles whose {name} differ ({getattr(first.config, name)} vs "
                                 f"{getattr(b.config, name)})")
    dens = check_train_densities([b.config.attn_train_density for b in bundles], first.config.attn_units)
    order = sorted(range(len(bundles)), key=lambda i: bundles[i].config.attn_train_density)
    return with_attention_sets(first, [bundles[i] for i in order], attn_density, dens)


def with_attention_sets(base: SparsityBundle, sets: Sequence[SparsityBundle], attn_density: float | None = None,
                        dens: Sequence[float] | None = None) -> SparsityBundle:
    """`base`'s MLP routers and settings with the attention routers of `sets` (single-set bundles, sorted by
    training density) as its attention-router sets."""
    dens = [s.config.attn_train_density for s in sets] if dens is None else list(dens)
    params = {k: v for k, v in base.params.items() if not k.startswith("attn.")}
    attn_sets = []
    for i, s in enumerate(sets):
        params.update({f"{set_prefix(i)}.{k[len('attn.'):]}": v for k, v in s.params.items() if k.startswith("attn.")})
        attn_sets.append(AttnRouterSet(s.config.attn_train_density, s.config.attn_importance, s.config.attn_thresholds))
    rho = check_density(base.config.attn_density if attn_density is None else attn_density)
    served = dens[nearest_attn_set(dens, rho, base.config.attn_units)]
    cfg = dataclasses.replace(base.config, attn_importance=None, attn_thresholds=None, attn_density=rho,
                              attn_layer_densities=None, attn_sets=tuple(attn_sets), attn_set_rule=ATTN_SET_RULE,
                              attn_train_density=served)
    bundle = SparsityBundle(cfg, params, base.signature)
    _check_shapes(bundle)
    return bundle


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
    if cfg.attn_sets and meta.get("version") != SETS_VERSION:
        raise CheckpointError(f"{meta_path}: several attention-router sets need format version {SETS_VERSION}, the "
                              f"file says {meta.get('version')!r}")
    if cfg.attn_hidden and not cfg.attn_sets and meta.get("version") != HIDDEN_VERSION:
        raise CheckpointError(f"{meta_path}: hidden-layer attention routers (attn_hidden {cfg.attn_hidden}) need format "
                              f"version {HIDDEN_VERSION}, the file says {meta.get('version')!r}")
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
    prefixes = [set_prefix(j) for j in range(len(c.attn_sets))] if c.attn_sets else ["attn"]
    allowed = {f"{p}.{i}.{n}" for p in prefixes for i in range(c.num_layers) if i not in c.dense_layers for n in want}
    stray = sorted(k for k in b.params if k.startswith(("attn.", ATTN_SET_PREFIX)) and k not in allowed)
    for i in range(c.num_layers):
        if i in c.dense_layers:
            continue
        for p in prefixes:
            which = "" if p == "attn" else f" in set {p[len(ATTN_SET_PREFIX):]}"
            for name, shape in want.items():
                key = f"{p}.{i}.{name}"
                if key not in b.params:
                    raise CheckpointError(f"sparsity bundle: attention router of layer {i}{which} is missing {key} "
                                          f"(a {kind} router needs {', '.join(want)})")
                got = b.params[key].shape
                if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
                    lead = "the attention-router sets disagree in shapes: " if p != prefixes[0] else ""
                    raise CheckpointError(f"sparsity bundle: {lead}attention router of layer {i}{which} is mis-shaped: {key} "
                                          f"is {list(got)}, a {kind} router needs "
                                          f"{[s if s is not None else 'any' for s in shape]}")
                if p != prefixes[0] and got != b.params[f"{prefixes[0]}.{i}.{name}"].shape:
                    raise CheckpointError(f"sparsity bundle: the attention-router sets disagree in shapes: {key} is "
                                          f"{list(got)}, {prefixes[0]}.{i}.{name} is "
                                          f"{list(b.params[f'{prefixes[0]}.{i}.{name}'].shape)}")
            if not c.attn_hidden and any(f"{p}.{i}.{n}" in b.params for n in ("w1", "b1")):
                raise CheckpointError(f"sparsity bundle: layer {i} has hidden-layer tensors ({p}.{i}.w1/b1) but the "
                                      "config says linear routers (attn_hidden 0)")
    if stray:
        raise CheckpointError(f"sparsity bundle: attention tensors {stray[:4]} belong to no attention-router set "
                              f"of the config ({len(c.attn_sets) or 1} set(s))")
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
