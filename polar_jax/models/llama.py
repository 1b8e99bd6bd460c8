"""LLaMA family: LLaMA-2 (MHA), LLaMA-3/3.1 (GQA, llama3 RoPE scaling), Mistral (sliding window),
Qwen2 (q/k/v bias). One module; the differences are config flags (see config.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax.config import ModelConfig
from polar_jax.models.base import CausalLM
from polar_jax.models.layers import F32, RMSNorm, _random_param


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.embed_tokens = _random_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, 1.0)
        self._init_blocks(cfg, dtype, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        # Stored [V, d] like the embedding so tied and untied heads share one code path.
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _random_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, 1.0 / math.sqrt(cfg.hidden_size))
        )

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def output_norm(self) -> RMSNorm:
        return self.norm

    def head(self, h: jax.Array) -> jax.Array:
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return jnp.einsum("...d,vd->...v", h, w[...], preferred_element_type=F32)
