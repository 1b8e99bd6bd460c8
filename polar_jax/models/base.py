"""The decoder shared by all families: one residual block type and three ways to run the stack.

- `__call__(tokens)`: full-sequence causal logits `[B, T, V]` (evaluation, activation collection,
  masked sparse evaluation through a `Sparsifier`).
- `prefill(tokens, lengths, cache)`: dense prompt pass that writes the KV cache.
- `decode(tokens, cache, selector=None)`: one token per sequence against the cache, dense or sparse.

Families differ only in embeddings, norms, positions and the final projection (see llama.py, opt.py).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax.cache import KVCache
from polar_jax.config import ModelConfig
from polar_jax.models.layers import (
    F32,
    MLP,
    Attention,
    LayerNorm,
    RMSNorm,
    apply_rope,
    cached_decode_attention,
    causal_attention,
    rope_inv_freq,
)


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
    """Chooses what a sparse decode step computes, per layer, from that layer's router input [B, d]."""

    def attention(self, layer: int, router_input: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """-> (groups [B, A] int32, n_active [B] int32), or None for dense attention in this layer."""

    def mlp(self, layer: int, router_input: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """-> (neuron idx [A] int32, n_active int32 scalar), or None for a dense MLP in this layer."""


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

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array | None,
        attend: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
        mlp_fn: Callable[[MLP, jax.Array], jax.Array],
        collect: bool = False,
    ) -> jax.Array:
        h = self.attn_norm(x) if self.pre_norm else x
        q, k, v = self.attn.qkv(h)
        if self.use_rope:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        heads = attend(q, k, v, h)
        if collect:
            # Router data (PAPER.md): both routers read the pre-attention norm output; head labels come
            # from each head's output norm before the output projection.
            self.sow(nnx.Intermediate, "router_input", h)
            self.sow(nnx.Intermediate, "head_norm", head_output_norms(heads))
        x = x + self.attn.out(heads)
        if not self.pre_norm:
            x = self.attn_norm(x)
        h2 = self.mlp_norm(x) if self.pre_norm else x
        x = x + mlp_fn(self.mlp, h2)
        if not self.pre_norm:
            x = self.mlp_norm(x)
        return x


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

    def logits(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    # ---- full-sequence -------------------------------------------------------------------------------
    def __call__(
        self, tokens: jax.Array, *, sparsifier: Sparsifier | None = None, collect: bool = False
    ) -> jax.Array:
        """Causal logits [B, T, V] for token ids [B, T] (positions 0..T-1, no cache)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens, positions)
        inv_freq = self._inv_freq()
        window = self.config.sliding_window
        for i, block in enumerate(self.layers):

            def attend(q, k, v, h, i=i):
                heads = causal_attention(q, k, v, window, self.scale)
                if sparsifier is not None:
                    mask = sparsifier.heads_mask(i, h, heads)
                    if mask is not None:
                        heads = apply_unit_mask(heads, mask)
                return heads

            def mlp_fn(mlp, h, i=i, block=block):
                act = mlp.activations(h)
                if collect and mlp.act == "relu" and not mlp.gated:
                    block.sow(nnx.Intermediate, "mlp_active", act > 0)
                if sparsifier is not None:
                    mask = sparsifier.neurons_mask(i, h, act)
                    if mask is not None:
                        act = act * mask.astype(act.dtype)
                return mlp.project_down(act)

            x = block(x, positions, inv_freq, attend, mlp_fn, collect=collect)
        return self.logits(x)

    # ---- prefill -------------------------------------------------------------------------------------
    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Dense pass over right-padded prompts [B, T] with true `lengths` [B]; writes K/V at positions
        0..T-1 (padding slots are overwritten by decode before they are ever read). Returns the logits of
        each prompt's last real token [B, V] and the cache with `lengths` set."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens, positions)
        inv_freq = self._inv_freq()
        window = self.config.sliding_window
        new_k, new_v = list(cache.k), list(cache.v)
        for i, block in enumerate(self.layers):

            def attend(q, k, v, h, i=i):
                new_k[i] = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, 0, 0, 0))
                new_v[i] = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, 0, 0, 0))
                return causal_attention(q, k, v, window, self.scale)

            x = block(x, positions, inv_freq, attend, _dense_mlp)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.logits(last), KVCache(tuple(new_k), tuple(new_v), lengths.astype(jnp.int32))

    # ---- decode --------------------------------------------------------------------------------------
    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        selector: DecodeSelector | None = None,
        attn_impl: str = "auto",
        mlp_impl: str = "auto",
    ) -> tuple[jax.Array, KVCache]:
        """One new token per sequence: tokens [B] at positions `cache.lengths`. Returns logits [B, V] and
        the cache with the new K/V written and lengths + 1. With a `selector`, attention runs only over the
        selected KV groups (Pallas `select_decode`) and the MLP over the selected neurons (`gather_up` /
        `gather_down`); layers where it returns None stay dense. `attn_impl="auto"` runs dense attention
        through the Pallas kernel on CUDA GPUs (it reads the cache near HBM bandwidth; XLA's GQA einsum
        does not) and through the XLA einsum elsewhere."""
        from pallas_kernels import resolve_impl

        attn_impl = resolve_impl(attn_impl)
        b = tokens.shape[0]
        pos = cache.lengths.astype(jnp.int32)
        positions = pos[:, None]
        x = self.embed(tokens[:, None], positions)
        inv_freq = self._inv_freq()
        window = self.config.sliding_window
        rows = jnp.arange(b)
        new_len = pos + 1
        new_k, new_v = list(cache.k), list(cache.v)
        for i, block in enumerate(self.layers):

            def attend(q, k, v, h, i=i):
                kc = cache.k[i].at[rows, pos].set(k[:, 0].astype(cache.k[i].dtype))
                vc = cache.v[i].at[rows, pos].set(v[:, 0].astype(cache.v[i].dtype))
                new_k[i], new_v[i] = kc, vc
                choice = selector.attention(i, h[:, 0]) if selector is not None else None
                if choice is None and attn_impl == "xla":
                    out = cached_decode_attention(q[:, 0], kc, vc, new_len, window, self.scale)
                else:
                    from pallas_kernels import select_decode

                    if choice is None:  # dense through the kernel: every group active
                        hkv = kc.shape[2]
                        groups = jnp.broadcast_to(jnp.arange(hkv, dtype=jnp.int32), (b, hkv))
                        n_active = jnp.full((b,), hkv, jnp.int32)
                    else:
                        groups, n_active = choice
                    out = select_decode(
                        q[:, 0], kc, vc, new_len, groups, n_active,
                        sm_scale=self.scale, window=window, impl=attn_impl,
                    )
                return out[:, None]

            def mlp_fn(mlp, h, i=i):
                choice = selector.mlp(i, h[:, 0]) if selector is not None else None
                if choice is None:
                    return _dense_mlp(mlp, h)
                idx, n_active = choice
                return _selective_mlp(mlp, h[:, 0], idx, n_active, mlp_impl)[:, None]

            x = block(x, positions, inv_freq, attend, mlp_fn)
        return self.logits(x[:, 0]), KVCache(tuple(new_k), tuple(new_v), new_len)


def _dense_mlp(mlp: MLP, h: jax.Array) -> jax.Array:
    return mlp.project_down(mlp.activations(h))


def _selective_mlp(mlp: MLP, h: jax.Array, idx: jax.Array, n_active: jax.Array, impl: str) -> jax.Array:
    """MLP over the active neurons only: h [B, d] -> [B, d]."""
    from pallas_kernels import gather_down, gather_up, gather_up_gated

    if mlp.gated:
        act = gather_up_gated(h, mlp.gate[...], mlp.up[...], idx, n_active, impl=impl)
    else:
        bias = mlp.up_bias[...] if mlp.up_bias is not None else None
        act = gather_up(h, mlp.up[...], idx, n_active, bias=bias, activation=mlp.act, impl=impl)
    bias = mlp.down_bias[...] if mlp.down_bias is not None else None
    return gather_down(act, mlp.down[...], idx, n_active, bias=bias, impl=impl)
