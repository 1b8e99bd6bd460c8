"""Device mesh and sharding rules for tensor-parallel (and data-parallel) decoding.

Every tensor is described once by *logical* axes, what its dimensions mean (`embed`, `q_heads`,
`kv_heads`, `ffn`, `batch`, ...). `ShardingRules` maps logical axes to the axes of a ("data", "tensor")
mesh: attention is split by query heads and KV groups (the query heads of a shard are exactly those of
its KV groups), the MLP by neurons, the KV cache by KV heads, the batch over "data"; everything else
(embeddings, norms, the LM head, output biases) is replicated. The same rules
- place a checkpoint's tensors on their shards while it streams (`param_placer`, used by
  `polar_jax.load(..., mesh=)`), so no device ever holds a whole sharded tensor;
- move a model or a cache that is already in memory onto a mesh (`shard_model`, `shard_cache`);
- give the `PartitionSpec`s the tensor-parallel step runs under (`state_specs`, `cache_specs`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from polar_jax.cache import KVCache
from polar_jax.config import ModelConfig
from polar_jax.errors import InputError

DATA, TENSOR = "data", "tensor"
# A loader's placement hook: (parameter name, host array [a view of the checkpoint], dtype) -> jax.Array
Placer = Callable[[str, np.ndarray, Any], jax.Array]

# Logical axes of each parameter, by the parameter's name within its block (the names `flat_params`
# and checkpoints use, e.g. "layers.3.attn.q"). Weights are [in, out] for attention and neuron-major
# [N, d] for the MLP (layers.py). Names not listed are replicated.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "attn.q": ("embed", "q_heads"),
    "attn.k": ("embed", "kv_heads"),
    "attn.v": ("embed", "kv_heads"),
    "attn.o": ("q_heads", "embed"),
    "attn.q_bias": ("q_heads",),
    "attn.k_bias": ("kv_heads",),
    "attn.v_bias": ("kv_heads",),
    "attn.o_bias": ("embed",),  # added once, after the reduction over shards
    "mlp.up": ("ffn", "embed"),
    "mlp.gate": ("ffn", "embed"),
    "mlp.down": ("ffn", "embed"),
    "mlp.up_bias": ("ffn",),
    "mlp.down_bias": ("embed",),
}
CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")  # KVCache k / v [B, S, Hkv, D]
_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: replicated). The defaults are Megatron-style tensor parallelism
    (heads and neurons over "tensor") with the batch over "data"."""

    batch: str | None = DATA
    q_heads: str | None = TENSOR
    kv_heads: str | None = TENSOR
    ffn: str | None = TENSOR
    embed: str | None = None
    vocab: str | None = None
    seq: str | None = None
    head_dim: str | None = None

    def spec(self, axes: Sequence[str | None]) -> P:
        return P(*(getattr(self, a, None) if a is not None else None for a in axes))


RULES = ShardingRules()


# ---- the mesh ----------------------------------------------------------------------------------------
def make_mesh(tensor: int | None = None, data: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "tensor") mesh over `data * tensor` devices (default: every device, all on "tensor").
    Neighbouring devices share a tensor group (on one host: the GPUs that all-reduce every layer)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(data, int) or data < 1:
        raise InputError(f"data must be a positive integer, got {data!r}")
    tensor = len(devices) // data if tensor is None else tensor
    if not isinstance(tensor, int) or tensor < 1 or data * tensor > len(devices):
        raise InputError(f"a mesh of data={data} x tensor={tensor} needs {data * (tensor or 0)} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices[: data * tensor], dtype=object).reshape(data, tensor), (DATA, TENSOR))


def mesh_shape(mesh: Mesh | None) -> tuple[int, int]:
    """(data, tensor) sizes; (1, 1) without a mesh."""
    if mesh is None:
        return 1, 1
    return int(mesh.shape.get(DATA, 1)), int(mesh.shape.get(TENSOR, 1))


def is_parallel(mesh: Mesh | None) -> bool:
    """Whether a mesh spreads the work at all (a one-device mesh runs the plain single-device step)."""
    return mesh is not None and mesh.size > 1


def check_mesh(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
    """Refuses a mesh this model cannot be split over (one clear error instead of a shape error in jit)."""
    if set(mesh.axis_names) != {DATA, TENSOR}:
        raise InputError(f"the mesh must have axes ({DATA!r}, {TENSOR!r}) (polar_jax.sharding.make_mesh), "
                         f"got {mesh.axis_names}")
    data, tensor = mesh_shape(mesh)
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP neurons", cfg.intermediate_size)):
        if n % tensor:
            raise InputError(f"tensor parallelism over {tensor} devices needs the {what} ({n}) to split evenly")
    if batch is not None and batch % data:
        raise InputError(f"a batch of {batch} rows does not split over data={data} devices")


# ---- specs -------------------------------------------------------------------------------------------
def param_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter `name` (a flat parameter name); unknown names are replicated."""
    axes = PARAM_AXES.get(_LAYER_PREFIX.sub("", name))
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def param_spec(name: str, ndim: int, rules: ShardingRules = RULES) -> P:
    return rules.spec(param_axes(name, ndim))


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def state_specs(state: Any, rules: ShardingRules = RULES) -> Any:
    """A PartitionSpec for every leaf of a model's `nnx.State` (same tree)."""
    def spec(path, leaf):
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":  # the Variable's payload
            names = names[:-1]
        return param_spec(".".join(names), np.ndim(leaf), rules)

    return jax.tree_util.tree_map_with_path(spec, state)


def cache_specs(cache: KVCache, rules: ShardingRules = RULES) -> KVCache:
    """PartitionSpecs of a KVCache: keys/values by batch and KV heads, lengths and live flags by batch."""
    kv = rules.spec(CACHE_AXES)
    rows = rules.spec(("batch",))
    return KVCache(tuple(kv for _ in cache.k), tuple(kv for _ in cache.v), rows,
                   None if cache.live is None else rows)


def rows_spec(ndim: int, rules: ShardingRules = RULES) -> P:
    """An activation or token array whose first axis is the batch: [B, ...]."""
    return rules.spec(("batch",) + (None,) * (ndim - 1))


def _put(tree: Any, specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


# ---- placement -----------------------------------------------------------------------------------------
def shard_model(model: Any, mesh: Mesh, rules: ShardingRules = RULES) -> Any:
    """The same model with every parameter placed on its shards (for a model already in memory; loading
    with `polar_jax.load(..., mesh=)` never builds the whole tensors on a device)."""
    check_mesh(model.config, mesh)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _put(state, state_specs(state, rules), mesh))


def shard_state(state: Any, mesh: Mesh, rules: ShardingRules = RULES) -> Any:
    """An `nnx.State` placed on its shards (what `decode_step(..., mesh=)` expects)."""
    return _put(state, state_specs(state, rules), mesh)


def shard_cache(cache: KVCache, mesh: Mesh, rules: ShardingRules = RULES) -> KVCache:
    """A KV cache placed by KV heads over "tensor" and by rows over "data"."""
    return _put(cache, cache_specs(cache, rules), mesh)


def empty_cache(cfg: ModelConfig, batch: int, capacity: int, dtype: Any, mesh: Mesh,
                rules: ShardingRules = RULES) -> KVCache:
    """An empty KVCache created directly on its shards (each device allocates only its part)."""
    like = jax.eval_shape(lambda: KVCache.create(cfg, batch, capacity, dtype))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(like, rules))
    return jax.jit(lambda: KVCache.create(cfg, batch, capacity, dtype), out_shardings=shardings)()


def param_placer(mesh: Mesh, rules: ShardingRules = RULES) -> Placer:
    """A per-tensor placement hook for the checkpoint loaders: `place(name, host_array, dtype)` builds the
    parameter as a sharded array, each device receiving only its own slice (converted to `dtype` slice by
    slice), so a whole sharded tensor never exists on one device."""
    def place(name: str, arr: np.ndarray, dtype: Any) -> jax.Array:
        sharding = NamedSharding(mesh, param_spec(name, arr.ndim, rules))
        np_dtype = np.dtype(dtype)

        def piece(index: tuple) -> np.ndarray:
            part = np.asarray(arr[index])
            return part if part.dtype == np_dtype else part.astype(np.float32).astype(np_dtype)

        return jax.make_array_from_callback(tuple(arr.shape), sharding, piece)

    return place


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in `tree` (what the sharded loader is checked against)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
