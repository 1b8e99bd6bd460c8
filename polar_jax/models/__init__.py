"""Flax NNX model definitions and construction from a ModelConfig."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from polar_jax.config import ModelConfig
from polar_jax.models.base import CausalLM, DecodeSelector, Sparsifier
from polar_jax.models.llama import LlamaForCausalLM
from polar_jax.models.opt import OPTForCausalLM

_CLASSES = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}


def build_model(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0) -> CausalLM:
    """A model with random weights (for tests and benchmarks; checkpoints overwrite every parameter)."""
    return _CLASSES[cfg.family](cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> CausalLM:
    """The model's structure with shape-only parameters: no memory allocated, filled by a loader."""
    return nnx.eval_shape(lambda: build_model(cfg, dtype))


__all__ = ["CausalLM", "DecodeSelector", "Sparsifier", "LlamaForCausalLM", "OPTForCausalLM", "build_model", "abstract_model"]
