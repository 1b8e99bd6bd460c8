"""Random-weight stand-ins for the benchmark: a filled KV cache and sparsity bundles whose routers have
the paper's architecture and rank (so their cost is real), calibrated on the step's own router inputs to
keep a target MLP union density, or (input-adaptive head budgets) a mean head count."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import KVCache
from polar_jax.config import ModelConfig
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.calibrate import adaptive_thresholds
from polar_jax.routers.config import MLPTable, SparsityConfig
from polar_jax.routers.config import attention_units
from polar_jax.bench.shapes import PAPER_UNION

MLP_TILE = 128  # capacity granularity (kernel tiles)


def paper_union(batch: int) -> float:
    """PAPER.md's OPT-66B union density at 99 % recall, interpolated in log2(B)."""
    bs = sorted(PAPER_UNION)
    if batch <= bs[0]:
        return PAPER_UNION[bs[0]]
    if batch >= bs[-1]:
        return PAPER_UNION[bs[-1]]
    hi = next(b for b in bs if b >= batch)
    lo = max(b for b in bs if b <= batch)
    if hi == lo:
        return PAPER_UNION[hi]
    w = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return PAPER_UNION[lo] + w * (PAPER_UNION[hi] - PAPER_UNION[lo])


def random_cache(cfg: ModelConfig, batch: int, capacity: int, context: int, dtype, seed: int = 1) -> KVCache:
    """Every row holds `context` random keys/values (fresh values, not zeros) and is live."""
    key = jax.random.key(seed)
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    ks, vs = [], []
    for _ in range(cfg.num_layers):
        k1, k2, key = jax.random.split(key, 3)
        ks.append(jax.random.normal(k1, shape, dtype))
        vs.append(jax.random.normal(k2, shape, dtype))
    return KVCache(tuple(ks), tuple(vs), jnp.full((batch,), context, jnp.int32), jnp.ones((batch,), bool))


def random_bundle(cfg: ModelConfig, rank: int, dtype=jnp.bfloat16, seed: int = 7) -> SparsityBundle:
    """Routers of the paper's shapes with random weights (layer 0 dense): d -> U with bias for attention,
    d -> rank -> N without bias for ReLU MLPs. MLP tables are left to `calibrate_union`."""
    units, unit = attention_units(cfg)
    d, n = cfg.hidden_size, cfg.intermediate_size
    key = jax.random.key(seed)
    params = {}
    for i in range(1, cfg.num_layers):
        key, k1, k2, k3 = jax.random.split(key, 4)
        params[f"attn.{i}.w"] = (jax.random.normal(k1, (d, units), jnp.float32) * d**-0.5).astype(dtype)
        params[f"attn.{i}.b"] = jnp.zeros((units,), dtype)
        if cfg.relu_mlp:
            params[f"mlp.{i}.a"] = (jax.random.normal(k2, (d, rank), jnp.float32) * d**-0.5).astype(dtype)
            params[f"mlp.{i}.b"] = (jax.random.normal(k3, (rank, n), jnp.float32) * rank**-0.5).astype(dtype)
    plan = SparsityConfig(num_layers=cfg.num_layers, attn_units=units, unit=unit, ffn=n, mlp_router=cfg.relu_mlp,
                          mlp_rank=rank if cfg.relu_mlp else 0, mlp_tile=MLP_TILE, mlp_dense_threshold=1.0)
    return SparsityBundle(plan, params, {})


def gaussian_router_inputs(cfg: ModelConfig, batch: int, seed: int = 5) -> np.ndarray:
    """[L, batch, d] standard-normal stand-ins for the routers' (LayerNorm'd) inputs, where no step of the model
    can be probed for its own (a step under shard_map, a selector built before the model runs)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (cfg.num_layers, batch, cfg.hidden_size)), np.float32)


def calibrate_union(bundle: SparsityBundle, router_inputs: np.ndarray, batch: int, density: float,
                    recall: float = 0.99) -> SparsityBundle:
    """MLP tables for one batch size from the step's own router inputs [L, B, d]: per layer the logit
    threshold at which the union over the batch keeps `density` of the neurons, a capacity with 50 %
    headroom, and the matching top-k (for the paper's rule)."""
    c = bundle.config
    n = c.ffn
    target = max(1, int(round(density * n)))
    thresholds, capacity, ks = [], [], []
    for i in range(c.num_layers):
        if i in c.dense_layers:
            thresholds.append((float("-inf"),))
            capacity.append((n,))
            ks.append((n,))
            continue
        a = np.asarray(bundle.params[f"mlp.{i}.a"], np.float32)
        b = np.asarray(bundle.params[f"mlp.{i}.b"], np.float32)
        maxes = np.sort(((router_inputs[i].astype(np.float32) @ a) @ b).max(axis=0))[::-1]
        thresholds.append((float((maxes[target - 1] + maxes[min(target, n - 1)]) / 2),))
        capacity.append((min(n, int(math.ceil(1.5 * target / MLP_TILE)) * MLP_TILE),))
        ks.append((min(n, int(math.ceil(target / MLP_TILE)) * MLP_TILE),))
    table = MLPTable(recall, (batch,), tuple(ks), tuple(thresholds), tuple(capacity), None)
    return SparsityBundle(c.with_tables([table]), bundle.params, bundle.signature)


def calibrate_heads(bundle: SparsityBundle, router_inputs: np.ndarray) -> SparsityBundle:
    """Input-adaptive head budgets from the step's own router inputs [L, B, d]: per layer and k = 1..U the
    router-logit threshold whose clipped per-row count averages k over these rows (`polar-jax calibrate`
    does the same over a text's tokens). With one row the budget is exactly k: adaptive equals fixed."""
    c = bundle.config
    thresholds = []
    for i in range(c.num_layers):
        if i in c.dense_layers:
            thresholds.append(tuple([float("-inf")] * c.attn_units))
            continue
        w = np.asarray(bundle.params[f"attn.{i}.w"], np.float32)
        b = np.asarray(bundle.params[f"attn.{i}.b"], np.float32)
        logits = router_inputs[i].astype(np.float32) @ w + b
        thresholds.append(tuple(adaptive_thresholds(logits, c.attn_budget_floor, c.attn_budget_cap)))
    return SparsityBundle(dataclasses.replace(c, attn_thresholds=tuple(thresholds)), bundle.params, bundle.signature)
