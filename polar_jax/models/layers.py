"""Building blocks shared by the model families: norms, rotary embeddings, activations, attention math.

Weights use the layouts DESIGN.md fixes: attention projections `[in, out]` (x @ W), MLP weights
neuron-major (`up`/`gate` `[N, d]`, `down` `[N, d]`) so the selective GEMMs gather contiguous rows.
Reductions (norm statistics, softmax) run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.activations import get_activation
from pallas_kernels.dense_gemv import gemv as pk_gemv
from pallas_kernels.dense_gemv import prefers_gemv
from pallas_kernels.row_norm import add_row_norm, prefers_row_norm
from pallas_kernels.row_norm import row_norm as pk_row_norm
from pallas_kernels.row_norm_xla import row_norm_xla
from pallas_kernels.split_sum import SplitSum
from pallas_kernels.unit_gemv import gemv_multi, gemv_rows
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

    def __call__(self, x: jax.Array, kernel: str | None = None) -> jax.Array:
        """`kernel`: a kernel backend for the decode step's few rows (`normalize`); None: XLA."""
        return normalize(x, self.weight[...], None, self.eps, "rms", kernel)

    def add_and_norm(self, stream: "Residual", kernel: str) -> tuple[jax.Array, jax.Array]:
        """(the stream with its pending output added, its norm) in one kernel (`add_normalize`)."""
        return add_normalize(stream, self.weight[...], None, self.eps, "rms", kernel)


def uses_row_norm(kernel: str | None, x: jax.Array) -> bool:
    """True where the norm of x [..., D] runs as one `row_norm` kernel (few rows, e.g. B=1 decode)."""
    return kernel is not None and prefers_row_norm(math.prod(x.shape[:-1]))


def normalize(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float, kind: str,
              kernel: str | None) -> jax.Array:
    """LayerNorm ("layer") or RMSNorm ("rms", HF's rounding) over the last axis of x: the `row_norm` kernel
    where `uses_row_norm`, else its XLA reference (the one definition of the math)."""
    if not uses_row_norm(kernel, x):
        return row_norm_xla(x, weight, bias, eps, kind)
    lead = x.shape[:-1]
    return pk_row_norm(x.reshape(-1, x.shape[-1]), weight, bias, eps, kind, impl=kernel).reshape(*lead, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Residual:
    """The residual stream x [..., d] with the last sublayer's output not yet added to it (`delta`, over the
    flattened rows). At B=1 the decode step leaves the projection's split-K epilogue and the residual add to
    the next norm's kernel (`add_row_norm`): two kernels fewer per layer."""

    x: jax.Array
    delta: SplitSum

    def resolve(self) -> jax.Array:
        """x + delta through XLA (where no norm follows: the last layer of a model without a final norm)."""
        return self.x + self.delta.total().reshape(self.x.shape)


def add_normalize(stream: Residual, weight: jax.Array, bias: jax.Array | None, eps: float, kind: str,
                  kernel: str) -> tuple[jax.Array, jax.Array]:
    """(x + delta, its LayerNorm / RMSNorm) for a `Residual` stream, through `add_row_norm`."""
    x = stream.x
    flat = x.reshape(-1, x.shape[-1])
    x_new, y = add_row_norm(flat, stream.delta, weight, bias, eps, kind, impl=kernel)
    return x_new.reshape(x.shape), y.reshape(x.shape)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, kernel: str | None = None) -> jax.Array:
        """`kernel`: a kernel backend for the decode step's few rows (`normalize`); None: XLA."""
        return normalize(x, self.weight[...], self.bias[...], self.eps, "layer", kernel)

    def add_and_norm(self, stream: "Residual", kernel: str) -> tuple[jax.Array, jax.Array]:
        """(the stream with its pending output added, its norm) in one kernel (`add_normalize`)."""
        return add_normalize(stream, self.weight[...], self.bias[...], self.eps, "layer", kernel)


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


def _value(p: nnx.Param | None) -> jax.Array | None:
    return None if p is None else p[...]


# The part of the decode step being traced (`profile_part`): the Pallas GEMVs of `linear` carry it in their kernel
# name, since a profile sees a Pallas kernel by its name only and not by the named scope it was traced in.
_PROFILE_PART: contextvars.ContextVar[str | None] = contextvars.ContextVar("polar_profile_part", default=None)


@contextlib.contextmanager
def profile_part(part: str | None) -> Iterator[None]:
    """While tracing inside, `linear`'s GEMV kernels are named gemv_<layout>_<part> (nothing computed changes)."""
    token = _PROFILE_PART.set(part)
    try:
        yield
    finally:
        _PROFILE_PART.reset(token)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None, layout: str, gemv: str | None = None,
           activation: str | None = None, split_sum: bool = False) -> jax.Array | SplitSum:
    """act(x [..., K] @ W (+ b)) -> [..., N] in x's dtype, float32 accumulation; W is [K, N] ("kn") or
    [N, K] ("nk", out-major). With `gemv` (a kernel backend name) and few enough rows (`prefers_gemv`),
    the Pallas GEMV reads the weight instead of XLA's dot, with the bias and the activation in its
    epilogue: decode at small batch is a stream of weights, and XLA's GEMM fusions read it at 2.4-3.3
    TB/s on the H200 where the GEMV reaches 3.0-4.0. `split_sum=True`: the output over the flattened rows as
    a `SplitSum` (its epilogue left to the next norm's kernel where the GEMV runs)."""
    lead = x.shape[:-1]
    m = math.prod(lead)
    if uses_gemv(gemv, m, layout):
        label = _PROFILE_PART.get()
        if split_sum:
            return pk_gemv(x.reshape(m, x.shape[-1]), w, b, activation, layout, impl=gemv, split_sum=True, label=label)
        return pk_gemv(x.reshape(m, x.shape[-1]), w, b, activation, layout, impl=gemv, label=label).reshape(*lead, -1)
    spec = "...i,io->...o" if layout == "kn" else "...i,oi->...o"
    y = jnp.einsum(spec, x, w, preferred_element_type=F32)
    if b is not None:
        y = y + b.astype(F32)
    y = y.astype(x.dtype)
    y = y if activation is None else get_activation(activation)(y)
    return SplitSum.finished(y.reshape(m, -1)) if split_sum else y


def uses_gemv(gemv: str | None, rows: int, layout: str = "kn") -> bool:
    """True where a projection of `rows` rows runs through the Pallas GEMV kernels."""
    return gemv is not None and prefers_gemv(rows, layout)


# At B=1 the step's attention projections run as two kernels, Q/K/V in one launch and the output
# projection, each over the selected units only when the layer is sparse: `units` is then the row's
# (unit ids [A], n_active) from its AttentionSelection (a unit = one KV group's query heads).
Units = tuple[jax.Array, jax.Array]


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

    @property
    def unit_width(self) -> int:
        """Query columns (and output-projection rows) of one KV group."""
        return self.num_heads // self.num_kv_heads * self.head_dim

    def qkv(self, x: jax.Array, gemv: str | None = None, units: Units | None = None,
            first: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """x [..., d] -> q [..., Hq, D], k/v [..., Hkv, D]. `gemv`: see `linear`; where it applies, the three
        projections are one kernel (`gemv_multi`), and with `units` the queries of the other units are not
        computed (unspecified: only the selected heads are read). Head counts follow the weights, so a
        tensor-parallel shard holding some of the heads runs the same code. `first` (an out-major [N, d]
        weight: the routers' shared first matrix): x @ first.T in float32 [..., N] comes back fourth, from the
        same launch where the GEMV applies."""
        lead = x.shape[:-1]
        m = math.prod(lead)
        if uses_gemv(gemv, m):
            sel = {} if units is None else dict(units=units[0], n_active=units[1], width=self.unit_width)
            outs = gemv_multi(x.reshape(m, x.shape[-1]), (self.q[...], self.k[...], self.v[...]),
                              (_value(self.q_bias), _value(self.k_bias), _value(self.v_bias)), impl=gemv,
                              f32_nk=None if first is None else first.astype(x.dtype), **sel)
            q, k, v = (t.reshape(*lead, -1, self.head_dim) for t in outs[:3])
            return (q, k, v) if first is None else (q, k, v, outs[3].reshape(*lead, -1))
        q = linear(x, self.q[...], _value(self.q_bias), "kn", gemv).reshape(*lead, -1, self.head_dim)
        k = linear(x, self.k[...], _value(self.k_bias), "kn", gemv).reshape(*lead, -1, self.head_dim)
        v = linear(x, self.v[...], _value(self.v_bias), "kn", gemv).reshape(*lead, -1, self.head_dim)
        if first is None:
            return q, k, v
        return q, k, v, jnp.einsum("...d,nd->...n", x.astype(first.dtype), first, preferred_element_type=F32)

    def out(self, heads: jax.Array, gemv: str | None = None, *, bias: bool = True,
            units: Units | None = None, split_sum: bool = False) -> jax.Array | SplitSum:
        """Per-head outputs [..., H, D] -> [..., d]. `bias=False` leaves the output bias out (a tensor-parallel
        shard's partial sum: the bias is added once, after the reduction). With `units` (and the GEMV) only
        the selected units' rows of the weight are read (`gemv_rows`): the other heads' outputs are zero.
        `split_sum`: see `linear`."""
        flat = heads.reshape(*heads.shape[:-2], heads.shape[-2] * heads.shape[-1])
        b = _value(self.o_bias) if bias else None
        m = math.prod(flat.shape[:-1])
        if units is not None and uses_gemv(gemv, m):
            y = gemv_rows(flat.reshape(m, -1), self.o[...], b, units[0], units[1], self.unit_width, impl=gemv,
                          split_sum=split_sum)
            return y if split_sum else y.reshape(*flat.shape[:-1], -1)
        return linear(flat, self.o[...], b, "kn", gemv, split_sum=split_sum)


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

    def activations(self, x: jax.Array, gemv: str | None = None) -> jax.Array:
        """The hidden activations [..., N] (the values MLP sparsity selects among). `gemv`: see `linear`."""
        if not self.gated:  # the activation in the GEMV's epilogue where it runs (one kernel less)
            return linear(x, self.up[...], _value(self.up_bias), "nk", gemv, activation=self.act)
        up = linear(x, self.up[...], _value(self.up_bias), "nk", gemv)
        gate = linear(x, self.gate[...], None, "nk", gemv)
        return (get_activation(self.act)(gate) * up).astype(x.dtype)

    def project_down(self, h: jax.Array, gemv: str | None = None, *, bias: bool = True,
                     split_sum: bool = False) -> jax.Array | SplitSum:
        """[..., N] -> [..., d]; `bias=False` and `split_sum` as in `Attention.out`."""
        return linear(h, self.down[...], _value(self.down_bias) if bias else None, "kn", gemv, split_sum=split_sum)
