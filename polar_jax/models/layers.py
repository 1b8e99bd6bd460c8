"""Building blocks shared by the model families: norms, rotary embeddings, activations, attention math.

Weights use the layouts DESIGN.md fixes: attention projections `[in, out]` (x @ W), MLP weights
neuron-major (`up`/`gate` `[N, d]`, `down` `[N, d]`) so the selective GEMMs gather contiguous rows.
Reductions (norm statistics, softmax) run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.activations import get_activation
from polar_jax.config import ModelConfig, RopeConfig

F32 = jnp.float32
_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def _zeros_param(shape: tuple[int, ...], dtype) -> nnx.Param:
    # Parameters are always overwritten by a checkpoint; zeros keep construction cheap and deterministic.
    return nnx.Param(jnp.zeros(shape, dtype))


def _random_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, scale: float) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, F32) * scale).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(F32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF multiplies the weight after casting back to the input dtype.
        return self.weight[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(F32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(F32) + self.bias[...].astype(F32)).astype(x.dtype)


# HF activation names -> the names of the one shared implementation (pallas_kernels.activations).
_CANONICAL_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}


def canonical_activation(name: str) -> str:
    return _CANONICAL_ACTIVATION.get(name, name)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Inverse frequencies, including LLaMA-3.1 'llama3' wavelength-dependent scaling."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind != "llama3":
        return inv
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, H, D]; positions: [B, T]. HF's rotate-half convention."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None, scale: float) -> jax.Array:
    """Full-sequence causal attention. q [B,T,Hq,D], k/v [B,T,Hkv,D] -> per-head outputs [B,T,Hq,D]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * scale
    qpos = jnp.arange(t)[:, None]
    kpos = jnp.arange(t)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = jnp.where(allowed, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=F32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


class Attention(nnx.Module):
    """Q/K/V/O projections; the attention itself is chosen by the caller (full, prefill or cached decode)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, qkv_bias: bool, o_bias: bool):
        d, hq, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        scale = 1.0 / math.sqrt(d)
        self.q = _random_param(rngs, (d, hq * hd), dtype, scale)
        self.k = _random_param(rngs, (d, hkv * hd), dtype, scale)
        self.v = _random_param(rngs, (d, hkv * hd), dtype, scale)
        self.o = _random_param(rngs, (hq * hd, d), dtype, 1.0 / math.sqrt(hq * hd))
        self.q_bias = _zeros_param((hq * hd,), dtype) if qkv_bias else None
        self.k_bias = _zeros_param((hkv * hd,), dtype) if qkv_bias else None
        self.v_bias = _zeros_param((hkv * hd,), dtype) if qkv_bias else None
        self.o_bias = _zeros_param((d,), dtype) if o_bias else None
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, hd

    @staticmethod
    def _linear(x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, w[...], preferred_element_type=F32)
        if b is not None:
            y = y + b[...].astype(F32)
        return y.astype(x.dtype)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [..., d] -> q [..., Hq, D], k/v [..., Hkv, D]. Head counts follow the weights, so a tensor-parallel
        shard holding some of the heads runs the same code."""
        lead = x.shape[:-1]
        q = self._linear(x, self.q, self.q_bias).reshape(*lead, -1, self.head_dim)
        k = self._linear(x, self.k, self.k_bias).reshape(*lead, -1, self.head_dim)
        v = self._linear(x, self.v, self.v_bias).reshape(*lead, -1, self.head_dim)
        return q, k, v

    def out(self, heads: jax.Array, bias: bool = True) -> jax.Array:
        """Per-head outputs [..., H, D] -> [..., d]. `bias=False` leaves the output bias out (a tensor-parallel
        shard's partial sum: the bias is added once, after the reduction)."""
        flat = heads.reshape(*heads.shape[:-2], heads.shape[-2] * heads.shape[-1])
        return self._linear(flat, self.o, self.o_bias if bias else None)


class MLP(nnx.Module):
    """Gated (SwiGLU) or plain (OPT fc1/fc2) MLP with neuron-major weights."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, gated: bool, bias: bool):
        d, n = cfg.hidden_size, cfg.intermediate_size
        self.gated, self.act = gated, canonical_activation(cfg.activation)
        self.up = _random_param(rngs, (n, d), dtype, 1.0 / math.sqrt(d))
        self.gate = _random_param(rngs, (n, d), dtype, 1.0 / math.sqrt(d)) if gated else None
        self.down = _random_param(rngs, (n, d), dtype, 1.0 / math.sqrt(n))
        self.up_bias = _zeros_param((n,), dtype) if bias else None
        self.down_bias = _zeros_param((d,), dtype) if bias else None

    def activations(self, x: jax.Array) -> jax.Array:
        """The hidden activations [..., N] (the values MLP sparsity selects among)."""
        up = jnp.einsum("...d,nd->...n", x, self.up[...], preferred_element_type=F32)
        if self.up_bias is not None:
            up = up + self.up_bias[...].astype(F32)
        if self.gated:
            gate = jnp.einsum("...d,nd->...n", x, self.gate[...], preferred_element_type=F32)
            return (get_activation(self.act)(gate.astype(x.dtype)) * up.astype(x.dtype)).astype(x.dtype)
        return get_activation(self.act)(up.astype(x.dtype))

    def project_down(self, h: jax.Array, bias: bool = True) -> jax.Array:
        """[..., N] -> [..., d]; `bias=False` as in `Attention.out`."""
        y = jnp.einsum("...n,nd->...d", h, self.down[...], preferred_element_type=F32)
        if bias and self.down_bias is not None:
            y = y + self.down_bias[...].astype(F32)
        return y.astype(h.dtype)
