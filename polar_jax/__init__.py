"""polar-jax: Polar Sparsity (batched LLM decoding with contextual sparsity) in JAX/Pallas.

Quick start:
    import polar_jax
    model, tok = polar_jax.load("default")
    out = polar_jax.generate(model, [tok.encode("The meaning of")], max_new_tokens=20)
    print(tok.decode(out[0]))
"""

from polar_jax.cache import KVCache
from polar_jax.checkpoint import load, load_hf
from polar_jax.config import ModelConfig
from polar_jax.decode import decode_step, generate, generate_stream, prefill
from polar_jax.errors import CheckpointError, InputError, PolarError, UnsupportedModelError
from polar_jax.routers.bundle import load_sparsity

__version__ = "0.1.0"

__all__ = [
    "KVCache", "ModelConfig", "load", "load_hf", "generate", "generate_stream", "prefill", "decode_step",
    "PolarError", "CheckpointError", "InputError", "UnsupportedModelError", "load_sparsity",
]
