"""OPT: learned positions (table offset by 2, as in HF/fairseq), LayerNorm, ReLU MLP, tied head, and the
project_in/project_out pair when `word_embed_proj_dim` differs from the hidden size (OPT-350m)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax.config import ModelConfig
from polar_jax.models.base import CausalLM
from polar_jax.models.layers import F32, LayerNorm, _random_param

POSITION_OFFSET = 2  # HF OPTLearnedPositionalEmbedding reserves the first two rows


class OPTForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        e, d = cfg.embed_dim, cfg.hidden_size
        self.embed_tokens = _random_param(rngs, (cfg.vocab_size, e), dtype, 1.0)
        self.embed_positions = _random_param(rngs, (cfg.max_position_embeddings + POSITION_OFFSET, d), dtype, 0.1)
        self.project_in = _random_param(rngs, (e, d), dtype, 1.0 / math.sqrt(e)) if e != d else None
        self.project_out = _random_param(rngs, (d, e), dtype, 1.0 / math.sqrt(d)) if e != d else None
        self._init_blocks(cfg, dtype, rngs)
        self.final_norm = LayerNorm(d, cfg.norm_eps, dtype) if cfg.final_layer_norm else None
        self.lm_head = (
            None if cfg.tie_word_embeddings else _random_param(rngs, (cfg.vocab_size, e), dtype, 1.0 / math.sqrt(e))
        )

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        if self.project_in is not None:
            x = jnp.einsum("...e,ed->...d", x, self.project_in[...], preferred_element_type=F32).astype(x.dtype)
        return x + jnp.take(self.embed_positions[...], positions + POSITION_OFFSET, axis=0)

    def output_norm(self) -> LayerNorm | None:
        return self.final_norm

    def head(self, x: jax.Array) -> jax.Array:
        if self.project_out is not None:
            x = jnp.einsum("...d,de->...e", x, self.project_out[...], preferred_element_type=F32).astype(x.dtype)
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return jnp.einsum("...e,ve->...v", x, w[...], preferred_element_type=F32)
