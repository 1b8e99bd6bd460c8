"""Loading models: from a converted polar-jax checkpoint, straight from an HF folder, or the embedded default.

A polar-jax checkpoint folder holds `config.json` (the HF config, dtype updated), `polar_jax.json` (format
marker, dtype, source, weights fingerprint), `params.safetensors` (parameters named and laid out as the
Flax modules hold them) and the tokenizer files. Loading never executes code from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError
from polar_jax.models import CausalLM, abstract_model
from polar_jax.sharding import Placer, check_mesh, param_placer
from polar_jax.tokenizer import Tokenizer, load_tokenizer

FORMAT = "polar-jax"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
META_FILE = "polar_jax.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | None, cfg: ModelConfig) -> str:
    """The compute dtype: the one asked for, else the checkpoint's; half precision on a CPU-only host is
    computed in float32 (CPU matmuls in fp16/bf16 are slow and less accurate, and the tiny models are small)."""
    if dtype is None:
        dtype = cfg.dtype
        if dtype != "float32" and jax.default_backend() == "cpu":
            dtype = "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}: choose float32, bfloat16 or float16")
    return dtype


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, from the module structure (nothing allocated)."""
    _, state = nnx.split(abstract_model(cfg))
    return {_path_name(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _on_default_device(name: str, arr: np.ndarray, jdtype: Any) -> jax.Array:
    """The whole tensor on the default device (no mesh)."""
    return jnp.asarray(np.asarray(arr, dtype=np.float32) if arr.dtype != np.float32 else arr, jdtype)


def model_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype: str,
                       place: Placer | None = None) -> CausalLM:
    """Builds the model, asking `get(name)` for each parameter (shape-checked, cast to `dtype`). `place(name,
    host_array, dtype)` puts each tensor on its device(s) as it arrives (default: whole, on the default
    device; `polar_jax.sharding.param_placer`: each device gets its own slice, read from `host_array` by
    indexing, so a memory-mapped checkpoint is read slice by slice)."""
    jdtype = _DTYPES[dtype]
    place = place or _on_default_device
    graphdef, state = nnx.split(abstract_model(cfg, jdtype))
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = _path_name(path)
        arr = get(name)
        want = tuple(var.get_value().shape)
        if tuple(arr.shape) != want:
            raise CheckpointError(f"parameter {name}: checkpoint has shape {tuple(arr.shape)}, config implies {want}")
        var.set_value(place(name, arr, jdtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def flat_params(model: CausalLM) -> dict[str, jax.Array]:
    _, state = nnx.split(model)
    return {_path_name(p): v.get_value() for p, v in nnx.to_flat_state(state)}


# ---- converted checkpoints ---------------------------------------------------------------------------
def is_polar_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a converted polar-jax checkpoint (or "default", the embedded model, or a GGUF file). Returns
    (model, tokenizer). `mesh` (polar_jax.sharding.make_mesh): each tensor goes straight to its shards, each
    device reading its own slice of the memory-mapped weights (no whole sharded tensor on any device)."""
    from convert.safetensors_io import SafetensorsFile

    path = DEFAULT_MODEL_DIR if str(path) == "default" else Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():  # a single-file checkpoint (GGUF): read and dequantized on the fly
        return load_hf(path, dtype, mesh)
    if not is_polar_checkpoint(path):
        if (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} looks like a Hugging Face folder, not a polar-jax checkpoint: "
                "use polar_jax.load_hf() or `polar-jax convert` first"
            )
        raise CheckpointError(f"{path} is not a polar-jax checkpoint (no {META_FILE})")
    meta = _read_json(path / META_FILE)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE} is not a polar-jax checkpoint marker")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('version')} is newer than this polar-jax")
    cfg = ModelConfig.from_hf_file(path / "config.json")
    weights = SafetensorsFile(path / PARAMS_FILE)
    expected = set(param_shapes(cfg))
    extra = set(weights.keys()) - expected
    if extra:
        raise CheckpointError(f"{path / PARAMS_FILE} has unexpected tensors {sorted(extra)[:5]}")

    def get(name: str) -> np.ndarray:
        if name not in weights.keys():
            raise CheckpointError(f"parameter {name} is missing from {path / PARAMS_FILE}")
        return weights.get(name)

    model = model_from_tensors(cfg, get, resolve_dtype(dtype, cfg), _placer(cfg, mesh))
    weights.close()
    return model, load_tokenizer(path)


def load_hf(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a Hugging Face checkpoint folder or a GGUF file directly (converted on the fly, one tensor at a
    time; GGUF tensors dequantized). `mesh`: as in `load` (a GGUF tensor is dequantized whole in host memory,
    then sliced: quantized blocks do not split at arbitrary rows)."""
    from convert.hf import open_reader

    reader = open_reader(path)
    try:
        model = model_from_tensors(reader.config, reader.get, resolve_dtype(dtype, reader.config),
                                   _placer(reader.config, mesh))
        return model, reader.tokenizer()
    finally:
        reader.close()


def _placer(cfg: ModelConfig, mesh: Mesh | None) -> Placer | None:
    """The placement hook for `mesh` (None: whole tensors on the default device)."""
    if mesh is None:
        return None
    check_mesh(cfg, mesh)
    return param_placer(mesh)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None


# ---- identity for router bundles --------------------------------------------------------------------
_ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "activation", "tie_word_embeddings", "sliding_window", "word_embed_proj_dim",
)


def model_signature(model: CausalLM, probe_size: int = 64) -> dict:
    """What identifies a model independently of the dtype it was loaded in: an architecture hash and a
    small probe of weight values (compared with a tolerance, so fp16/bf16/fp32 copies of one model match)."""
    cfg = model.config
    arch = {k: getattr(cfg, k) for k in _ARCH_FIELDS}
    arch_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    params = flat_params(model)
    probe = {}
    for name in sorted(params):
        if name.endswith((".attn.q", ".mlp.up")) or name == "embed_tokens":
            flat = np.asarray(params[name], dtype=np.float32).reshape(-1)
            step = max(1, flat.size // probe_size)
            probe[name] = [round(float(x), 5) for x in flat[::step][:probe_size]]
    return {"arch": arch, "arch_hash": arch_hash, "probe": probe}


def same_model(sig_a: dict, sig_b: dict, rtol: float = 2e-2, atol: float = 2e-3) -> bool:
    if sig_a.get("arch_hash") != sig_b.get("arch_hash") or set(sig_a["probe"]) != set(sig_b["probe"]):
        return False
    return all(
        np.allclose(np.asarray(sig_a["probe"][k]), np.asarray(sig_b["probe"][k]), rtol=rtol, atol=atol)
        for k in sig_a["probe"]
    )
