"""Sparsity as the model code consumes it: masked-evaluation sparsifiers and real decode selectors.

Both are JAX pytrees (router weights are leaves; densities, tables and flags are static), so they pass
through `jax.jit` as ordinary arguments. Layer 0 (and any dense layer) returns None. They apply the same
rules from `polar_jax.selection` to the same router logits, so a masked evaluation predicts exactly what
the sparse decode step computes:
- heads: each sequence keeps its k best units (fixed budget), or the units whose logit passes a
  calibrated threshold clipped to [floor, cap] (input-adaptive budgets, same mean); with `balance` n > 1
  the budget applies per tensor-parallel shard of units (ceil(k/n) best units on each of n shards);
- MLP, threshold rule (default when the bundle is calibrated for it): a neuron is kept when any live
  row's logit passes the layer's threshold for that many rows; a union larger than the calibrated
  capacity runs the dense MLP;
- MLP, top-k rule (the paper's): top-k of ReLU'd logits summed over the live rows, k from the
  calibrated table for the number of live rows.

Decode semantics in masked evaluation: a position's units are chosen from that position's own router
input; the MLP neurons from all batch rows at that position (the decode batch), mask [1, T, N].
Positions before `start` stay dense (a densely prefilled prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gemv_f32, unit_top_k
from pallas_kernels.unit_top_k import MAX_UNITS as UNIT_TOP_K_MAX_UNITS
from polar_jax.config import ModelConfig
from polar_jax.errors import InputError
from polar_jax.models.base import head_output_norms
from polar_jax.models.collect import group_norms
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.config import SparsityConfig, attention_units, check_density, units_kept
from polar_jax.routers.logits import attn_logits
from polar_jax.selection import (AttentionSelection, MLPSelection, UnionRequest, adaptive_counts, balanced_top_units,
                                 balanced_unit_mask, capped_union_mask, compact_slots, keep_prefix_dense, shard_budget,
                                 topk_mask, union_scores, union_threshold_mask, union_topk, unit_mask)

_ROUTER_DATA = ["attn_w", "attn_b", "mlp_a", "mlp_b", "attn_w1", "attn_b1"]
_ROUTER_META = ["attn_k", "budgets", "units", "plan", "mlp_recall", "mlp_rule", "use_attn", "use_mlp", "start",
                "select_impl", "balance", "fused_first", "mlp_b_layout", "overlap", "first_in_qkv"]
MLP_RULES = ("threshold", "topk")
# How selectors store the MLP router's second matrix: "rn" [rank, N] as the bundle holds it, or "nr" [N, rank]
# (transposed once when the selector is built). `union_mask` reads a block of neurons per program: rank-major,
# that is `rank` runs of 128 bytes (64 bf16 neurons) 2N bytes apart; neuron-major, one contiguous run. On the
# H100 it read the rank-major matrix at ~73 % of the bandwidth (14.4 us per OPT-6.7B layer at B=32,
# benchmarks/results/decode_1207_h100/notes.md). Neuron-major was no faster there: OPT-6.7B heads + MLP B=1
# -0.3 %, B=32 -0.0 % (step_variants `router_nr`, benchmarks/results/raw_2026-12-07b_h100/call1_variants_router.json).
MLP_ROUTER_LAYOUT = "rn"


@dataclasses.dataclass(frozen=True)
class _Routers:
    """Router weights and what each layer keeps (shared by the sparsifier and the selector)."""

    attn_w: tuple
    attn_b: tuple
    mlp_a: tuple  # per layer [rank, d] (transposed from the bundle's [d, rank])
    mlp_b: tuple  # per layer [rank, N], or [N, rank] with mlp_b_layout "nr"
    attn_k: tuple[int, ...]
    budgets: tuple[tuple[float, int, int] | None, ...] | None  # adaptive heads: (threshold, floor, cap)
    units: int
    plan: SparsityConfig | None
    mlp_recall: float | None
    mlp_rule: str = "topk"
    use_attn: bool = True
    use_mlp: bool = True
    start: int = 0  # masked eval: positions before it stay dense; decode ignores it (prefill is dense)
    select_impl: str = "auto"  # the fused router + threshold + compaction op
    balance: int = 1  # heads: > 1 keeps the budget per shard of this many tensor-parallel shards
    # mlp_a holds [U + rank, d]: the head router's rows, then the MLP router's first matrix. Both routers read
    # the same input, so where both run one product serves them (one kernel instead of two per layer)
    fused_first: bool = False
    # hidden-layer attention routers: per layer w1 [d, h] and b1 [h] (then attn_w is [h, U]); None: linear
    attn_w1: tuple | None = None
    attn_b1: tuple | None = None
    mlp_b_layout: str = "rn"  # see MLP_ROUTER_LAYOUT
    # the decode selector hands its threshold-rule MLP selection to the step as a `UnionRequest`, which runs it
    # in attention's launches (see OVERLAP_MLP_SELECTION)
    overlap: bool = False
    # at FIRST_GEMV_ROWS the routers' shared first product is computed by the step in its Q/K/V launch
    # (`first_product_weight`; see FIRST_PRODUCT_IN_QKV)
    first_in_qkv: bool = False

    @property
    def mlp_neuron_axis(self) -> int:
        """The axis of each mlp_b that runs over the neurons: 1 for [rank, N], 0 for [N, rank]."""
        return 1 if self.mlp_b_layout == "rn" else 0

    def _mlp_width(self, layer: int) -> int:
        """Neurons the MLP router scores (a tensor-parallel shard's own under shard_map)."""
        return self.mlp_b[layer].shape[self.mlp_neuron_axis]

    def attn_kept(self, layer: int) -> int:
        """Attention units each row keeps at `layer` with the fixed budget. Balanced over n shards that is
        ceil(k / n) per shard, n times, which can be every unit (LLaMA-3.1-8B's 8 KV groups at k = 4 on 8
        shards keep 1 + 1 + ... = 8): the layer's attention is then dense."""
        if not (self.use_attn and self.attn_w[layer] is not None):
            return self.units
        n = self.balance
        if n > 1:
            return min(shard_budget(self.attn_k[layer], n), self.units // n) * n
        return min(self.attn_k[layer], self.units)

    def attn_floor(self, layer: int) -> int:
        """Attention units every row keeps at least at `layer`: `attn_kept` for a fixed budget; for an adaptive one
        its floor (per shard when balanced, where ceil(floor / n) can be all of a shard's units)."""
        if self.budgets is None or not (self.use_attn and self.attn_w[layer] is not None):
            return self.attn_kept(layer)
        _, floor, _ = self._adaptive_bounds(layer)
        return floor * self.balance if self.balance > 1 else min(floor, self.units)

    def _adaptive_bounds(self, layer: int) -> tuple[float, int, int]:
        """(threshold, floor, cap) of an adaptive layer's per-row counts, floor <= cap. Balanced over n shards
        they are per shard: ceil(floor / n) and ceil(cap / n), at most a shard's units. `attn_floor` (which
        decides whether the layer runs sparse) and `_attn_counts` (the counts themselves) both read them here."""
        t, floor, cap = self.budgets[layer]
        n = self.balance
        if n > 1:
            floor, cap = shard_budget(floor, n), min(shard_budget(cap, n), self.units // n)
        return t, min(floor, cap), cap

    def _attn_on(self, layer: int) -> bool:
        if self.budgets is not None:  # adaptive: per-row counts, which the mean k does not bound
            return (self.use_attn and self.attn_w[layer] is not None and self.attn_k[layer] < self.units
                    and self.attn_floor(layer) < self.units)
        return self.attn_kept(layer) < self.units

    def _attn_product(self, layer: int, x: jax.Array,
                      product: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(float32 scores whose first U columns, plus the bias, are the head router's logits; that bias or
        None). A linear router's bias is left to the consumer (the top-k kernel adds it as it reads), and at
        B=1 the scores are the product shared with the MLP router (its columns follow the U of the heads).
        `product`: that shared product, computed by the step (see `first_product_weight`)."""
        if self.fused_first and self._mlp_on(layer, x.shape[0]):  # linear head routers only (see _router_fields)
            return self._first_stage(layer, x, product), self.attn_b[layer]
        if self.attn_w1 is None:
            w = self.attn_w[layer]
            return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32), self.attn_b[layer]
        return attn_logits(x, self.attn_w[layer], self.attn_b[layer], self.attn_w1[layer], self.attn_b1[layer]), None

    def _attn_logits(self, layer: int, x: jax.Array, product: jax.Array | None = None) -> jax.Array:
        return self._logits_of(layer, *self._attn_product(layer, x, product))

    def _logits_of(self, layer: int, scores: jax.Array, bias: jax.Array | None) -> jax.Array:
        """The head router's logits from `_attn_product`'s (scores, bias)."""
        logits = scores[..., : self.attn_w[layer].shape[1]]
        return logits if bias is None else logits + bias.astype(jnp.float32)

    def first_product_weight(self, layer: int, batch: int) -> jax.Array | None:
        """With `first_in_qkv`, at FIRST_GEMV_ROWS, where both routers share their first product: the shared
        matrix [U + rank, d] (out-major), whose float32 product with the router input the step computes in
        its Q/K/V launch and passes back as `product=` to `attention`, `union_request` and `mlp`. Else None."""
        if (self.first_in_qkv and self.fused_first and FIRST_GEMV_ROWS[0] <= batch <= FIRST_GEMV_ROWS[1]
                and self._mlp_on(layer, batch)):
            return self.mlp_a[layer]
        return None

    def _first_stage(self, layer: int, x: jax.Array, product: jax.Array | None = None) -> jax.Array:
        """x @ mlp_a[layer].T in float32 (the same traced op from both routers: XLA computes it once), or the
        `product` the step computed. At FIRST_GEMV_ROWS the fused product is one split-K GEMV (XLA ran it as
        split-K GEMMs there)."""
        if product is not None:
            return product
        a = self.mlp_a[layer]
        if self.fused_first and x.ndim == 2 and FIRST_GEMV_ROWS[0] <= x.shape[0] <= FIRST_GEMV_ROWS[1]:
            # named after its part (gemv_nk_router): a profile tells it from the projections' GEMVs by name only
            return gemv_f32(x.astype(a.dtype), a, layout="nk", impl=self.select_impl, label="router")
        return jnp.einsum("...d,rd->...r", x.astype(a.dtype), a, preferred_element_type=jnp.float32)

    def _attn_counts(self, layer: int, logits: jax.Array) -> tuple[jax.Array, int]:
        """Per-row unit counts [...] and the slot capacity; balanced: per shard, [..., balance] and the
        capacity of one shard."""
        n = self.balance
        if n > 1:
            per = logits.reshape(*logits.shape[:-1], n, self.units // n)
            if self.budgets is not None:
                t, floor, cap = self._adaptive_bounds(layer)
                return adaptive_counts(per, t, floor, cap), cap
            k = min(shard_budget(self.attn_k[layer], n), self.units // n)
            return jnp.full(per.shape[:-1], k, jnp.int32), k
        if self.budgets is not None:
            t, floor, cap = self._adaptive_bounds(layer)
            return adaptive_counts(logits, t, floor, cap), cap
        k = self.attn_k[layer]
        return jnp.full(logits.shape[:-1], k, jnp.int32), k

    def _mlp_on(self, layer: int, batch: int) -> bool:
        if not self.use_mlp or self.plan is None or self.mlp_a[layer] is None or layer in self.plan.dense_layers:
            return False
        table = self.plan.mlp_table(self.mlp_recall)
        if self.mlp_rule == "threshold":
            return table.capacity_for(layer, batch, self.plan.ffn) < self.plan.ffn
        return self.plan.mlp_k(self.mlp_recall, batch)[layer] is not None

    def _mlp_hidden(self, layer: int, x: jax.Array, product: jax.Array | None = None) -> jax.Array:
        # mlp_a is stored [rank, d] (rows contiguous per output): at small batch XLA reads it as fast as
        # an MLP up projection, while a [d, rank] GEMV ran at ~0.5 TB/s on the H200. The Pallas GEMV was
        # tried here at B=1 too: with 32 column programs for rank 1024 it made OPT-6.7B's step 5 % slower
        # (benchmarks/results/raw_2026-11-29b_h200/call2_step_variants_b1.json, variant router_xla)
        a = self.mlp_a[layer]
        if self.fused_first:
            return self._first_stage(layer, x, product)[..., self.attn_w[layer].shape[1]:].astype(a.dtype)
        return jnp.einsum("...d,rd->...r", x.astype(a.dtype), a, preferred_element_type=jnp.float32).astype(a.dtype)

    def _mlp_logits(self, layer: int, x: jax.Array, product: jax.Array | None = None) -> jax.Array:
        spec = "...r,rn->...n" if self.mlp_b_layout == "rn" else "...r,nr->...n"
        return jnp.einsum(spec, self._mlp_hidden(layer, x, product), self.mlp_b[layer],
                          preferred_element_type=jnp.float32)

    def _by_live_count(self, layer: int, batch: int, kind: str) -> np.ndarray:
        """A constant [batch + 1] table indexed by the number of live rows: thresholds or k."""
        table = self.plan.mlp_table(self.mlp_recall)
        n = self.plan.ffn
        if kind == "threshold":
            return np.asarray([table.threshold_for(layer, max(1, b)) for b in range(batch + 1)], np.float32)
        ks = [min(n, table.k_for(layer, max(1, b), self.plan.mlp_tile, n)) for b in range(batch + 1)]
        return np.maximum.accumulate(np.asarray(ks, np.int32))  # k never shrinks as rows join


@functools.partial(jax.tree_util.register_dataclass, data_fields=_ROUTER_DATA, meta_fields=_ROUTER_META)
@dataclasses.dataclass(frozen=True)
class RouterSparsifier(_Routers):
    def heads_mask(self, layer: int, router_input: jax.Array, head_out: jax.Array) -> jax.Array | None:
        if not self._attn_on(layer):
            return None
        logits = self._attn_logits(layer, router_input)
        counts, _ = self._attn_counts(layer, logits)
        mask = unit_mask(logits, counts) if self.balance == 1 else balanced_unit_mask(logits, counts, self.balance)
        return keep_prefix_dense(mask, self.start)

    def neurons_mask(self, layer: int, router_input: jax.Array, act: jax.Array) -> jax.Array | None:
        batch = router_input.shape[0]
        if not self._mlp_on(layer, batch):
            return None
        logits = self._mlp_logits(layer, router_input)  # [B, T, N]
        if self.mlp_rule == "threshold":
            table = self.plan.mlp_table(self.mlp_recall)
            keep = union_threshold_mask(logits, table.threshold_for(layer, batch), axis=0)  # [T, N]
            cap = table.capacity_for(layer, batch, self.plan.ffn)
            mask = capped_union_mask(keep, cap).astype(jnp.float32)
        else:
            k = int(self._by_live_count(layer, batch, "k")[batch])
            mask = topk_mask(union_scores(logits, axis=0), k)
        return keep_prefix_dense(mask[None], self.start)


@functools.partial(jax.tree_util.register_dataclass, data_fields=_ROUTER_DATA, meta_fields=_ROUTER_META)
@dataclasses.dataclass(frozen=True)
class RouterSelector(_Routers):
    """DecodeSelector for `model.decode` / `generate`: per-sequence units, one union of neurons."""

    def attention(self, layer: int, router_input: jax.Array, live: jax.Array,
                  product: jax.Array | None = None) -> AttentionSelection | None:
        """`product`: the routers' shared first product where the step computed it (`first_product_weight`)."""
        if not self._attn_on(layer):
            return None
        if self.balance == 1:
            # the top-k from the raw product in one kernel (slice and bias add included); adaptive budgets
            # count the logits above their threshold in XLA (the same product: computed once)
            scores, bias = self._attn_product(layer, router_input, product)
            counts, cap = self._attn_counts(layer, self._logits_of(layer, scores, bias))
            units = self.attn_w[layer].shape[1]
            impl = self.select_impl if units <= UNIT_TOP_K_MAX_UNITS else "xla"
            ids = unit_top_k(scores, cap, bias, units=units, impl=impl)
            return AttentionSelection(ids, counts)
        logits = self._attn_logits(layer, router_input, product)  # [B, U]
        counts, cap = self._attn_counts(layer, logits)
        ids = balanced_top_units(logits, cap, self.balance)  # [B, balance * cap], shard after shard
        if self.budgets is None:  # every shard keeps exactly cap units: all slots are live
            return AttentionSelection(ids, jnp.sum(counts, axis=-1, dtype=jnp.int32))
        valid = (jnp.arange(cap, dtype=jnp.int32) < counts[..., None]).reshape(ids.shape)
        return AttentionSelection(*compact_slots(ids, valid, ids.shape[-1]))

    def union_request(self, layer: int, router_input: jax.Array, live: jax.Array,
                      product: jax.Array | None = None) -> UnionRequest | None:
        """With `overlap`, this layer's threshold-rule MLP selection as a `UnionRequest` for the step to run in
        attention's launches (then the step does not call `mlp` for this layer); otherwise None."""
        if not (self.overlap and self.mlp_rule == "threshold" and self._mlp_on(layer, router_input.shape[0])):
            return None
        return self._union_request(layer, router_input, live, product)

    def _union_request(self, layer: int, router_input: jax.Array, live: jax.Array,
                       product: jax.Array | None = None) -> UnionRequest:
        batch = router_input.shape[0]
        cap = self.plan.mlp_table(self.mlp_recall).capacity_for(layer, batch, self.plan.ffn)
        # under tensor parallelism mlp_b holds this shard's neurons: a per-shard union
        cap = min(cap, self._mlp_width(layer))
        n_live = jnp.sum(live, dtype=jnp.int32)
        threshold = jnp.asarray(self._by_live_count(layer, batch, "threshold"))[n_live]
        if self.fused_first:  # the shared float32 product's MLP columns, read (and rounded) in the kernel
            u, offset = self._first_stage(layer, router_input, product), self.attn_w[layer].shape[1]
        else:
            u, offset = self._mlp_hidden(layer, router_input), 0
        return UnionRequest(u, self.mlp_b[layer], jnp.asarray(live, bool), threshold, cap, offset, self.mlp_b_layout,
                            self.select_impl)

    def mlp(self, layer: int, router_input: jax.Array, live: jax.Array,
            product: jax.Array | None = None) -> MLPSelection | None:
        """`product`: as in `attention`."""
        batch = router_input.shape[0]
        if not self._mlp_on(layer, batch):
            return None
        n_live = jnp.sum(live, dtype=jnp.int32)
        if self.mlp_rule == "threshold":
            return self._union_request(layer, router_input, live, product).run()
        ks = self._by_live_count(layer, batch, "k")
        return union_topk(self._mlp_logits(layer, router_input, product), jnp.asarray(ks)[n_live], int(ks[batch]),
                          live)


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
def _router_fields(bundle: SparsityBundle, attn_density: float | None, mlp_recall: float | None,
                   per_layer: bool, attn: bool, mlp: bool, adaptive: bool, mlp_rule: str | None,
                   dtype: Any, select_impl: str, balance: int = 1, fuse_first: bool = False) -> dict[str, Any]:
    bundle = bundle.for_density(attn_density)  # the attention-router set serving this density (bundle.py)
    c = bundle.config
    if not isinstance(balance, (int, np.integer)) or balance < 1 or c.attn_units % balance:
        raise InputError(f"balance must be a positive divisor of the {c.attn_units} attention units, got {balance!r}")
    if attn_density is not None:
        check_density(attn_density)
    use_mlp = bool(mlp and c.mlp_router)
    rule = "topk"
    if use_mlp:
        if mlp_recall is None:
            raise InputError("mlp_recall is required for MLP sparsity")
        check_density(mlp_recall, "MLP recall target")
        table = c.mlp_table(mlp_recall)  # clear error now rather than inside jit
        if mlp_rule is not None and mlp_rule not in MLP_RULES:
            raise InputError(f"mlp_rule must be one of {MLP_RULES}, got {mlp_rule!r}")
        rule = mlp_rule or ("threshold" if table.has_thresholds else "topk")
        if rule == "threshold" and not table.has_thresholds:
            raise InputError("this bundle has no MLP thresholds: re-run `polar-jax calibrate` on it")
    layers = range(c.num_layers)

    def arrays(get, j, transpose=False):
        return tuple(None if get(i) is None else jnp.asarray(get(i)[j].T if transpose else get(i)[j], dtype)
                     for i in layers)

    attn_w = arrays(bundle.attn, 0)
    hidden = {}
    if c.attn_hidden:
        hidden = dict(attn_w1=arrays(bundle.attn, 2), attn_b1=arrays(bundle.attn, 3))
    neuron_major = MLP_ROUTER_LAYOUT == "nr"
    mlp_arrays = dict(mlp_a=arrays(bundle.mlp, 0, transpose=True), mlp_b=arrays(bundle.mlp, 1, transpose=neuron_major))
    # a hidden layer has its own first product; a layer with only one of the routers keeps them apart
    fused = bool(fuse_first and attn and use_mlp and not c.attn_hidden
                 and all((w is None) == (a is None) for w, a in zip(attn_w, mlp_arrays["mlp_a"])))
    if fused:
        mlp_arrays["mlp_a"] = tuple(a if a is None else jnp.concatenate([w.T, a], axis=0)
                                    for w, a in zip(attn_w, mlp_arrays["mlp_a"]))
    return dict(
        **hidden,
        attn_w=attn_w, attn_b=arrays(bundle.attn, 1), **mlp_arrays, fused_first=fused,
        attn_k=c.attn_k(attn_density, per_layer),
        budgets=c.adaptive_budgets(attn_density, per_layer) if adaptive and attn else None,
        units=c.attn_units,
        plan=dataclasses.replace(c, train=None),  # hashable static copy
        mlp_recall=mlp_recall if use_mlp else None, mlp_rule=rule,
        use_attn=attn, use_mlp=use_mlp, select_impl=select_impl, balance=int(balance),
        mlp_b_layout=MLP_ROUTER_LAYOUT,
    )


def router_sparsifier(bundle: SparsityBundle, attn_density: float | None = None, mlp_recall: float | None = 0.99,
                      per_layer: bool = False, attn: bool = True, mlp: bool = True, start: int = 0,
                      adaptive: bool = False, mlp_rule: str | None = None, balance: int = 1) -> RouterSparsifier:
    """Masked-evaluation sparsifier from trained routers. `attn`/`mlp` switch each part off (dense);
    `adaptive` uses input-adaptive head budgets; `mlp_rule` "threshold" | "topk" (default: threshold
    when the bundle is calibrated for it); `balance` n > 1: the head budget per shard of n (balanced
    top-k of tensor-parallel decoding)."""
    return RouterSparsifier(**_router_fields(bundle, attn_density, mlp_recall, per_layer, attn, mlp, adaptive,
                                             mlp_rule, jnp.float32, "xla", balance), start=start)


# One product for both routers' first stage pays at one sequence, where each product is a reduction kernel
# launch of ~3 us: OPT-6.7B B=1 heads + MLP step 5.7-6.0 % faster on the H200. As a GEMM (B > 1) the same
# product made the step much slower: 31 % at B=8 and 18 % at B=32, with the same selections
# (benchmarks/results/raw_2026-11-29c_h200/call3_*, call4_* variants fuse_routers*), so B=1 only.
FUSE_ROUTERS_MAX_BATCH = 1
# At 17-32 rows the fused product runs through the Pallas GEMV instead (`pallas_kernels.gemv_f32`: one launch,
# the reduction split over ~one program per SM). Since the attention projections moved to the GEMV there,
# XLA ran the two routers' products at OPT-6.7B B=32 as two split-K GEMMs and a reduction, ~11 us per layer
# for 8.6 MB (H100, 2026-12-07: benchmarks/results/raw_2026-12-07b_h100/call2_goals_opt.json); before, it had
# merged them into the Q/K/V GEMM.
FIRST_GEMV_ROWS = (17, 32)
# On since timed (H100, same-process A/B, step_variants `first_gemv`): OPT-6.7B heads + MLP 1.4 % faster at B=32
# and 1.2 % at B=24 (benchmarks/results/raw_2026-12-07c_h100/call1_variants_first_gemv.json). Off, the selectors
# keep XLA's two products at 2-32 rows.
FUSE_AT_FIRST_GEMV_ROWS = True


# The threshold-rule MLP selection computed in attention's launches (`pallas_kernels.select_decode_union`) instead
# of its own two kernels after it: union_mask streams the router's second matrix (33.5 MB per OPT-6.7B layer)
# while select_decode's programs run, and the compaction shares the finish kernel's launch. The router reads only
# the layer input, so nothing waits. Off until timed on a GPU (benchmarks/decode/step_variants.py `overlap`).
OVERLAP_MLP_SELECTION = False
# At FIRST_GEMV_ROWS the routers' shared first product in the Q/K/V GEMV's launch (`gemv_multi(f32_nk=...)`: its
# row blocks are more programs of that launch) instead of its own split-K GEMV (~6 us per OPT-6.7B layer at B=32
# for 8.6 MB) and the kernel summing that GEMV's partials (~1.4 us). The step then selects after Q/K/V, which the
# selection does not need at B > 1. Off until timed on a GPU (step_variants `first_in_qkv`).
FIRST_PRODUCT_IN_QKV = False


def fuse_routers_for(batch: int) -> bool:
    """Whether a decode selector built for `batch` sequences fuses its routers' first products."""
    return batch <= FUSE_ROUTERS_MAX_BATCH or (FUSE_AT_FIRST_GEMV_ROWS and FIRST_GEMV_ROWS[0] <= batch <= FIRST_GEMV_ROWS[1])


def router_selector(bundle: SparsityBundle, attn_density: float | None = None, mlp_recall: float | None = 0.99,
                    per_layer: bool = False, attn: bool = True, mlp: bool = True, adaptive: bool = False,
                    mlp_rule: str | None = None, dtype: Any = jnp.float32, select_impl: str = "auto",
                    balance: int = 1, fuse_routers: bool = False, overlap: bool | None = None,
                    first_in_qkv: bool | None = None) -> RouterSelector:
    """Decode selector from trained routers (same choices as `router_sparsifier` on the same inputs).
    `dtype`: the router weights' dtype (the model's on a GPU: half the bytes of float32); `balance` as in
    `router_sparsifier`; `fuse_routers`: one product for the head router and the MLP router's first matrix
    where both run (they read the same input; see `fuse_routers_for`); `overlap`: the MLP selection in
    attention's launches (default `OVERLAP_MLP_SELECTION`; the same selections either way); `first_in_qkv`: the
    shared first product in the Q/K/V launch at 17-32 rows (default `FIRST_PRODUCT_IN_QKV`)."""
    c, arch = bundle.config, bundle.signature.get("arch", {})
    if attn and c.unit == "head" and int(arch.get("num_kv_heads", c.attn_units)) < c.attn_units:
        raise InputError("this bundle's routers score query heads of a GQA model (unit='head'): usable for masked "
                         "evaluation only; sparse decoding selects KV groups (train with unit='group')")
    return RouterSelector(**_router_fields(bundle, attn_density, mlp_recall, per_layer, attn, mlp, adaptive,
                                           mlp_rule, dtype, select_impl, balance, fuse_routers),
                          overlap=OVERLAP_MLP_SELECTION if overlap is None else bool(overlap),
                          first_in_qkv=FIRST_PRODUCT_IN_QKV if first_in_qkv is None else bool(first_in_qkv))


def oracle_sparsifier(cfg: ModelConfig, attn_density: float, mlp: bool = True, start: int = 0,
                      attn_k: tuple[int, ...] | None = None, unit: str | None = None) -> OracleSparsifier:
    """Oracle at global density `attn_density` (layer 0 dense), or at explicit per-layer `attn_k`; `unit` as
    in `attention_units` (default: KV groups for GQA, heads for MHA)."""
    units, kind = attention_units(cfg, unit)
    if attn_k is None:
        rho = check_density(attn_density)
        attn_k = tuple(units if i == 0 else units_kept(rho, units) for i in range(cfg.num_layers))
    return OracleSparsifier(
        attn_k=tuple(attn_k), num_kv_heads=cfg.num_kv_heads if kind == "group" else None,
        mlp_union=mlp and cfg.relu_mlp, start=start,
    )
