"""The decoder shared by all families: one residual block, one layer function, three entry points.

`Block.__call__(x, kv, step, layer) -> (x, kv)` is the only per-layer code path. `step` (a `Step`) says
which of three modes runs:
- "full": causal attention over the whole sequence, no cache (evaluation, activation collection,
  masked sparse evaluation through a `Sparsifier`);
- "prefill": the same attention, and the prompt's keys/values written into the layer's cache rows;
- "decode": one token per row appended to the cache and attention over it, dense or through the
  selective kernels with the selections a `DecodeSelector` returns for this layer.
The layer returns the updated `LayerKV` instead of writing anywhere (no side effects besides `sow` when
collecting router data), so the stack is a plain loop that threads the cache through.

Families differ only in embeddings, norms, positions and the final projection (see llama.py, opt.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import (dense_decode_xla, gather_down, gather_up, gather_up_gated, resolve_impl, select_decode,
                            select_decode_union, triton_gpu_available)
from pallas_kernels.split_sum import SplitSum
from polar_jax.cache import KVCache, LayerKV
from polar_jax.config import ModelConfig
from polar_jax.errors import InputError
from polar_jax.models.layers import (F32, MLP, Attention, LayerNorm, Residual, RMSNorm, apply_rope, causal_attention,
                                     profile_part, rope_inv_freq, uses_row_norm)
from polar_jax.selection import AttentionSelection, MLPSelection, UnionRequest
from polar_jax.validate import check_model_input

MODES = ("full", "prefill", "decode")
# Named scopes of the decode step's parts: the profile breakdown (polar_jax/bench/breakdown.py) maps each
# GPU kernel to the part whose scope its HLO op carries.
SCOPES = {"proj": "polar_attn_proj", "router": "polar_router", "attention": "polar_attn_core",
          "mlp": "polar_mlp", "allreduce": "polar_allreduce"}
# The step's parts as the profile breakdown (polar_jax.bench.breakdown) names them, per scope
SCOPE_PARTS = {"proj": "attn_proj", "router": "router", "attention": "attention", "mlp": "mlp"}


@contextlib.contextmanager
def part_scope(key: str) -> Iterator[None]:
    """Trace one part of the layer: XLA's kernels carry its named scope in their HLO metadata, the Pallas GEMVs
    its name in theirs (`layers.profile_part`), so a profile can put both in the same part."""
    with jax.named_scope(SCOPES[key]), profile_part(SCOPE_PARTS.get(key)):
        yield


class Sparsifier(Protocol):
    """Hooks for masked (simulated) sparsity in full-sequence evaluation.

    Each returns a 0/1 mask or None (dense). Masks multiply per-unit attention outputs and MLP activations;
    a "unit" is a query head for MHA and a KV group for GQA (`heads_mask` may return either shape).
    """

    def heads_mask(self, layer: int, router_input: jax.Array, head_out: jax.Array) -> jax.Array | None:
        """router_input [B,T,d], head_out [B,T,Hq,D] -> mask [B,T,Hq] or [B,T,Hkv]."""

    def neurons_mask(self, layer: int, router_input: jax.Array, act: jax.Array) -> jax.Array | None:
        """router_input [B,T,d], act [B,T,N] -> mask broadcastable to [B,T,N]."""


class DecodeSelector(Protocol):
    """Chooses what a sparse decode step computes, per layer, from that layer's router input [B, d] and
    the live-row mask [B] (rows that are not live must not influence a shared choice)."""

    def attention(self, layer: int, router_input: jax.Array, live: jax.Array) -> AttentionSelection | None:
        """The KV groups each row attends over, or None for dense attention in this layer."""

    def mlp(self, layer: int, router_input: jax.Array, live: jax.Array) -> MLPSelection | None:
        """The neurons the batch computes, or None for a dense MLP in this layer."""

    # Optional:
    # - `union_request(layer, router_input, live, product=None) -> UnionRequest | None`: this layer's MLP
    #   selection before it is computed, which the step then runs in attention's launches instead of calling `mlp`;
    # - `first_product_weight(layer, batch) -> Array | None`: an out-major [N, d] weight whose float32 product with
    #   the router input the step computes in its Q/K/V launch and passes as `product=` to `attention`,
    #   `union_request` and `mlp` (the selection then comes after the Q/K/V projections).


def union_request(selector: Any, layer: int, router_input: jax.Array, live: jax.Array,
                  product: jax.Array | None = None) -> UnionRequest | None:
    """The selector's deferred MLP selection for `layer`, if it offers one (`DecodeSelector` above)."""
    request = getattr(selector, "union_request", None)
    if request is None:
        return None
    return request(layer, router_input, live, **({} if product is None else {"product": product}))


def first_product_weight(selector: Any, layer: int, batch: int) -> jax.Array | None:
    """The weight of the routers' first product the step should compute with Q/K/V, if the selector asks."""
    ask = getattr(selector, "first_product_weight", None)
    return None if ask is None else ask(layer, batch)


@dataclasses.dataclass(frozen=True)
class Step:
    """Everything a layer needs besides its weights, its input and its cache (built inside the jit)."""

    mode: str
    positions: jax.Array  # [B, T] positions of the tokens being processed
    inv_freq: jax.Array | None  # RoPE inverse frequencies (None: no rotary embedding)
    window: int | None
    scale: float
    lengths: jax.Array | None = None  # decode: keys per row after the append
    live: jax.Array | None = None  # decode: [B] rows that decode
    rows: jax.Array | None = None  # prefill: cache rows that receive the prompts (None: 0..b-1)
    dense_attention: AttentionSelection | None = None  # decode: every group, built once per step
    selector: Any = None
    sparsifier: Any = None
    collect: bool = False
    attn_impl: str = "xla"
    mlp_impl: str = "xla"
    # tensor parallelism (prefill / decode inside a shard_map): a `polar_jax.tensor_parallel.Parallel`; the
    # layer then holds some heads and neurons and sums its two partial outputs over the shards
    parallel: Any = None
    gemv_impl: str | None = None  # decode: kernel backend of the small-batch projections (None: XLA's dot)
    # the blocks' weights stacked along a leading layer axis (`CausalLM.stack_layers`): the layers then run
    # under one `lax.scan`, so XLA compiles one layer instead of `num_layers` copies
    stacked: "StackedBlocks | None" = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


def apply_unit_mask(heads: jax.Array, mask: jax.Array) -> jax.Array:
    """heads [..., Hq, D] times a mask over query heads [..., Hq] or over KV groups [..., Hkv]."""
    hq = heads.shape[-2]
    units = mask.shape[-1]
    if units != hq:
        mask = jnp.repeat(mask, hq // units, axis=-1)
    return heads * mask[..., None].astype(heads.dtype)


def head_output_norms(heads: jax.Array) -> jax.Array:
    """L2 norm of each head's attention output (before the output projection): [..., Hq, D] -> [..., Hq]."""
    return jnp.sqrt(jnp.sum(jnp.square(heads.astype(F32)), axis=-1))


def decode_attention(q: jax.Array, kv: LayerKV, step: Step, choice: AttentionSelection | None,
                     request: UnionRequest | None = None) -> tuple[jax.Array, MLPSelection | None]:
    """One query per row over its cache: q [B, Hq, D] -> ([B, Hq, D], the MLP selection of `request`). Dense
    with `choice` None (XLA's einsum, or the Pallas kernel with every group active: it reads the cache near
    HBM bandwidth and XLA's GQA einsum does not); rows that are not live read nothing through the kernel.
    A `request` (the layer's MLP selection, deferred by the selector) is computed in the same launches as the
    selective kernel where both run on one backend, else on its own."""
    if choice is None and step.attn_impl == "xla":
        out = dense_decode_xla(q, kv.k, kv.v, step.lengths, step.scale, step.window)
        return out, None if request is None else request.run()
    sel = (step.dense_attention if choice is None else choice).for_live(step.live)
    if request is not None and resolve_impl(request.impl) == resolve_impl(step.attn_impl):
        out, idx, count = select_decode_union(
            q, kv.k, kv.v, step.lengths, sel.groups, sel.n_active, request.u, request.w, request.live,
            request.threshold, request.capacity, sm_scale=step.scale, window=step.window, u_offset=request.u_offset,
            clamp_count=True, w_layout=request.w_layout, impl=step.attn_impl)
        return out, MLPSelection(idx, count)
    out = select_decode(q, kv.k, kv.v, step.lengths, sel.groups, sel.n_active, sm_scale=step.scale,
                        window=step.window, impl=step.attn_impl)
    return out, None if request is None else request.run()


def selected_units(choice: AttentionSelection | None, step: Step) -> tuple[jax.Array, jax.Array] | None:
    """At B=1 through the GEMV, the row's selected units (ids, count) for the attention projections: its
    other heads are never computed, so their query columns and output rows are not read (the queries of
    a one-row batch are its only ones; at B > 1 the union over rows would be nearly every head). Dense
    layers, larger batches, XLA's dot and tensor-parallel shards: None (every unit)."""
    if choice is None or step.gemv_impl is None or step.parallel is not None or choice.groups.shape[0] != 1:
        return None
    sel = choice.for_live(step.live)
    return sel.groups[0], sel.n_active[0]


def gemv_backend(impl: str, dtype) -> str | None:
    """The backend of the decode projections' GEMV, or None for XLA's dot. "auto" takes the Pallas kernel
    where it runs natively and the model is 16-bit (the kernel's GPU dtypes)."""
    if impl == "auto":
        native = triton_gpu_available() and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "triton" if native else None
    name = resolve_impl(impl)
    return None if name == "xla" else name


def dense_mlp(mlp: MLP, h: jax.Array, gemv: str | None = None, *, bias: bool = True,
              split_sum: bool = False) -> jax.Array | SplitSum:
    return mlp.project_down(mlp.activations(h, gemv), gemv, bias=bias, split_sum=split_sum)


def selective_mlp(mlp: MLP, h: jax.Array, idx: jax.Array, n_active: jax.Array, impl: str, *,
                  bias: bool = True, split_sum: bool = False) -> jax.Array | SplitSum:
    """MLP over the selected neurons only: h [B, d] -> [B, d] (gathered up/gate and down projections);
    `bias=False` leaves the down projection's bias out (a tensor-parallel partial sum); `split_sum`: the
    output as a `SplitSum` (its epilogue left to the next norm's kernel)."""
    if mlp.gated:
        act = gather_up_gated(h, mlp.gate[...], mlp.up[...], idx, n_active, impl=impl)
    else:
        up_bias = mlp.up_bias[...] if mlp.up_bias is not None else None
        act = gather_up(h, mlp.up[...], idx, n_active, bias=up_bias, activation=mlp.act, impl=impl)
    down_bias = mlp.down_bias[...] if bias and mlp.down_bias is not None else None
    return gather_down(act, mlp.down[...], idx, n_active, bias=down_bias, impl=impl, split_sum=split_sum)


def decode_mlp(mlp: MLP, h: jax.Array, choice: MLPSelection | None, impl: str, gemv: str | None = None, *,
               bias: bool = True, split_sum: bool = False) -> jax.Array | SplitSum:
    """h [B, d] -> [B, d]: dense, or the selective kernels over the selected neurons. The choice between
    them is static (a selector decides per layer at trace time): a run-time `lax.cond` here splits the
    step's CUDA graph and cost ~0.5 ms per step at B=32 on the H200."""
    if choice is None or choice.dense:
        return dense_mlp(mlp, h, gemv, bias=bias, split_sum=split_sum)
    return selective_mlp(mlp, h, choice.idx, choice.n_active, impl, bias=bias, split_sum=split_sum)


def sum_over_shards(partial: jax.Array, bias: nnx.Param | None, step: Step) -> jax.Array:
    """A layer part's output: as computed on one device, or under tensor parallelism this shard's partial
    sum (computed without the bias) reduced over the shards, plus the bias once."""
    if step.parallel is None:
        return partial
    with jax.named_scope(SCOPES["allreduce"]):
        return step.parallel.reduce(partial, None if bias is None else bias[...])


class Block(nnx.Module):
    """Attention + MLP residual block (pre-norm, or OPT's post-norm when `pre_norm` is False)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        norm = (lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)) if cfg.family == "llama" else (
            lambda: LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        )
        opt = cfg.family == "opt"
        self.attn_norm = norm()
        self.attn = Attention(
            cfg, dtype, rngs,
            qkv_bias=cfg.enable_bias if opt else cfg.qkv_bias,
            o_bias=cfg.enable_bias if opt else cfg.o_bias,
        )
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, dtype, rngs, gated=cfg.gated_mlp, bias=cfg.enable_bias if opt else cfg.mlp_bias)
        self.pre_norm = cfg.do_layer_norm_before if opt else True
        self.use_rope = not opt

    def defers_residual(self, x: jax.Array | Residual, step: Step) -> bool:
        """True where this layer leaves each sublayer's output to the next norm's kernel (`Residual`): decode
        with one-kernel norms (B=1), pre-norm, one device, layers unrolled (a scanned carry keeps one type)."""
        rows = x.x if isinstance(x, Residual) else x
        return (step.mode == "decode" and self.pre_norm and step.parallel is None and step.stacked is None
                and uses_row_norm(step.gemv_impl, rows))

    def __call__(self, x: jax.Array | Residual, kv: LayerKV | None, step: Step,
                 layer: int) -> tuple[jax.Array | Residual, LayerKV | None]:
        """x [B, T, d] -> (x, the layer's cache after this step). T = 1 in decode mode. Where
        `defers_residual`, x arrives and leaves as a `Residual` (the MLP's output not yet added)."""
        norm_kernel = step.gemv_impl  # set in decode only: one-kernel norms at small batch
        defer = self.defers_residual(x, step)
        if isinstance(x, Residual):
            x, h = self.attn_norm.add_and_norm(x, norm_kernel)  # the previous layer's MLP output added here
        else:
            h = self.attn_norm(x, norm_kernel) if self.pre_norm else x
        choice = units = request = pending = product = first = None
        if step.mode == "decode" and step.selector is not None:
            # the routers' first product from the Q/K/V launch (B > 1: the projections need no selection), or the
            # selection first (at B=1 it restricts the Q/K/V GEMV to the selected heads)
            first = first_product_weight(step.selector, layer, h.shape[0])
            if first is None:
                choice, request = self._route(h, step, layer)
                units = selected_units(choice, step)
        with part_scope("proj"):
            q, k, v, *rest = self.attn.qkv(h, step.gemv_impl, units, first)
            if self.use_rope:
                q, k = apply_rope(q, step.positions, step.inv_freq), apply_rope(k, step.positions, step.inv_freq)
        if first is not None:
            product = rest[0][:, 0]
            choice, request = self._route(h, step, layer, product)
        if step.mode == "decode":
            if step.collect and choice is not None:
                self.sow(nnx.Intermediate, "attn_n_active", choice.for_live(step.live).n_active)
            with part_scope("attention"):
                kv = kv.append(k[:, 0], v[:, 0], step.positions[:, 0], step.live, step.gemv_impl)
                heads, pending = decode_attention(q[:, 0], kv, step, choice, request)
                heads = heads[:, None]
        else:
            if step.mode == "prefill":
                kv = kv.write_prompt(k, v, step.rows)
            heads = causal_attention(q, k, v, step.window, step.scale)
            if step.sparsifier is not None:
                mask = step.sparsifier.heads_mask(layer, h, heads)
                if mask is not None:
                    heads = apply_unit_mask(heads, mask)
        if step.collect:
            # Router data (PAPER.md): both routers read the pre-attention norm output; head labels come
            # from each head's output norm before the output projection.
            self.sow(nnx.Intermediate, "router_input", h)
            self.sow(nnx.Intermediate, "head_norm", head_output_norms(heads))
        with part_scope("proj"):
            partial = self.attn.out(heads, step.gemv_impl, bias=step.parallel is None, units=units, split_sum=defer)
        if defer:
            x, h2 = self.mlp_norm.add_and_norm(Residual(x, partial), norm_kernel)
            return Residual(x, self._mlp_partial(h2, h, step, layer, split_sum=True, pending=pending,
                                                 product=product)), kv
        x = x + sum_over_shards(partial, self.attn.o_bias, step)
        if not self.pre_norm:
            x = self.attn_norm(x, norm_kernel)
        h2 = self.mlp_norm(x, norm_kernel) if self.pre_norm else x
        x = x + self._mlp(h2, h, step, layer, pending, product)
        if not self.pre_norm:
            x = self.mlp_norm(x, norm_kernel)
        return x, kv

    def _route(self, h: jax.Array, step: Step, layer: int,
               product: jax.Array | None = None) -> tuple[AttentionSelection | None, UnionRequest | None]:
        """The decode selector's head selection for this layer and its deferred MLP selection (if it offers one);
        `product`: the routers' first product where the step computed it with Q/K/V."""
        x, kw = h[:, 0], {} if product is None else {"product": product}
        with part_scope("router"):
            return (step.selector.attention(layer, x, step.live, **kw),
                    union_request(step.selector, layer, x, step.live, product))

    def _mlp(self, h2: jax.Array, router_input: jax.Array, step: Step, layer: int,
             pending: MLPSelection | None = None, product: jax.Array | None = None) -> jax.Array:
        return sum_over_shards(self._mlp_partial(h2, router_input, step, layer, pending=pending, product=product),
                               self.mlp.down_bias, step)

    def _mlp_partial(self, h2: jax.Array, router_input: jax.Array, step: Step, layer: int,
                     split_sum: bool = False, pending: MLPSelection | None = None,
                     product: jax.Array | None = None) -> jax.Array | SplitSum:
        """`pending`: the MLP selection already computed with attention (the selector's `union_request`);
        `product`: the routers' first product computed with Q/K/V (the selector's `first_product_weight`)."""
        bias = step.parallel is None
        if step.mode == "decode":
            choice = pending
            if pending is None and step.selector is not None:
                with part_scope("router"):
                    kw = {} if product is None else {"product": product}
                    choice = step.selector.mlp(layer, router_input[:, 0], step.live, **kw)
            if step.collect and choice is not None:
                self.sow(nnx.Intermediate, "mlp_n_active", jnp.int32(-1) if choice.dense else choice.n_active)
            with part_scope("mlp"):
                out = decode_mlp(self.mlp, h2[:, 0], choice, step.mlp_impl, step.gemv_impl, bias=bias,
                                 split_sum=split_sum)
                return out if split_sum else out[:, None]
        if step.mode == "prefill" or (step.sparsifier is None and not step.collect):
            return dense_mlp(self.mlp, h2, bias=bias)
        act = self.mlp.activations(h2)
        if step.collect and self.mlp.act == "relu" and not self.mlp.gated:
            self.sow(nnx.Intermediate, "mlp_active", act > 0)
        if step.sparsifier is not None:
            mask = step.sparsifier.neurons_mask(layer, router_input, act)
            if mask is not None:
                act = act * mask.astype(act.dtype)
        return self.mlp.project_down(act, bias=bias)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedBlocks:
    """Every block's weights with a leading layer axis [L, ...], and the graph one block is rebuilt from."""

    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    state: Any

    @property
    def num_layers(self) -> int:
        return jax.tree.leaves(self.state)[0].shape[0]


def scan_blocks(stacked: StackedBlocks, x: jax.Array, cache: KVCache | None,
                step: Step) -> tuple[jax.Array, list[LayerKV | None]]:
    """The layer loop as one `lax.scan` over the stacked weights (and the cache's layers, stacked on the
    way in and split on the way out). Dense layers only: a selector, a sparsifier and `collect` decide per
    layer at trace time (static k tables, sown values), which a traced layer index cannot."""
    if step.selector is not None or step.sparsifier is not None or step.collect:
        raise InputError("stacked (scanned) layers run dense only: no selector, sparsifier or collect")
    kvs = None if cache is None else LayerKV(jnp.stack(cache.k), jnp.stack(cache.v))

    def body(x: jax.Array, layer: tuple) -> tuple[jax.Array, LayerKV | None]:
        state, kv = layer
        return nnx.merge(stacked.graphdef, state)(x, kv, step, -1)

    x, out = jax.lax.scan(body, x, (stacked.state, kvs))
    n = stacked.num_layers
    return x, [None] * n if out is None else [LayerKV(out.k[i], out.v[i]) for i in range(n)]


class CausalLM(nnx.Module):
    """Common decoder stack. Subclasses provide `embed(tokens, positions)` and `logits(x)`."""

    config: ModelConfig

    def _init_blocks(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    @property
    def dtype(self):
        return self.layers[0].attn.q[...].dtype

    def _inv_freq(self) -> jax.Array | None:
        if self.config.family != "llama":
            return None
        return rope_inv_freq(self.config.rope, self.config.head_dim)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        raise NotImplementedError

    def output_norm(self) -> RMSNorm | LayerNorm | None:
        """The norm after the last layer (None where the model has none)."""
        raise NotImplementedError

    def head(self, h: jax.Array) -> jax.Array:
        """Logits [..., V] (float32) from the final norm's output h [..., d]."""
        raise NotImplementedError

    def logits(self, x: jax.Array | Residual, kernel: str | None = None) -> jax.Array:
        """Logits [..., V] from the last layer's output. A `Residual` (the B=1 decode step's last MLP output
        still pending) is finished by the final norm's one kernel (`add_and_norm`, backend `kernel`), as
        every layer's own norms finish the sublayer before them; otherwise the norm runs through XLA."""
        norm = self.output_norm()
        if isinstance(x, Residual):
            return self.head(norm.add_and_norm(x, kernel)[1] if norm is not None else x.resolve())
        return self.head(norm(x) if norm is not None else x)

    def _step(self, mode: str, positions: jax.Array, **kw) -> Step:
        return Step(mode=mode, positions=positions, inv_freq=self._inv_freq(), window=self.config.sliding_window,
                    scale=self.scale, **kw)

    def stack_layers(self) -> StackedBlocks:
        """A copy of the blocks' weights stacked along a leading layer axis, for `stacked=` (made once,
        outside the jit: it holds a second copy of the layer weights)."""
        graphdef, _ = nnx.split(self.layers[0])
        states = [nnx.split(block)[1] for block in self.layers]
        return StackedBlocks(graphdef, jax.tree.map(lambda *w: jnp.stack(w), *states))

    def run_layers(self, x: jax.Array, cache: KVCache | None,
                   step: Step) -> tuple[jax.Array | Residual, list[LayerKV | None]]:
        """The layer loop, shared by every mode: threads x and each layer's cache through the blocks
        (unrolled, or under `lax.scan` when the step carries stacked weights). In decode, where the blocks
        defer their residual adds (`Block.defers_residual`), x comes back as a `Residual` for `logits`."""
        if step.stacked is not None:
            return scan_blocks(step.stacked, x, cache, step)
        new = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, cache.layer(i) if cache is not None else None, step, i)
            new.append(kv)
        return x, new

    # ---- full-sequence -------------------------------------------------------------------------------
    def __call__(
        self, tokens: jax.Array, *, sparsifier: Sparsifier | None = None, collect: bool = False,
        stacked: StackedBlocks | None = None,
    ) -> jax.Array:
        """Causal logits [B, T, V] for token ids [B, T] (positions 0..T-1, no cache). `stacked`
        (`stack_layers()`): the same layers under one `lax.scan`."""
        check_model_input(self.config, tokens)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, _ = self.run_layers(self.embed(tokens, positions), None,
                               self._step("full", positions, sparsifier=sparsifier, collect=collect,
                                          stacked=stacked))
        return self.logits(x)

    # ---- prefill -------------------------------------------------------------------------------------
    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
                rows: jax.Array | None = None, parallel: Any = None,
                stacked: StackedBlocks | None = None) -> tuple[jax.Array, KVCache]:
        """Dense pass over right-padded prompts [b, T] with true `lengths` [b]; writes K/V at positions
        0..T-1 of cache rows `rows` [b] (default: rows 0..b-1, b = the cache's batch; padding slots are
        overwritten by decode before they are ever read). Returns the logits of each prompt's last real
        token [b, V] and the cache with those rows' lengths set and marked live. `parallel`, `stacked`: see
        `decode`."""
        b, t = tokens.shape
        if rows is None and b != cache.batch:
            rows = jnp.arange(b, dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, layers = self.run_layers(self.embed(tokens, positions), cache,
                                    self._step("prefill", positions, rows=rows, parallel=parallel,
                                               stacked=stacked))
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        lengths = lengths.astype(jnp.int32)
        if rows is None:
            new_len, live = lengths, jnp.ones((b,), bool)
        else:
            new_len = cache.lengths.at[rows].set(lengths)
            live = cache.live_rows().at[rows].set(True)
        return self.logits(last), cache.with_layers(layers, new_len, live)

    # ---- decode --------------------------------------------------------------------------------------
    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        selector: DecodeSelector | None = None,
        attn_impl: str = "auto",
        mlp_impl: str = "auto",
        collect: bool = False,
        gemv_impl: str = "auto",
        parallel: Any = None,
        stacked: StackedBlocks | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """One new token per row: tokens [B] at positions `cache.lengths`. Returns logits [B, V] and the
        cache with the new K/V written and lengths + 1 on live rows (other rows stay as they are). With a
        `selector`, attention runs only over the selected KV groups (Pallas `select_decode`) and the MLP
        over the selected neurons (`gather_up` / `gather_down`); layers where it returns None stay dense.
        `attn_impl="auto"` runs dense attention through the Pallas kernel on CUDA GPUs and through the XLA
        einsum elsewhere. `collect` sows each layer's router input and selection sizes (`attn_n_active`
        per row, `mlp_n_active`, -1 for a dense MLP) as `nnx.Intermediate`. `gemv_impl` runs the dense
        projections of small batches through the Pallas GEMV ("auto": on CUDA GPUs for 16-bit models, where
        `pallas_kernels.prefers_gemv` says it is faster; "xla": never). `parallel` (a
        `polar_jax.tensor_parallel.Parallel`, set inside the tensor-parallel step's shard_map): this call sees
        one shard's heads, neurons and cache heads, and `selector` returns that shard's selections.
        `stacked` (`stack_layers()`): the layers run under one `lax.scan` over those weights (dense only;
        compile-time and step-time trade-off in docs/ARCHITECTURE.md)."""
        b = tokens.shape[0]
        live = cache.live_rows()
        pos = cache.lengths.astype(jnp.int32)
        positions = pos[:, None]
        new_len = jnp.where(live, pos + 1, pos)
        step = self._step(
            "decode", positions, lengths=jnp.where(live, new_len, 0), live=live, selector=selector,
            dense_attention=AttentionSelection.all_groups(b, cache.k[0].shape[2]),  # this shard's KV groups
            attn_impl=resolve_impl(attn_impl), mlp_impl=resolve_impl(mlp_impl), collect=collect, parallel=parallel,
            gemv_impl=gemv_backend(gemv_impl, self.dtype), stacked=stacked,
        )
        x, layers = self.run_layers(self.embed(tokens[:, None], positions), cache, step)
        return self.logits(x, step.gemv_impl)[:, 0], cache.with_layers(layers, new_len, cache.live)
