"""Benchmark inputs and the timed decode loop on a ("data", "tensor") mesh (tensor parallelism, issue 15).

Shared by `polar-jax bench decode --tensor/--data` and `benchmarks/decode/tp_bench.py`: random weights and
KV caches created directly on their shards (no device ever holds a whole tensor, so shapes larger than one
GPU work), and `steps` decode steps in one executable under `shard_map`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from polar_jax import tensor_parallel as tp
from polar_jax.cache import KVCache
from polar_jax.decode import step_specs
from polar_jax.models import abstract_model
from polar_jax.sharding import cache_specs, param_spec
from polar_jax.graph import merge as merge_graph, split as split_graph


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind", "sharding"))
def _random_tensor(key, shape: tuple, dtype, kind: str, sharding):
    if kind == "ones":
        x = jnp.ones(shape, dtype)
    elif kind == "zeros":
        x = jnp.zeros(shape, dtype)
    else:
        x = (jax.random.normal(key, shape, jnp.float32) * (1.0 / np.sqrt(shape[0]))).astype(dtype)
    return jax.lax.with_sharding_constraint(x, sharding)


def _kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf in ("weight", "scale"):
        return "ones"
    return "zeros" if "bias" in leaf else "normal"


def sharded_model_state(cfg, dtype, mesh):
    """(graphdef, state) with random weights created on their shards (no device holds a whole tensor).

    One small jitted program per tensor (shared by tensors of one shape), with the key an argument: the
    whole model's initialisation in one program, keyed by a constant, took minutes to compile on the GPU
    for the 13B shape (the first device run of this script timed out in it)."""
    graphdef, abstract = split_graph(abstract_model(cfg, dtype))
    flat = []
    key = jax.random.key(0)
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        name = ".".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        value = _random_tensor(jax.random.fold_in(key, i), shape, jnp.dtype(var.get_value().dtype), _kind(name),
                               NamedSharding(mesh, param_spec(name, len(shape))))
        var.set_value(value)
        flat.append((path, var))
    return graphdef, nnx.from_flat_state(flat)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "sharding"))
def _random_kv(key, shape: tuple, dtype, sharding):
    return jax.lax.with_sharding_constraint(jax.random.normal(key, shape, dtype), sharding)


def sharded_cache(cfg, batch: int, capacity: int, context: int, dtype, mesh):
    """Random keys/values (every row live, `context` positions written), each layer's arrays created on
    their shards by one small program keyed by an argument (see `sharded_model_state`)."""
    like = jax.eval_shape(lambda: KVCache.create(cfg, batch, capacity, jnp.dtype(dtype)))
    specs = cache_specs(like)
    key = jax.random.key(1)
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    ks = tuple(_random_kv(jax.random.fold_in(key, 2 * i), shape, jnp.dtype(dtype), NamedSharding(mesh, specs.k[i]))
               for i in range(cfg.num_layers))
    vs = tuple(_random_kv(jax.random.fold_in(key, 2 * i + 1), shape, jnp.dtype(dtype),
                          NamedSharding(mesh, specs.v[i])) for i in range(cfg.num_layers))
    rows = NamedSharding(mesh, specs.lengths)
    return KVCache(ks, vs, jax.device_put(jnp.full((batch,), context, jnp.int32), rows),
                   jax.device_put(jnp.ones((batch,), bool), NamedSharding(mesh, specs.live)))


def decode_loop(model, cache: KVCache, tokens: jax.Array, selector, steps: int, **decode_kw):
    """`steps` decode steps of `model` in one device loop (as `generate` runs them, no host round trip):
    (the last step's logits in float32, the cache). `decode_kw` goes to `CausalLM.decode`."""
    def body(_, carry):
        cache, _ = carry
        logits, cache = model.decode(tokens, cache, selector, **decode_kw)
        return cache, logits.astype(jnp.float32)

    logits0 = jnp.zeros((tokens.shape[0], model.config.vocab_size), jnp.float32)
    cache, logits = jax.lax.fori_loop(0, steps, body, (cache, logits0))
    return logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "mesh"), donate_argnames=("cache",))
def steps_on_mesh(graphdef, state, cache, tokens, selector, steps: int, mesh):
    """`steps` decode steps in one executable: under shard_map on `mesh` (the layer code with its two
    psums per layer), or the plain step on one device."""
    def loop(state, cache, tokens, selector, parallel=None):
        model = merge_graph(graphdef, state)
        if parallel is not None:
            selector = tp.for_shard(selector, mesh, model.config)
        return decode_loop(model, cache, tokens, selector, steps, parallel=parallel)

    return tp.per_shard(loop, mesh, (state, cache, tokens, selector), step_specs)


