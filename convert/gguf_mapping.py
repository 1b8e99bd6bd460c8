"""From GGUF metadata and tensor names to an HF-style config and polar-jax parameters.

llama.cpp writes a model's hyper-parameters as `<arch>.<key>` metadata and its tensors under its own names
(`blk.{i}.attn_q.weight`, ...). This module turns the metadata into the `config.json` dict Hugging Face
would build for the file (so a converted checkpoint is an ordinary polar-jax checkpoint), and says which
GGUF tensor feeds each polar-jax parameter and how:

- matrices arrive `[out, in]` (HF order); attention projections are transposed to `[in, out]`, the MLP's
  down projection to neuron-major `[N, d]`;
- for the `llama` architecture, llama.cpp permuted the rows of `attn_q`/`attn_k` (weights and biases) so
  that each head's rotary pairs are adjacent (ggml's rotation); `unpermute_heads` restores HF's
  half-split order. Qwen2 files are written without that permutation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError, UnsupportedModelError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp's file types whose weights are all half precision: converting keeps that dtype by default.
_FILE_TYPE_DTYPE = {1: "float16", 32: "bfloat16"}
# LLaMA-3.x stores its rope scaling as a `rope_freqs` tensor of per-frequency divisors; these are the
# published settings it is matched against (factor, low_freq_factor, high_freq_factor, original context).
_LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def unpermute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary permutation of q/k rows (also for 1-D biases): within each head the
    rows were reordered from HF's [first half, second half] into interleaved (even, odd) pairs."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot undo the rotary permutation: {rows} rows are not {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- config -------------------------------------------------------------------------------------------
def _meta(meta: dict[str, Any], arch: str, key: str, default: Any = KeyError) -> Any:
    full = f"{arch}.{key}"
    if full in meta:
        return meta[full]
    if default is KeyError:
        raise CheckpointError(f"GGUF metadata lacks {full!r}")
    return default


def _one_value(v: Any, what: str) -> int:
    """Per-layer arrays (some files write head counts per layer) are accepted when all layers agree."""
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            raise UnsupportedModelError(f"{what} differs between layers ({v}); not supported")
        v = v[0]
    return int(v)


def architecture(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch is None:
        raise CheckpointError("GGUF metadata lacks 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported: polar-jax reads {sorted(ARCHITECTURES)} "
            "(llama covers LLaMA, Mistral and SmolLM files)"
        )
    return arch


def hf_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
              rope_freqs: Callable[[], np.ndarray] | None = None) -> dict[str, Any]:
    """The HF `config.json` dict this GGUF describes. `shapes`: GGUF tensor name -> HF-order shape;
    `rope_freqs` reads the `rope_freqs.weight` tensor when the file has one."""
    arch = architecture(meta)
    if "token_embd.weight" not in shapes:
        raise CheckpointError("GGUF file has no token embedding tensor 'token_embd.weight'")
    vocab, hidden = shapes["token_embd.weight"]
    declared = _meta(meta, arch, "embedding_length")
    if int(declared) != hidden:
        raise CheckpointError(f"{arch}.embedding_length is {declared} but token_embd.weight has width {hidden}")
    heads = _one_value(_meta(meta, arch, "attention.head_count"), "attention.head_count")
    kv_heads = _one_value(_meta(meta, arch, "attention.head_count_kv", heads), "attention.head_count_kv")
    if arch == "qwen2":
        head_dim = hidden // heads  # HF ignores Qwen2's rope.dimension_count; the head is d / heads
    else:
        head_dim = int(_meta(meta, arch, "attention.key_length", 0) or _meta(meta, arch, "rope.dimension_count", 0)
                       or hidden // heads)
    rot = int(_meta(meta, arch, "rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings (rope.dimension_count {rot} < head dim {head_dim})")
    theta = float(_meta(meta, arch, "rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "model_type": arch,
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(_one_value(_meta(meta, arch, "feed_forward_length"), "feed_forward_length")),
        "num_hidden_layers": int(_meta(meta, arch, "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_meta(meta, arch, "context_length", 2048)),
        "rms_norm_eps": float(_meta(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_act": "silu",
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": _FILE_TYPE_DTYPE.get(meta.get("general.file_type"), "float32"),
    }
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    else:
        cfg["attention_bias"] = "blk.0.attn_q.bias" in shapes
    scaling = _rope_scaling(meta, arch, theta, head_dim, rope_freqs if "rope_freqs.weight" in shapes else None)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(meta: dict[str, Any], arch: str, theta: float, head_dim: int,
                  rope_freqs: Callable[[], np.ndarray] | None) -> dict[str, Any] | None:
    kind = _meta(meta, arch, "rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_meta(meta, arch, "rope.scaling.factor"))}
    if kind not in ("none", None):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (supported: none, linear, llama3)")
    if rope_freqs is None:
        return None
    return _llama3_from_freqs(np.asarray(rope_freqs(), np.float64).reshape(-1), theta, head_dim)


def _llama3_from_freqs(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """The llama3 scaling whose per-frequency divisors equal the file's `rope_freqs` (else a clear error)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    for factor, low, high, orig in _LLAMA3_ROPE_CANDIDATES:
        smooth = (orig / wavelen - low) / (high - low)
        div = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if divisors.shape == div.shape and np.allclose(divisors, div, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise UnsupportedModelError("the file's rope_freqs tensor matches no known llama3 rope scaling")


# ---- tensors ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    gguf_name: str
    transpose: bool = False
    unpermute_heads: int = 0  # >0: undo llama.cpp's rotary row permutation for this many heads


def parameter_sources(cfg: ModelConfig) -> dict[str, Source]:
    """polar-jax parameter name -> the GGUF tensor it comes from, for every parameter of the model."""
    if cfg.mlp_bias or cfg.o_bias:
        raise UnsupportedModelError("GGUF models with MLP or output-projection biases are not supported")
    llama = cfg.model_type == "llama"
    out = {"embed_tokens": Source("token_embd.weight"), "norm.weight": Source("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = Source("output.weight")
    for i in range(cfg.num_layers):
        g, me = f"blk.{i}.", f"layers.{i}."
        out[me + "attn_norm.weight"] = Source(g + "attn_norm.weight")
        out[me + "mlp_norm.weight"] = Source(g + "ffn_norm.weight")
        rotary = {"q": cfg.num_heads if llama else 0, "k": cfg.num_kv_heads if llama else 0, "v": 0}
        for p in "qkv":
            out[me + f"attn.{p}"] = Source(g + f"attn_{p}.weight", transpose=True, unpermute_heads=rotary[p])
            if cfg.qkv_bias:
                out[me + f"attn.{p}_bias"] = Source(g + f"attn_{p}.bias", unpermute_heads=rotary[p])
        out[me + "attn.o"] = Source(g + "attn_output.weight", transpose=True)
        out[me + "mlp.gate"] = Source(g + "ffn_gate.weight")
        out[me + "mlp.up"] = Source(g + "ffn_up.weight")
        out[me + "mlp.down"] = Source(g + "ffn_down.weight", transpose=True)
    return out


# Tensors a supported file may carry that the model does not read as parameters.
IGNORED_TENSORS = ("rope_freqs.weight",)


def to_polar(src: Source, arr: np.ndarray) -> np.ndarray:
    """A GGUF tensor (HF order, float32) in the polar-jax layout of the parameter it feeds."""
    if src.unpermute_heads:
        arr = unpermute_heads(arr, src.unpermute_heads)
    return np.ascontiguousarray(arr.T) if src.transpose else arr


def polar_shape(src: Source, gguf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(gguf_shape[::-1]) if src.transpose else tuple(gguf_shape)
