"""Tensor-parallel decoding: the model's own prefill / decode step run under `jax.shard_map`.

Each device of the ("data", "tensor") mesh (polar_jax.sharding) runs the ordinary layer code
(`Block.__call__`) on its shard: its query heads and KV groups (and their cache), its MLP neurons, its
rows of the batch. Per layer there are exactly two all-reduces over "tensor": one after the attention
output projection and one after the MLP down projection (`Parallel.reduce`, called through
`models.base.sum_over_shards`); the output biases are added once, after them. Everything else (embedding,
norms, residuals, LM head, sampling) is computed redundantly on the shards of a tensor group, so every
device holds the same activations and tokens. Collectives are XLA's (NCCL on GPUs): nothing here talks
to devices directly.

Sparse selections are made on the shard:
- heads: the selector's per-row choice of KV groups (global top-k, or balanced top-k with
  `RouterSelector.balance` = the tensor size) is cut to this shard's groups (`local_groups`);
- MLP: the union over the batch, per shard over its own neurons. A `RouterSelector` with the threshold
  rule runs its fused selection on its shard of the router's second matrix (columns = this shard's
  neurons): the same neurons as the global union, and 1/n of the router's largest matrix read per device.
  Other selectors choose globally and the choice is cut to the shard (`local_neurons`).
With the batch split over "data", the MLP union is still over the whole batch (the router input rows are
gathered over "data", and cut to the real rows when the batch was padded to a multiple of "data", so the
selector's tables are those of the real batch size): a sharded step computes what one device computes.

One documented difference: the MLP slot capacity applies per shard. When a union overflows the calibrated
capacity (a calibration miss), one device keeps the first `cap` neurons of the union; a shard keeps the
first `cap` of its own (at most its N/n). The sharded set is then a superset of the one-device set (each
shard's part of the one-device prefix is a prefix of that shard's union), never a subset.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from polar_jax.config import ModelConfig
from polar_jax.routers.sparsify import RouterSelector
from polar_jax.selection import AttentionSelection, MLPSelection, compact_slots
from polar_jax.sharding import DATA, TENSOR, is_parallel, mesh_shape

HEAD_TOPK = ("global", "balanced")
# from benchmarks/results/tp_balance.md (CPU, shared checkpoints): at equal kept units balanced top-k costs
# <= 0.7 % perplexity, while global top-k loads the slowest shard 1.1-1.9x the mean at B = 8-32
DEFAULT_HEAD_TOPK = "balanced"


@dataclasses.dataclass(frozen=True)
class Parallel:
    """What a layer needs to know inside the shard_map: the mesh axis sizes (static)."""

    tensor: int
    data: int

    def shard(self) -> jax.Array:
        """This device's index along "tensor"."""
        return jax.lax.axis_index(TENSOR)

    def reduce(self, partial: jax.Array, bias: jax.Array | None) -> jax.Array:
        """Sum of the shards' partial outputs (one all-reduce, in the activations' dtype), plus the bias."""
        y = jax.lax.psum(partial, TENSOR) if self.tensor > 1 else partial
        if bias is None:
            return y
        return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(partial.dtype)

    def all_rows(self, x: jax.Array) -> jax.Array:
        """The whole batch of a per-row array whose rows are split over "data"."""
        return jax.lax.all_gather(x, DATA, axis=0, tiled=True) if self.data > 1 else x

    def row_key(self, key: jax.Array) -> jax.Array:
        """A sampling key of its own for each "data" shard (its rows are other sequences)."""
        return jax.random.fold_in(key, jax.lax.axis_index(DATA)) if self.data > 1 else key

    def any_rows(self, flag: jax.Array) -> jax.Array:
        """A scalar bool true when it is true on any "data" shard (the same answer everywhere)."""
        if self.data == 1:
            return flag
        return jax.lax.psum(flag.astype(jnp.int32), DATA) > 0


def shard_imbalance(keep: Any, shards: int) -> np.ndarray:
    """How unevenly a head selection loads the "tensor" shards. keep [..., B, U] (bool or 0/1): the units
    each row of a decode batch keeps; shard s holds units [s*U/n, (s+1)*U/n). Per batch (leading axes):
    the slowest shard's load (active (row, unit) pairs) over the mean shard's, 1.0 = balanced. Under tensor
    parallelism the slowest shard sets the step's attention time."""
    k = np.asarray(keep, np.float64)
    *lead, b, u = k.shape
    if u % shards:
        raise ValueError(f"{u} units do not split over {shards} shards")
    load = k.reshape(*lead, b, shards, u // shards).sum(axis=(-3, -1))  # [..., shards]
    return load.max(-1) / np.maximum(load.mean(-1), 1e-12)


def local_groups(sel: AttentionSelection, shard: jax.Array, per_shard: int) -> AttentionSelection:
    """A selection over all KV groups cut to those of one shard (groups [shard*per_shard, ...)),
    renumbered from 0, in their order; rows keep only their live slots."""
    b, a = sel.groups.shape
    lo = shard * per_shard
    live = jnp.arange(a, dtype=jnp.int32)[None, :] < sel.n_active[:, None]
    mine = live & (sel.groups >= lo) & (sel.groups < lo + per_shard)
    groups, n = compact_slots(sel.groups - lo, mine, min(a, per_shard))
    return AttentionSelection(groups, n)


def local_neurons(sel: MLPSelection, shard: jax.Array, per_shard: int) -> MLPSelection:
    """A union over all neurons cut to one shard's neurons, renumbered from 0, in their order."""
    lo = shard * per_shard
    a = sel.idx.shape[0]
    mine = (jnp.arange(a, dtype=jnp.int32) < sel.n_active) & (sel.idx >= lo) & (sel.idx < lo + per_shard)
    idx, n = compact_slots(sel.idx - lo, mine, min(a, per_shard))
    return MLPSelection(idx, n)


def shards_own_union(selector: Any, tensor: int) -> bool:
    """Whether the selector's MLP union runs per shard on its shard of the router (threshold rule)."""
    return (tensor > 1 and isinstance(selector, RouterSelector) and selector.use_mlp
            and selector.mlp_rule == "threshold")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner"],
                   meta_fields=["parallel", "groups", "neurons", "own_union", "rows"])
@dataclasses.dataclass(frozen=True)
class ShardSelector:
    """A DecodeSelector seen from one shard: returns the shard's own KV groups and neurons."""

    inner: Any
    parallel: Parallel
    groups: int  # KV groups per shard
    neurons: int  # MLP neurons per shard
    own_union: bool  # the inner selector already returns this shard's neurons
    rows: int | None = None  # real rows of the whole batch (the rest pad it to a multiple of "data")

    def attention(self, layer: int, router_input: jax.Array, live: jax.Array) -> AttentionSelection | None:
        sel = self.inner.attention(layer, router_input, live)
        if sel is None or self.parallel.tensor == 1:
            return sel
        return local_groups(sel, self.parallel.shard(), self.groups)

    def mlp(self, layer: int, router_input: jax.Array, live: jax.Array) -> MLPSelection | None:
        # the union is over the whole batch, whichever rows this device decodes
        x, live = self.parallel.all_rows(router_input), self.parallel.all_rows(live)
        if self.rows is not None and self.rows < x.shape[0]:  # padding rows are never live: drop them
            x, live = x[: self.rows], live[: self.rows]
        sel = self.inner.mlp(layer, x, live)
        if sel is None or sel.dense or self.own_union or self.parallel.tensor == 1:
            return sel
        return local_neurons(sel, self.parallel.shard(), self.neurons)


def selector_specs(selector: Any) -> Any:
    """PartitionSpecs of a selector's arrays: a threshold-rule RouterSelector's second MLP router matrix
    ([rank, N] or [N, rank]) by neurons over "tensor" (the per-shard union), everything else replicated."""
    specs = jax.tree.map(lambda _: P(), selector)
    if isinstance(selector, RouterSelector) and selector.use_mlp and selector.mlp_rule == "threshold":
        by_neuron = P(*(TENSOR if i == selector.mlp_neuron_axis else None for i in range(2)))
        specs = dataclasses.replace(specs, mlp_b=tuple(None if b is None else by_neuron for b in selector.mlp_b))
    return specs


def for_shard(selector: Any, mesh: Mesh, cfg: ModelConfig, rows: int | None = None) -> Any:
    """Wraps a selector (inside the shard_map) so that it answers for this shard. `rows`: how many leading
    rows of the (whole, gathered) batch are real when it was padded to a multiple of "data"."""
    if selector is None:
        return None
    data, tensor = mesh_shape(mesh)
    return ShardSelector(selector, Parallel(tensor, data), cfg.num_kv_heads // tensor,
                         cfg.intermediate_size // tensor, shards_own_union(selector, tensor), rows)


def parallel_of(mesh: Mesh) -> Parallel:
    data, tensor = mesh_shape(mesh)
    return Parallel(tensor, data)


def on_mesh(fn, mesh: Mesh, in_specs: tuple, out_specs: Any):
    """`fn` under shard_map on the mesh (inside a jit). Replication is not type-checked (`check_vma`):
    Pallas calls do not carry the annotations, and the layer code keeps its own invariant (every value
    outside a layer's two partial sums is identical across a tensor group, `Parallel.reduce`)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def per_shard(run, mesh: Mesh | None, args: tuple, specs):
    """`run(*args)` on one device, or on a tensor-parallel mesh under shard_map with `parallel=` this mesh's
    `Parallel`; `specs(*args)` gives (in_specs, out_specs), computed only on a mesh."""
    if not is_parallel(mesh):
        return run(*args)
    in_specs, out_specs = specs(*args)
    return on_mesh(lambda *a: run(*a, parallel=parallel_of(mesh)), mesh, in_specs, out_specs)(*args)
