"""What a sparse decode step computes, as typed values, and the selection rules that produce them.

- `AttentionSelection(groups [B, A], n_active [B])`: per sequence, the KV groups (query heads for MHA)
  it attends over: the first `n_active[b]` slots of `groups[b]` are live. A row with `n_active` 0 reads
  no KV at all (a padded or finished row).
- `MLPSelection(idx [A], n_active, dense)`: the neurons the whole batch computes (the union over live
  rows): the first `n_active` entries of `idx` are live; `dense` (static) asks for the dense MLP.
  A union larger than the static capacity A keeps its A lowest neuron ids (`capped_union_mask` is the
  same rule for masked evaluation); calibration sizes A so that this is rare.
- `UnionRequest`: an MLP selection by the threshold rule before it is computed (the fused kernel's inputs),
  which the decode step may compute in the same launches as attention.

The rules are pure `jnp` so the masked (simulated) evaluation and the real decode step choose exactly
the same units from the same scores. None of them sorts: on the GPU `lax.top_k`/`argsort` over 16k MLP
scores cost about 50 us per layer (H200, benchmarks/results/decode_diag_2026-11-28.md), more than the
MLP sparsity saves.
- Heads: `rank_units` ranks every unit against every other one ([B, U, U] comparisons; U <= 128), giving
  the per-sequence top-k in score order (`top_units`; both defined beside the kernel that does it in one
  launch on the GPU, `pallas_kernels.unit_top_k`); `adaptive_counts` turns a calibrated
  threshold into per-sequence budgets (input-adaptive heads) with a floor and a cap;
  `balanced_top_units` / `balanced_unit_mask` keep each row's best units per tensor-parallel shard.
- MLP: `union_threshold_mask` keeps a neuron when any live row's router logit passes the layer's
  calibrated threshold (the union of per-row predictions), and `compact` turns the mask into ascending
  indices (so the gather kernels stream the weight rows in memory order) with a cumulative sum.
  `union_topk` is the paper's rule (top-k of batch-summed ReLU scores), kept as a reference mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.union_select import union_select
# the heads' ranking rule lives beside the kernel that computes it on the GPU (one definition for every path)
from pallas_kernels.unit_top_k_xla import rank_units, top_units  # noqa: F401 (re-exported)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionSelection:
    groups: jax.Array  # [B, A] int32: KV group per slot (slots >= n_active[b] are ignored)
    n_active: jax.Array  # [B] int32: live slots per row, 0 for a row that reads no KV

    @classmethod
    def all_groups(cls, batch: int, num_groups: int) -> "AttentionSelection":
        """Every group for every row (dense attention through the selective kernel)."""
        groups = jnp.broadcast_to(jnp.arange(num_groups, dtype=jnp.int32), (batch, num_groups))
        return cls(groups, jnp.full((batch,), num_groups, jnp.int32))

    def for_live(self, live: jax.Array | None) -> "AttentionSelection":
        """Rows that are not live read nothing."""
        if live is None:
            return self
        return AttentionSelection(self.groups, jnp.where(live, self.n_active, 0).astype(jnp.int32))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["idx", "n_active"], meta_fields=["dense"])
@dataclasses.dataclass(frozen=True)
class MLPSelection:
    idx: jax.Array  # [A] int32 neuron ids (entries >= n_active are ignored)
    n_active: jax.Array  # int32 scalar, <= A
    dense: bool = False  # static: compute the dense MLP instead

    @classmethod
    def of(cls, idx: jax.Array, n_active: jax.Array | int) -> "MLPSelection":
        return cls(jnp.asarray(idx, jnp.int32), jnp.asarray(n_active, jnp.int32))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["u", "w", "live", "threshold"],
                   meta_fields=["capacity", "u_offset", "w_layout", "impl"])
@dataclasses.dataclass(frozen=True)
class UnionRequest:
    """An MLP selection by the threshold rule, not yet computed: the inputs of `pallas_kernels.union_select`
    (the router product u, the router's second matrix w, the live rows, the threshold, the static capacity).
    The decode step can run it inside attention's launches (`pallas_kernels.select_decode_union`), since it
    needs nothing that attention computes; `run` computes it alone. The count is clamped to the capacity."""

    u: jax.Array  # [B, u_offset + r]
    w: jax.Array  # [r, N] ("rn") or [N, r] ("nr")
    live: jax.Array  # [B] bool
    threshold: jax.Array  # float32 scalar
    capacity: int
    u_offset: int = 0
    w_layout: str = "rn"
    impl: str = "auto"

    def run(self) -> MLPSelection:
        idx, count = union_select(self.u, self.w, self.live, self.threshold, self.capacity, impl=self.impl,
                                  u_offset=self.u_offset, clamp_count=True, w_layout=self.w_layout)
        return MLPSelection(idx, count)


# ---- heads ------------------------------------------------------------------------------------------
def unit_mask(scores: jax.Array, counts: jax.Array | int) -> jax.Array:
    """0/1 float mask of each row's `counts` best units ([..., U]; counts broadcast over [...])."""
    counts = jnp.asarray(counts, jnp.int32)
    return (rank_units(scores) < counts[..., None]).astype(jnp.float32)


def adaptive_counts(scores: jax.Array, threshold: jax.Array | float, floor: int, cap: int) -> jax.Array:
    """Input-adaptive budgets: per row, the units scoring above `threshold`, clipped to [floor, cap]."""
    n = jnp.sum(scores > threshold, axis=-1, dtype=jnp.int32)
    return jnp.clip(n, floor, cap).astype(jnp.int32)


def compact_slots(ids: jax.Array, valid: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Per row of ids [..., M], the valid entries in their order moved to the front of `capacity` slots
    (zeros after), and their count [...] (entries past the capacity are dropped). No sort: a running count
    gives each valid entry its slot."""
    lead, m = ids.shape[:-1], ids.shape[-1]
    ids2, valid2 = ids.reshape(-1, m).astype(jnp.int32), valid.reshape(-1, m)
    slot = jnp.where(valid2, jnp.cumsum(valid2, axis=-1, dtype=jnp.int32) - 1, capacity)
    rows = jnp.arange(ids2.shape[0])[:, None]
    out = jnp.zeros((ids2.shape[0], capacity), jnp.int32).at[rows, slot].set(ids2, mode="drop")
    count = jnp.minimum(jnp.sum(valid2, axis=-1, dtype=jnp.int32), capacity)
    return out.reshape(*lead, capacity), count.reshape(lead)


# ---- heads, balanced over tensor-parallel shards ----------------------------------------------------
# Under tensor parallelism shard j holds units [j*U/n, (j+1)*U/n); the slowest shard sets the step time.
# The balanced rule keeps each row's best units *per shard* (ceil(k/n) on every shard) instead of its k
# best overall. It is a selection rule like any other: one device can run it too (the reference for the
# sharded step, and the masked evaluation of its accuracy).
def shard_budget(k: int, shards: int) -> int:
    """Units each shard keeps for a global budget k: ceil(k / shards)."""
    return -(-int(k) // int(shards))


def balanced_top_units(scores: jax.Array, k: int, shards: int) -> jax.Array:
    """Per row, the k best units of every shard, shard after shard: [..., U] -> [..., shards * k] ids."""
    u = scores.shape[-1]
    per = scores.reshape(*scores.shape[:-1], shards, u // shards)
    local = top_units(per, k) + (jnp.arange(shards, dtype=jnp.int32) * (u // shards))[:, None]
    return local.reshape(*scores.shape[:-1], shards * k)


def balanced_unit_mask(scores: jax.Array, counts: jax.Array | int, shards: int) -> jax.Array:
    """0/1 float mask of each row's `counts` best units within every shard (counts [..., shards] or a
    scalar): [..., U]."""
    u = scores.shape[-1]
    per = scores.reshape(*scores.shape[:-1], shards, u // shards)
    keep = rank_units(per) < jnp.asarray(counts, jnp.int32)[..., None]
    return keep.reshape(scores.shape).astype(jnp.float32)


# ---- MLP union --------------------------------------------------------------------------------------
def union_threshold_mask(logits: jax.Array, threshold: jax.Array | float, live: jax.Array | None = None,
                         axis: int = 0) -> jax.Array:
    """Neurons predicted active for any live row: max over rows (`axis`) of the logits > threshold."""
    if live is not None:
        shape = [1] * logits.ndim
        shape[axis] = live.shape[0]
        logits = jnp.where(live.reshape(shape), logits, -jnp.inf)
    return jnp.max(logits, axis=axis) > threshold


def capped_union_mask(keep: jax.Array, capacity: int) -> jax.Array:
    """The union as the decode step computes it when it exceeds its capacity: the `capacity` lowest
    neuron ids of the mask (last axis)."""
    return keep & (jnp.cumsum(keep.astype(jnp.int32), axis=-1) <= capacity)


def union_scores(logits: jax.Array, live: jax.Array | None = None, axis: int = 0) -> jax.Array:
    """The paper's batch scores: ReLU'd router logits summed over the live rows."""
    r = jax.nn.relu(logits)
    if live is not None:
        shape = [1] * logits.ndim
        shape[axis] = live.shape[0]
        r = jnp.where(live.reshape(shape), r, 0.0)
    return jnp.sum(r, axis=axis)


def union_topk(logits: jax.Array, k: jax.Array | int, capacity: int,
               live: jax.Array | None = None) -> MLPSelection:
    """The paper's union rule (reference mode; sorts): the top `k` (<= capacity) neurons of
    `union_scores`, in score order."""
    idx = jax.lax.top_k(union_scores(logits, live), capacity)[1]
    return MLPSelection.of(idx, jnp.minimum(jnp.asarray(k, jnp.int32), capacity))


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """0/1 float mask over the last axis with exactly k ones (the k largest; ties by index)."""
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.float32), axis=-2)


def keep_prefix_dense(mask: jax.Array, start: int, time_axis: int = 1) -> jax.Array:
    """Masked evaluation: positions before `start` stay dense (the prompt is prefilled densely)."""
    if start <= 0:
        return mask
    t = mask.shape[time_axis]
    shape = [1] * mask.ndim
    shape[time_axis] = t
    before = (jnp.arange(t) < start).reshape(shape)
    return jnp.where(before, 1.0, mask)
