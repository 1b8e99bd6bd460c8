"""Sparsity as the model code consumes it: masked-evaluation sparsifiers and real decode selectors.

Both are JAX pytrees (router weights are leaves; densities, k tables and flags are static), so they pass
through `jax.jit` as ordinary arguments. Layer 0 (and any dense layer) returns None.

Decode semantics in masked evaluation: a position's units are chosen from that position's own router
input; the MLP neurons are the top-k of router scores summed over the batch rows at that position (the
decode batch), mask shape [1, T, N]. Positions before `start` stay dense (a densely prefilled prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from polar_jax.config import ModelConfig
from polar_jax.errors import InputError
from polar_jax.models.base import head_output_norms
from polar_jax.models.collect import group_norms
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.config import SparsityConfig, check_density, units_kept
from polar_jax.routers.modules import attn_logits, mlp_logits
from polar_jax.routers.topk import batch_union_scores, keep_prefix_dense, topk_index, topk_mask

_ROUTER_DATA = ["attn_w", "attn_b", "mlp_a", "mlp_b"]
_ROUTER_META = ["attn_k", "units", "plan", "mlp_recall", "use_attn", "use_mlp", "start"]


@dataclasses.dataclass(frozen=True)
class _RouterScores:
    """Router weights and k tables (fields shared by the sparsifier and the selector), logits per layer."""

    attn_w: tuple
    attn_b: tuple
    mlp_a: tuple
    mlp_b: tuple
    attn_k: tuple[int, ...]
    units: int
    plan: SparsityConfig | None
    mlp_recall: float | None
    use_attn: bool = True
    use_mlp: bool = True
    start: int = 0  # masked eval: positions before it stay dense; decode ignores it (prefill is dense)

    def _attn_k(self, layer: int) -> int | None:
        if not self.use_attn or self.attn_w[layer] is None or self.attn_k[layer] >= self.units:
            return None
        return self.attn_k[layer]

    def _mlp_k(self, layer: int, batch: int) -> int | None:
        if not self.use_mlp or self.plan is None or self.mlp_a[layer] is None:
            return None
        return self.plan.mlp_k(self.mlp_recall, batch)[layer]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_ROUTER_DATA, meta_fields=_ROUTER_META)
@dataclasses.dataclass(frozen=True)
class RouterSparsifier(_RouterScores):
    def heads_mask(self, layer: int, router_input: jax.Array, head_out: jax.Array) -> jax.Array | None:
        k = self._attn_k(layer)
        if k is None:
            return None
        mask = topk_mask(attn_logits(self.attn_w[layer], self.attn_b[layer], router_input), k)
        return keep_prefix_dense(mask, self.start)

    def neurons_mask(self, layer: int, router_input: jax.Array, act: jax.Array) -> jax.Array | None:
        k = self._mlp_k(layer, router_input.shape[0])
        if k is None:
            return None
        scores = batch_union_scores(mlp_logits(self.mlp_a[layer], self.mlp_b[layer], router_input))  # [T, N]
        return keep_prefix_dense(topk_mask(scores, k)[None], self.start)


@functools.partial(jax.tree_util.register_dataclass, data_fields=_ROUTER_DATA, meta_fields=_ROUTER_META)
@dataclasses.dataclass(frozen=True)
class RouterSelector(_RouterScores):
    """DecodeSelector for `model.decode` / `generate`: per-sequence top-k units, one union index vector."""

    def attention(self, layer: int, router_input: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        k = self._attn_k(layer)
        if k is None:
            return None
        groups = topk_index(attn_logits(self.attn_w[layer], self.attn_b[layer], router_input), k)  # [B, k]
        return groups, jnp.full((router_input.shape[0],), k, jnp.int32)

    def mlp(self, layer: int, router_input: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        k = self._mlp_k(layer, router_input.shape[0])
        if k is None:
            return None
        scores = batch_union_scores(mlp_logits(self.mlp_a[layer], self.mlp_b[layer], router_input))  # [N]
        return topk_index(scores, k), jnp.int32(k)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=[], meta_fields=["attn_k", "num_kv_heads", "mlp_union", "start"]
)
@dataclasses.dataclass(frozen=True)
class OracleSparsifier:
    """Oracle selection (no router): the top-k units by true attention output norm (KV-group norm for GQA),
    and the true union of active MLP neurons over the batch (for ReLU exactly lossless: isolates the
    attention sparsity error from router error)."""

    attn_k: tuple[int, ...]  # units kept per layer; >= units means dense
    num_kv_heads: int | None  # set for GQA: units are KV groups
    mlp_union: bool = True
    start: int = 0

    def heads_mask(self, layer: int, router_input: jax.Array, head_out: jax.Array) -> jax.Array | None:
        norms = head_output_norms(head_out)
        if self.num_kv_heads is not None:
            norms = group_norms(norms, self.num_kv_heads)
        if self.attn_k[layer] >= norms.shape[-1]:
            return None
        return keep_prefix_dense(topk_mask(norms, self.attn_k[layer]), self.start)

    def neurons_mask(self, layer: int, router_input: jax.Array, act: jax.Array) -> jax.Array | None:
        if not self.mlp_union or layer == 0:
            return None
        return keep_prefix_dense(jnp.any(act > 0, axis=0, keepdims=True).astype(jnp.float32), self.start)


# ---- builders ---------------------------------------------------------------------------------------
def attention_units(cfg: ModelConfig) -> tuple[int, str]:
    """What an attention router scores: KV groups for GQA (skipping a group skips its KV reads), heads for MHA."""
    if cfg.num_kv_heads < cfg.num_heads:
        return cfg.num_kv_heads, "group"
    return cfg.num_heads, "head"


def _router_fields(bundle: SparsityBundle, attn_density: float | None, mlp_recall: float | None,
                   per_layer: bool, attn: bool, mlp: bool) -> dict[str, Any]:
    c = bundle.config
    if attn_density is not None:
        check_density(attn_density)
    if mlp and c.mlp_router:
        if mlp_recall is None:
            raise InputError("mlp_recall is required for MLP sparsity")
        check_density(mlp_recall, "MLP recall target")
        c.mlp_table(mlp_recall)  # clear error now rather than inside jit
    layers = range(c.num_layers)

    def arrays(get, j):
        return tuple(None if get(i) is None else jnp.asarray(get(i)[j]) for i in layers)

    return dict(
        attn_w=arrays(bundle.attn, 0), attn_b=arrays(bundle.attn, 1),
        mlp_a=arrays(bundle.mlp, 0), mlp_b=arrays(bundle.mlp, 1),
        attn_k=c.attn_k(attn_density, per_layer), units=c.attn_units,
        plan=dataclasses.replace(c, train=None),  # hashable static copy
        mlp_recall=mlp_recall if (mlp and c.mlp_router) else None,
        use_attn=attn, use_mlp=mlp and c.mlp_router,
    )


def router_sparsifier(bundle: SparsityBundle, attn_density: float | None = None, mlp_recall: float | None = 0.99,
                      per_layer: bool = False, attn: bool = True, mlp: bool = True, start: int = 0) -> RouterSparsifier:
    """Masked-evaluation sparsifier from trained routers. `attn`/`mlp` switch each part off (dense)."""
    return RouterSparsifier(**_router_fields(bundle, attn_density, mlp_recall, per_layer, attn, mlp), start=start)


def router_selector(bundle: SparsityBundle, attn_density: float | None = None, mlp_recall: float | None = 0.99,
                    per_layer: bool = False, attn: bool = True, mlp: bool = True) -> RouterSelector:
    """Decode selector from trained routers (same choices as `router_sparsifier` on the same inputs)."""
    return RouterSelector(**_router_fields(bundle, attn_density, mlp_recall, per_layer, attn, mlp))


def oracle_sparsifier(cfg: ModelConfig, attn_density: float, mlp: bool = True, start: int = 0,
                      attn_k: tuple[int, ...] | None = None) -> OracleSparsifier:
    """Oracle at global density `attn_density` (layer 0 dense), or at explicit per-layer `attn_k`."""
    units, kind = attention_units(cfg)
    if attn_k is None:
        rho = check_density(attn_density)
        attn_k = tuple(units if i == 0 else units_kept(rho, units) for i in range(cfg.num_layers))
    return OracleSparsifier(
        attn_k=tuple(attn_k), num_kv_heads=cfg.num_kv_heads if kind == "group" else None,
        mlp_union=mlp and cfg.relu_mlp, start=start,
    )
