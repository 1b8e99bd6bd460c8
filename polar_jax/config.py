"""Model configuration read from a Hugging Face `config.json`.

Accepts both transformers v4 and v5 spellings (`torch_dtype`/`dtype`, top-level `rope_theta`/`rope_scaling`
versus a `rope_parameters` dict) so checkpoints saved by either version load the same way.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from polar_jax.dtypes import dtype_name
from polar_jax.errors import CheckpointError, UnsupportedModelError
from polar_jax.files import read_json

# model_type -> the module family that implements it.
_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
_ACTIVATIONS = {"relu", "gelu", "gelu_new", "silu", "swish"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs, normalised across HF versions and model families."""

    model_type: str  # llama | mistral | qwen2 | opt
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str = "float32"  # the checkpoint's dtype
    norm_eps: float = 1e-5
    activation: str = "silu"
    tie_word_embeddings: bool = False
    # LLaMA family
    rope: RopeConfig = RopeConfig()
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    enable_bias: bool = True
    # special tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def family(self) -> str:
        return _FAMILIES[self.model_type]

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def relu_mlp(self) -> bool:
        """True when MLP activations are exactly sparse (ReLU), which is what MLP routing needs."""
        return self.activation == "relu" and not self.gated_mlp

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT may project it in and out of the hidden size)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from the dict of an HF `config.json` (v4 or v5 spelling)."""
        return _from_hf(hf)

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"no config.json at {path}")
        return _from_hf(read_json(path))


# ---- typed reads of config.json values: a wrong type or range is a clear error, never a silent cast ------
_MISSING = object()


def _value(hf: dict[str, Any], keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """(key, value) of the first spelling in `keys` that is present and not null, else the default."""
    for k in keys:
        if hf.get(k) is not None:
            return k, hf[k]
    if default is _MISSING:
        raise CheckpointError(f"config.json lacks {' / '.join(repr(k) for k in keys)}")
    return keys[0], default


def _int(hf: dict[str, Any], *keys: str, minimum: int = 1, default: Any = _MISSING) -> int:
    key, v = _value(hf, keys, default)
    if type(v) is not int or v < minimum:
        raise CheckpointError(f"config.json: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(hf: dict[str, Any], *keys: str, minimum: float = 0.0, default: Any = _MISSING) -> float:
    key, v = _value(hf, keys, default)
    if type(v) not in (int, float) or not math.isfinite(v) or v < minimum:
        raise CheckpointError(f"config.json: {key} must be a finite number >= {minimum}, got {v!r}")
    return float(v)


def _bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    v = hf.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise CheckpointError(f"config.json: {key} must be true or false, got {v!r}")
    return v


def _str(hf: dict[str, Any], key: str, default: str) -> str:
    v = hf.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise CheckpointError(f"config.json: {key} must be a string, got {v!r}")
    return v


def _dict(hf: dict[str, Any], key: str) -> dict[str, Any]:
    v = hf.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise CheckpointError(f"config.json: {key} must be an object, got {v!r}")
    return v


def _dtype(hf: dict[str, Any]) -> str:
    return dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32", "checkpoint dtype",
                      UnsupportedModelError)


def _rope(hf: dict[str, Any]) -> RopeConfig:
    # v5 keeps theta and scaling together in `rope_parameters`; v4 has `rope_theta` + optional `rope_scaling`.
    params = {**_dict(hf, "rope_scaling"), **_dict(hf, "rope_parameters")}
    # theta >= 1 and factors >= 1: smaller values overflow the rotary frequencies to inf (NaN logits)
    theta = _float({**hf, **params}, "rope_theta", minimum=1.0, default=10000.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=_float(params, "factor", minimum=1.0))
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise CheckpointError(f"llama3 rope scaling lacks {key!r}")
        rope = RopeConfig(
            theta=theta,
            kind="llama3",
            factor=_float(params, "factor", minimum=1.0),
            low_freq_factor=_float(params, "low_freq_factor", minimum=1e-6),
            high_freq_factor=_float(params, "high_freq_factor", minimum=1e-6),
            original_max_position_embeddings=_int(params, "original_max_position_embeddings"),
        )
        if rope.high_freq_factor <= rope.low_freq_factor:
            raise CheckpointError("config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                                  f"{rope.high_freq_factor} and {rope.low_freq_factor}")
        return rope
    raise UnsupportedModelError(f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def _special_tokens(hf: dict[str, Any]) -> dict[str, Any]:
    def token(key: str) -> int | None:
        v = hf.get(key)
        if v is not None and type(v) is not int:
            raise CheckpointError(f"config.json: {key} must be an integer token id, got {v!r}")
        return v

    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(type(t) is int for t in eos_ids):
        raise CheckpointError(f"config.json: eos_token_id must be a token id or a list of them, got {eos!r}")
    return dict(bos_token_id=token("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=token("pad_token_id"))


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError("config.json has no 'model_type'")
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        archs = hf.get("architectures") or []
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} {archs or ''}: polar-jax implements {sorted(_FAMILIES)}"
        )
    common = dict(
        model_type=model_type,
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=_int(hf, "hidden_size"),
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=_int(hf, "num_attention_heads"),
        max_position_embeddings=_int(hf, "max_position_embeddings"),
        dtype=_dtype(hf),
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", model_type == "opt"),
        **_special_tokens(hf),
    )
    if model_type == "opt":
        cfg = _opt(hf, common)
    else:
        cfg = _llama(hf, common, model_type)
    _validate(cfg)
    return cfg


def _llama(hf: dict[str, Any], common: dict[str, Any], model_type: str) -> ModelConfig:
    heads = common["num_heads"]
    kv_heads = _int(hf, "num_key_value_heads", default=heads)
    head_dim = _int(hf, "head_dim", default=max(1, common["hidden_size"] // heads))
    act = _str(hf, "hidden_act", "silu")
    window = None
    if model_type == "mistral" or (model_type == "qwen2" and _bool(hf, "use_sliding_window", False)):
        # Qwen2 ships a sliding_window value but only uses it when use_sliding_window is on; LLaMA has none
        window = _int(hf, "sliding_window", default=None) if hf.get("sliding_window") else None
    attention_bias = _bool(hf, "attention_bias", False)
    return ModelConfig(
        **common,
        intermediate_size=_int(hf, "intermediate_size"),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=_float(hf, "rms_norm_eps", default=1e-6),
        activation="silu" if act == "swish" else act,
        rope=_rope(hf),
        sliding_window=window,
        # Qwen2 always has q/k/v biases and none on o_proj; LLaMA's attention_bias covers all four.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=_bool(hf, "mlp_bias", False),
    )


def _opt(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    heads = common["num_heads"]
    hidden = common["hidden_size"]
    proj = _int(hf, "word_embed_proj_dim", default=hidden)
    do_ln_before = _bool(hf, "do_layer_norm_before", True)
    if not _bool(hf, "layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT with layer_norm_elementwise_affine=false is not supported")
    return ModelConfig(
        **common,
        intermediate_size=_int(hf, "ffn_dim"),
        num_kv_heads=heads,
        head_dim=max(1, hidden // heads),
        norm_eps=1e-5,
        activation=_str(hf, "activation_function", "relu"),
        do_layer_norm_before=do_ln_before,
        word_embed_proj_dim=proj,
        # HF builds the final norm only for pre-LN models that did not remove it.
        final_layer_norm=do_ln_before and not _bool(hf, "_remove_final_layer_norm", False),
        enable_bias=_bool(hf, "enable_bias", True),
    )


def _validate(cfg: ModelConfig) -> None:
    if cfg.activation not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {cfg.activation!r} is not supported")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(
            f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}"
        )
    if cfg.family == "opt" and cfg.hidden_size % cfg.num_heads:
        raise CheckpointError(f"hidden_size={cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
