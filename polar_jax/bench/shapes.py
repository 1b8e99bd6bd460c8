"""Model shapes the decode benchmark builds with random weights (real dimensions, all layers)."""

from __future__ import annotations

import dataclasses

from polar_jax.config import ModelConfig, RopeConfig

_OPT = dict(model_type="opt", activation="relu", tie_word_embeddings=True, enable_bias=True, dtype="bfloat16",
            vocab_size=50272, num_kv_heads=None, head_dim=128,
            # the learned-position table is sized for the longest benchmark context (8192 + the decoded
            # steps): OPT's real 2048 positions only change the size of that small table
            max_position_embeddings=8448)


def _opt(d: int, layers: int, heads: int) -> ModelConfig:
    kw = dict(_OPT, hidden_size=d, intermediate_size=4 * d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
              word_embed_proj_dim=d)
    return ModelConfig(**kw)


SHAPES: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=8448, dtype="bfloat16",
    ),
    "llama3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, dtype="bfloat16",
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
    ),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    # fits a 24 GB GPU (Colab's L4) with a batch of 8 at context 2048
    "opt-1.3b": dataclasses.replace(_opt(2048, 24, 32), head_dim=64),
    # CPU code-path checks (--tiny)
    "tiny-opt": dataclasses.replace(_opt(64, 3, 4), vocab_size=512, intermediate_size=256, head_dim=16,
                                    dtype="float32", max_position_embeddings=1024),
    "tiny-llama": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, dtype="float32",
    ),
}
LARGE = ("llama2-7b", "llama3.1-8b", "opt-6.7b", "opt-13b", "opt-1.3b")

# PAPER.md: OPT-66B mean MLP union density at 99 % recall by batch size (the benchmark's MLP density
# when no calibrated table is given); other sizes are interpolated in log2(B).
PAPER_UNION = {1: 0.075, 8: 0.175, 32: 0.374, 64: 0.49, 256: 0.64}
