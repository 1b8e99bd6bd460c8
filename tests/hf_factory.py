"""Writes small random Hugging Face-format checkpoints (config.json + safetensors) without torch, for
conversion and error-path tests. Tensor names and [out, in] layouts follow transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert.mapping import parameter_sources
from polar_jax.checkpoint import param_shapes
from polar_jax.config import ModelConfig

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "dtype": "float32",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "eos_token_id": 1, "pad_token_id": 0,
}
TINY_OPT = {
    "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 96, "hidden_size": 32, "ffn_dim": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "dtype": "float32",
    "do_layer_norm_before": True, "word_embed_proj_dim": 32, "activation_function": "relu",
    "tie_word_embeddings": True, "enable_bias": True, "eos_token_id": 2, "pad_token_id": 1,
}


def hf_tensors(hf_config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = ModelConfig.from_hf(hf_config)
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    out = {}
    for name, src in parameter_sources(cfg).items():
        shape = shapes[name][::-1] if src.transpose else shapes[name]
        out[src.hf_name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    return out


def write_hf(folder: Path, hf_config: dict, seed: int = 0, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    tensors = hf_tensors(hf_config, seed)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
