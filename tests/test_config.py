import json

import pytest

from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError, UnsupportedModelError

LLAMA31_V4 = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000,
}


def to_v5(hf: dict) -> dict:
    """The same config in transformers v5 spelling: dtype, and rope_parameters holding theta and scaling."""
    v5 = dict(hf)
    v5["dtype"] = v5.pop("torch_dtype")
    scaling = v5.pop("rope_scaling", None) or {"rope_type": "default"}
    v5["rope_parameters"] = {"rope_theta": v5.pop("rope_theta"), **scaling}
    return v5


def test_v4_and_v5_spellings_agree():
    a, b = ModelConfig.from_hf(LLAMA31_V4), ModelConfig.from_hf(to_v5(LLAMA31_V4))
    assert a == b
    assert a.rope.kind == "llama3" and a.rope.factor == 8.0 and a.rope.theta == 500000.0
    assert a.dtype == "bfloat16" and a.num_kv_heads == 8 and a.group_size == 4 and a.head_dim == 128
    assert a.eos_token_ids == (128001, 128008, 128009)


def test_v4_rope_scaling_with_old_type_key():
    hf = dict(LLAMA31_V4, rope_scaling={**LLAMA31_V4["rope_scaling"]})
    hf["rope_scaling"]["type"] = hf["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(hf).rope.kind == "llama3"


def test_round_trip_through_dict():
    cfg = ModelConfig.from_hf(LLAMA31_V4)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_mistral_window_qwen_bias_head_dim():
    mistral = ModelConfig.from_hf(dict(LLAMA31_V4, model_type="mistral", sliding_window=4096, rope_scaling=None))
    assert mistral.sliding_window == 4096 and not mistral.qkv_bias
    qwen = ModelConfig.from_hf(dict(LLAMA31_V4, model_type="qwen2", sliding_window=4096, use_sliding_window=False,
                                    rope_scaling=None))
    assert qwen.sliding_window is None and qwen.qkv_bias and not qwen.o_bias
    llama = ModelConfig.from_hf(dict(LLAMA31_V4, head_dim=64, attention_bias=True))
    assert llama.head_dim == 64 and llama.qkv_bias and llama.o_bias


def test_opt_fields():
    hf = {"model_type": "opt", "vocab_size": 50272, "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "max_position_embeddings": 2048, "torch_dtype": "float16",
          "do_layer_norm_before": False, "word_embed_proj_dim": 512, "_remove_final_layer_norm": False}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.family == "opt" and cfg.embed_dim == 512 and not cfg.final_layer_norm
    assert cfg.tie_word_embeddings and cfg.relu_mlp and not cfg.do_layer_norm_before
    pre = ModelConfig.from_hf(dict(hf, do_layer_norm_before=True, _remove_final_layer_norm=True))
    assert not pre.final_layer_norm


def test_shared_checkpoint_configs(shared):
    llama = ModelConfig.from_hf_file(shared / "models" / "tiny-llama")
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.dtype) == (16, 4, 32, "bfloat16")
    opt = ModelConfig.from_hf_file(shared / "models" / "tiny-opt")
    assert opt.family == "opt" and opt.tie_word_embeddings and opt.dtype == "float16"


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"model_type": "gpt2"}, UnsupportedModelError, "unsupported architecture"),
        ({"model_type": None}, CheckpointError, "model_type"),
        ({"hidden_size": None}, CheckpointError, "hidden_size"),
        ({"torch_dtype": "int8"}, UnsupportedModelError, "dtype"),
        ({"num_key_value_heads": 5}, CheckpointError, "multiple"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, CheckpointError, "low_freq_factor"),
    ],
)
def test_bad_configs_are_named(change, error, words):
    hf = {k: v for k, v in {**LLAMA31_V4, **change}.items() if v is not None}
    with pytest.raises(error, match=words):
        ModelConfig.from_hf(hf)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_hf_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.from_hf_file(tmp_path)
