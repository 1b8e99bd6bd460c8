"""Where each polar-jax parameter comes from in a Hugging Face checkpoint, and how it is laid out.

HF `nn.Linear` weights are `[out, in]`. polar-jax keeps attention projections `[in, out]` and MLP weights
neuron-major (`[N, d]` for up/gate/down), so some tensors are transposed on the way in.
"""

from __future__ import annotations

import dataclasses

from polar_jax.config import ModelConfig
from polar_jax.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class Source:
    hf_name: str
    transpose: bool = False


def parameter_sources(cfg: ModelConfig) -> dict[str, Source]:
    """polar-jax parameter name -> its HF tensor, for every parameter the model has."""
    if cfg.family == "opt":
        return _opt_sources(cfg)
    return _llama_sources(cfg)


def _llama_sources(cfg: ModelConfig) -> dict[str, Source]:
    if cfg.mlp_bias:
        raise UnsupportedModelError("LLaMA-family checkpoints with mlp_bias=true are not supported")
    out = {"embed_tokens": Source("model.embed_tokens.weight"), "norm.weight": Source("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = Source("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        out[me + "attn_norm.weight"] = Source(hf + "input_layernorm.weight")
        out[me + "mlp_norm.weight"] = Source(hf + "post_attention_layernorm.weight")
        for p in "qkvo":
            out[me + f"attn.{p}"] = Source(hf + f"self_attn.{p}_proj.weight", transpose=True)
        if cfg.qkv_bias:
            for p in "qkv":
                out[me + f"attn.{p}_bias"] = Source(hf + f"self_attn.{p}_proj.bias")
        if cfg.o_bias:
            out[me + "attn.o_bias"] = Source(hf + "self_attn.o_proj.bias")
        out[me + "mlp.gate"] = Source(hf + "mlp.gate_proj.weight")
        out[me + "mlp.up"] = Source(hf + "mlp.up_proj.weight")
        out[me + "mlp.down"] = Source(hf + "mlp.down_proj.weight", transpose=True)
    return out


def _opt_sources(cfg: ModelConfig) -> dict[str, Source]:
    d = "model.decoder."
    out = {"embed_tokens": Source(d + "embed_tokens.weight"), "embed_positions": Source(d + "embed_positions.weight")}
    if cfg.embed_dim != cfg.hidden_size:
        out["project_in"] = Source(d + "project_in.weight", transpose=True)
        out["project_out"] = Source(d + "project_out.weight", transpose=True)
    if cfg.final_layer_norm:
        out["final_norm.weight"] = Source(d + "final_layer_norm.weight")
        out["final_norm.bias"] = Source(d + "final_layer_norm.bias")
    if not cfg.tie_word_embeddings:
        out["lm_head"] = Source("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"{d}layers.{i}.", f"layers.{i}."
        for norm, hf_norm in (("attn_norm", "self_attn_layer_norm"), ("mlp_norm", "final_layer_norm")):
            out[me + f"{norm}.weight"] = Source(hf + f"{hf_norm}.weight")
            out[me + f"{norm}.bias"] = Source(hf + f"{hf_norm}.bias")
        for p, hp in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            out[me + f"attn.{p}"] = Source(hf + f"self_attn.{hp}.weight", transpose=True)
            if cfg.enable_bias:
                out[me + f"attn.{p}_bias"] = Source(hf + f"self_attn.{hp}.bias")
        out[me + "mlp.up"] = Source(hf + "fc1.weight")
        out[me + "mlp.down"] = Source(hf + "fc2.weight", transpose=True)
        if cfg.enable_bias:
            out[me + "mlp.up_bias"] = Source(hf + "fc1.bias")
            out[me + "mlp.down_bias"] = Source(hf + "fc2.bias")
    return out
