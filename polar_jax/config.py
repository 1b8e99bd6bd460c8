"""Model configuration read from a Hugging Face `config.json`.

Accepts both transformers v4 and v5 spellings (`torch_dtype`/`dtype`, top-level `rope_theta`/`rope_scaling`
versus a `rope_parameters` dict) so checkpoints saved by either version load the same way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from polar_jax.errors import CheckpointError, UnsupportedModelError

# model_type -> the module family that implements it.
_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
_ACTIVATIONS = {"relu", "gelu", "gelu_new", "silu", "swish"}
_DTYPES = {"float32", "float16", "bfloat16"}


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
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        return _from_hf(hf)


def _require(hf: dict[str, Any], *keys: str) -> Any:
    """First present key among the spellings in `keys`, else a clear error."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise CheckpointError(f"config.json lacks {' / '.join(repr(k) for k in keys)}")


def _dtype(hf: dict[str, Any]) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise UnsupportedModelError(f"unsupported checkpoint dtype {dtype!r} (expected one of {sorted(_DTYPES)})")
    return dtype


def _rope(hf: dict[str, Any]) -> RopeConfig:
    # v5 keeps theta and scaling together in `rope_parameters`; v4 has `rope_theta` + optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=float(theta),
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise CheckpointError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
    raise UnsupportedModelError(f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def _special_tokens(hf: dict[str, Any]) -> dict[str, Any]:
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=hf.get("pad_token_id"))


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type is None:
        raise CheckpointError("config.json has no 'model_type'")
    if model_type not in _FAMILIES:
        archs = hf.get("architectures") or []
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} {archs or ''}: polar-jax implements {sorted(_FAMILIES)}"
        )
    common = dict(
        model_type=model_type,
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=int(_require(hf, "hidden_size")),
        num_layers=int(_require(hf, "num_hidden_layers")),
        num_heads=int(_require(hf, "num_attention_heads")),
        max_position_embeddings=int(_require(hf, "max_position_embeddings")),
        dtype=_dtype(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "opt")),
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
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or common["hidden_size"] // heads)
    act = hf.get("hidden_act", "silu")
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 ships a sliding_window value but only uses it when this flag is on
    if model_type == "llama":
        window = None
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common,
        intermediate_size=int(_require(hf, "intermediate_size")),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation="silu" if act == "swish" else act,
        rope=_rope(hf),
        sliding_window=int(window) if window else None,
        # Qwen2 always has q/k/v biases and none on o_proj; LLaMA's attention_bias covers all four.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def _opt(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    heads = common["num_heads"]
    hidden = common["hidden_size"]
    proj = hf.get("word_embed_proj_dim") or hidden
    do_ln_before = bool(hf.get("do_layer_norm_before", True))
    if not hf.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT with layer_norm_elementwise_affine=false is not supported")
    return ModelConfig(
        **common,
        intermediate_size=int(_require(hf, "ffn_dim")),
        num_kv_heads=heads,
        head_dim=hidden // heads,
        norm_eps=1e-5,
        activation=hf.get("activation_function", "relu"),
        do_layer_norm_before=do_ln_before,
        word_embed_proj_dim=int(proj),
        # HF builds the final norm only for pre-LN models that did not remove it.
        final_layer_norm=do_ln_before and not hf.get("_remove_final_layer_norm", False),
        enable_bias=bool(hf.get("enable_bias", True)),
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
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise CheckpointError(f"config value {name}={getattr(cfg, name)} must be positive")
