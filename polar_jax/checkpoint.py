"""Loading models: from a converted polar-jax checkpoint, straight from an HF folder, or the embedded default.

A polar-jax checkpoint folder holds `config.json` (the HF config, dtype updated), `polar_jax.json` (format
marker, dtype, source, weights fingerprint), `params.safetensors` (parameters named and laid out as the
Flax modules hold them) and the tokenizer files (polar_jax/layout.py names them). Loading never executes
code from the checkpoint, and checks the weights against the stored SHA-256 while it reads them.
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

# `import convert.hf as ...` (not `from convert.hf import ...`): convert imports polar_jax modules, so when
# `import convert` runs first this module sees convert.hf still initialising; its functions are looked up
# at call time.
import convert.hf as convert_hf
from convert.safetensors_io import SafetensorsFile
from polar_jax.config import ModelConfig
from polar_jax.dtypes import DTYPES, dtype_name
from polar_jax.errors import CheckpointError
from polar_jax.files import read_json
from polar_jax.layout import (  # noqa: F401 (re-exported: the names the loader API has always had)
    FORMAT, FORMAT_VERSION, META_FILE, PARAMS_FILE, hash_tensor, param_shapes, path_name,
)
from polar_jax.models import CausalLM, abstract_model
from polar_jax.sharding import Placer, check_mesh, param_placer
from polar_jax.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def resolve_dtype(dtype: str | None, cfg: ModelConfig) -> str:
    """The compute dtype: the one asked for, else the checkpoint's; half precision on a CPU-only host is
    computed in float32 (CPU matmuls in fp16/bf16 are slow and less accurate, and the tiny models are small)."""
    if dtype is None:
        dtype = cfg.dtype
        if dtype != "float32" and jax.default_backend() == "cpu":
            dtype = "float32"
    return dtype_name(dtype)


def _on_default_device(name: str, arr: np.ndarray, jdtype: Any) -> jax.Array:
    """The whole tensor on the default device (no mesh)."""
    return jnp.asarray(np.asarray(arr, dtype=np.float32) if arr.dtype != np.float32 else arr, jdtype)


def model_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype: str,
                       place: Placer | None = None) -> CausalLM:
    """Builds the model, asking `get(name)` for each parameter (shape-checked, cast to `dtype`). `place(name,
    host_array, dtype)` puts each tensor on its device(s) as it arrives (default: whole, on the default
    device; `polar_jax.sharding.param_placer`: each device gets its own slice, read from `host_array` by
    indexing, so a memory-mapped checkpoint is read slice by slice)."""
    jdtype = DTYPES[dtype]
    place = place or _on_default_device
    graphdef, state = nnx.split(abstract_model(cfg, jdtype))
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = path_name(path)
        arr = get(name)
        want = tuple(var.get_value().shape)
        if tuple(arr.shape) != want:
            raise CheckpointError(f"parameter {name}: checkpoint has shape {tuple(arr.shape)}, config implies {want}")
        var.set_value(place(name, arr, jdtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def flat_params(model: CausalLM) -> dict[str, jax.Array]:
    _, state = nnx.split(model)
    return {path_name(p): v.get_value() for p, v in nnx.to_flat_state(state)}


# ---- converted checkpoints ---------------------------------------------------------------------------
def is_polar_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None, *,
         verify: bool = True) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a converted polar-jax checkpoint (or "default", the embedded model, or a GGUF file). Returns
    (model, tokenizer). `mesh` (polar_jax.sharding.make_mesh): each tensor goes straight to its shards, each
    device reading its own slice of the memory-mapped weights (no whole sharded tensor on any device).
    `verify` checks the weights against the SHA-256 stored at conversion, hashed while they are read (a
    corrupt or modified file is refused); `verify=False` skips it on trusted disks."""
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
    meta = read_json(path / META_FILE)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE} is not a polar-jax checkpoint marker")
    if not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('version')!r} is not one this polar-jax reads")
    cfg = ModelConfig.from_hf_file(path / "config.json")
    weights = SafetensorsFile(path / PARAMS_FILE)
    try:
        expected = set(param_shapes(cfg))
        extra = set(weights.keys()) - expected
        if extra:
            raise CheckpointError(f"{path / PARAMS_FILE} has unexpected tensors {sorted(extra)[:5]}")
        check = WeightsCheck(weights, meta.get("weights_sha256")) if verify else None

        def get(name: str) -> np.ndarray:
            if name not in weights.keys():
                raise CheckpointError(f"parameter {name} is missing from {path / PARAMS_FILE}")
            arr = weights.get(name)
            if check is not None:
                check.feed(name, arr)
            return arr

        model = model_from_tensors(cfg, get, resolve_dtype(dtype, cfg), _placer(cfg, mesh))
        if check is not None:
            check.finish()
    finally:
        weights.close()
    return model, load_tokenizer(path)


class WeightsCheck:
    """The SHA-256 of a params file (`layout.hash_tensor` over its tensors in file order), fed by the loader
    as it reads each tensor, so the check costs no second pass over the file."""

    def __init__(self, weights: SafetensorsFile, expected: str | None):
        self.weights, self.expected = weights, expected
        self.order = weights.data_order()
        self.digest = hashlib.sha256()
        self.next = 0  # index in `order` of the tensor the digest expects next

    def feed(self, name: str, arr: np.ndarray) -> None:
        if self.next < len(self.order) and self.order[self.next] == name:
            hash_tensor(self.digest, name, arr)
            self.next += 1
        else:
            self.next = -1  # read out of file order: `finish` hashes the file on its own

    def finish(self) -> None:
        if self.expected is None:
            return  # a checkpoint written without a fingerprint: nothing to compare
        digest = self.digest
        if self.next != len(self.order):
            digest = hashlib.sha256()
            for name in self.order:
                hash_tensor(digest, name, self.weights.get(name))
        if digest.hexdigest() != self.expected:
            raise CheckpointError(
                f"{self.weights.path} does not match the weights_sha256 in {META_FILE}: the file is corrupt or was "
                "modified after conversion (re-convert it; or load with verify=False / --no-verify to skip the check)"
            )


def load_hf(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a Hugging Face checkpoint folder or a GGUF file directly (converted on the fly, one tensor at a
    time; GGUF tensors dequantized). `mesh`: as in `load` (a GGUF tensor is dequantized whole in host memory,
    then sliced: quantized blocks do not split at arbitrary rows)."""
    reader = convert_hf.open_reader(path)
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
