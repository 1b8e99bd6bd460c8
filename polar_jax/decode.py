"""Batched generation: dense prefill, jitted decode step with a donated cache, on-device token loop.

The hot path is a pure jitted function over the split model (`split_model`: no per-call NNX graph traversal,
and the graph hashes once).
`generate` runs prefill and the whole token loop inside one jit (`lax.while_loop`, stopping early when every
sequence has emitted EOS), so there is no host round trip per token. `generate_stream` yields tokens step
by step for interactive use, through the same jitted decode step.

With `mesh=` (a ("data", "tensor") mesh, polar_jax.sharding.make_mesh) the same functions run
tensor-parallel: the body runs under shard_map on each device's heads, neurons and rows
(polar_jax.tensor_parallel). A one-device mesh runs the plain single-device code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from polar_jax import tensor_parallel as tp
from polar_jax.cache import KVCache
from polar_jax.errors import InputError
from polar_jax.models import CausalLM
from polar_jax.sharding import (cache_specs, check_mesh, empty_cache, is_parallel, mesh_shape, rows_spec, shard_state,
                                state_specs)
from polar_jax.sparse_decode import IMPL_CHOICES, check_selector, sparse_selector
from polar_jax.validate import check, check_optional, check_positions, token_id
from polar_jax.graph import Graph, merge as merge_graph, split as split_graph

PROMPT_BUCKET = 16  # prompts are right-padded to a multiple of this, so lengths share compiled programs
CACHE_BUCKET = 64


def split_model(model: CausalLM) -> tuple[Graph, Any]:
    """(graph, state): the arguments of `prefill` / `decode_step`. The graph hashes once (polar_jax.graph), so
    a decode loop driven from Python does not re-hash the model on every call."""
    return split_graph(model)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def prefill(graphdef, state, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
            mesh: Any = None) -> tuple[jax.Array, KVCache]:
    """Dense prefill of right-padded prompts [B, T] with true lengths [B]. With a `mesh`: state and cache
    placed on it (`polar_jax.sharding.shard_state` / `shard_cache` / `empty_cache`)."""
    def run(state, tokens, lengths, cache, parallel=None):
        return merge_graph(graphdef, state).prefill(tokens, lengths, cache, parallel=parallel)

    return tp.per_shard(run, mesh, (state, tokens, lengths, cache), lambda state, tokens, lengths, cache: (
        (state_specs(state), rows_spec(2), rows_spec(1), cache_specs(cache)), (rows_spec(2), cache_specs(cache))))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "attn_impl", "mlp_impl", "gemv_impl", "mesh", "rows"),
    donate_argnames=("cache",)
)
def decode_step(
    graphdef,
    state,
    cache: KVCache,
    tokens: jax.Array,
    selector: Any = None,
    attn_impl: str = "auto",
    mlp_impl: str = "auto",
    gemv_impl: str = "auto",
    mesh: Any = None,
    rows: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """One decode step for tokens [B]; the cache is donated and updated in place.

    `selector` (a pytree with the DecodeSelector methods, e.g. trained routers) makes the step sparse.
    `gemv_impl`: the backend of small-batch projections (`CausalLM.decode`). `mesh`: run tensor-parallel on
    it (state and cache placed on it, as for `prefill`); `rows`: when the batch was padded to a multiple of
    the "data" size, the number of real (leading) rows."""
    def run(state, cache, tokens, selector, parallel=None):
        model = merge_graph(graphdef, state)
        if parallel is not None:
            selector = tp.for_shard(selector, mesh, model.config, rows)
        return model.decode(tokens, cache, selector=selector, attn_impl=attn_impl, mlp_impl=mlp_impl,
                            gemv_impl=gemv_impl, parallel=parallel)

    return tp.per_shard(run, mesh, (state, cache, tokens, selector), step_specs)


def step_specs(state, cache: KVCache, tokens, selector) -> tuple[tuple, tuple]:
    """(in, out) PartitionSpecs of a decode step's (state, cache, tokens, selector) -> (logits, cache)."""
    return ((state_specs(state), cache_specs(cache), rows_spec(1), tp.selector_specs(selector)),
            (rows_spec(2), cache_specs(cache)))


# ---- sampling -----------------------------------------------------------------------------------------
def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool) -> jax.Array:
    """Greedy argmax, or temperature + nucleus (top-p) sampling; logits [B, V] -> tokens [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ---- input checks -------------------------------------------------------------------------------------
def _as_prompt_list(prompts: Any) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise InputError(f"prompts array must be [batch, tokens], got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"prompts must be integer token ids, got dtype {arr.dtype}")
        return [list(map(int, row)) for row in arr]
    if isinstance(prompts, str):
        raise InputError("prompts must be token ids; encode text with the tokenizer first (tokenizer.encode)")
    try:
        out = [list(map(token_id, p)) for p in prompts]
    except (TypeError, ValueError):
        raise InputError("prompts must be an int array [B, T] or a list of token-id lists") from None
    return out


def validate_generation(
    model: CausalLM, prompts: Any, max_new_tokens: int, temperature: float, top_p: float, cache_size: int | None
) -> tuple[list[list[int]], int]:
    """Checks everything a user can get wrong; returns the prompts and the cache capacity to use."""
    cfg = model.config
    plist = _as_prompt_list(prompts)
    if not plist:
        raise InputError("empty prompt list: give at least one prompt")
    for i, p in enumerate(plist):
        if not p:
            raise InputError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if t < 0 or t >= cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    # the limits the CLI's flags have too (polar_jax.validate): a bool, a string or a float count is refused
    max_new_tokens = check("max_new_tokens", max_new_tokens)
    check("temperature", temperature)
    check("top_p", top_p)
    cache_size = check_optional("cache_size", cache_size)
    longest = max(len(p) for p in plist)
    needed = longest + int(max_new_tokens)
    check_positions(cfg, needed, f"prompt of {longest} tokens + {max_new_tokens} new tokens")
    if cache_size is not None:
        if longest > cache_size:
            raise InputError(f"prompt of {longest} tokens is longer than the cache ({cache_size} positions)")
        if needed > cache_size:
            raise InputError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens needs {needed} cache positions, "
                f"the cache has {cache_size}"
            )
        return plist, int(cache_size)
    return plist, _round_up(max(needed, _round_up(longest, PROMPT_BUCKET)), CACHE_BUCKET)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_prompts(plist: list[list[int]], pad_id: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(p) for p in plist], np.int32)
    t = min(_round_up(int(lengths.max()), PROMPT_BUCKET), capacity)
    tokens = np.full((len(plist), t), pad_id, np.int32)
    for i, p in enumerate(plist):
        tokens[i, : len(p)] = p
    return tokens, lengths


def _eos_ids(model: CausalLM, eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        ids = model.config.eos_token_ids
    elif isinstance(eos_token_id, (int, np.integer)):
        ids = (int(eos_token_id),)
    else:
        ids = tuple(int(i) for i in eos_token_id)
    # -1 never matches a token: a fixed-size array keeps one compiled program for "no EOS" too.
    return np.array(ids or (-1,), np.int32)


# ---- generation ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated generation request, shared by `generate` and `generate_stream`."""

    tokens: np.ndarray  # [B, T] right-padded prompts
    lengths: np.ndarray  # [B]
    capacity: int
    eos: np.ndarray
    pad_id: int
    greedy: bool
    temperature: float
    top_p: float
    selector: Any
    attn_impl: str
    mlp_impl: str
    mesh: Any = None  # a mesh that spreads the work (None: one device)


def _prepare(model: CausalLM, prompts: Any, max_new_tokens: int, temperature: float, top_p: float,
             eos_token_id, cache_size: int | None, selector: Any, sparsity: Any, attn_density: float | None,
             mlp_recall: float | None, policy: str, adaptive: bool, impl: str | None, attn_impl: str,
             mlp_impl: str, mesh: Any = None, head_topk: str = tp.DEFAULT_HEAD_TOPK) -> _Request:
    plist, capacity = validate_generation(model, prompts, max_new_tokens, temperature, top_p, cache_size)
    if head_topk not in tp.HEAD_TOPK:
        raise InputError(f"head_topk must be one of {tp.HEAD_TOPK}, got {head_topk!r}")
    mesh = mesh if is_parallel(mesh) else None
    if mesh is not None:
        check_mesh(model.config, mesh)
    tensor = mesh_shape(mesh)[1]
    if impl is not None:
        attn_impl = mlp_impl = impl
    for name, value in (("attn_impl", attn_impl), ("mlp_impl", mlp_impl)):
        if value not in IMPL_CHOICES:
            raise InputError(f"{name} must be one of {IMPL_CHOICES}, got {value!r}")
    if sparsity is not None:
        if selector is not None:
            raise InputError("give either sparsity= (a bundle) or selector=, not both")
        longest = max(len(p) for p in plist)
        selector = sparse_selector(model, sparsity, batch=len(plist), context=longest + int(max_new_tokens),
                                   attn_density=attn_density, mlp_recall=mlp_recall, policy=policy,
                                   adaptive=adaptive, impl=attn_impl,
                                   balance=tensor if head_topk == "balanced" else 1)
    elif attn_density is not None or adaptive:
        raise InputError("attn_density/adaptive need sparsity= (a bundle, a bundle folder or 'default')")
    if selector is not None:
        check_selector(model, selector)
    tokens, lengths = pad_prompts(plist, model.config.pad_id, capacity)
    return _Request(tokens, lengths, capacity, _eos_ids(model, eos_token_id), model.config.pad_id,
                    temperature == 0.0, max(float(temperature), 1e-6), float(top_p), selector, attn_impl, mlp_impl,
                    mesh)


def _token_loop(model: CausalLM, tokens, lengths, key, temperature, top_p, eos_ids, pad_id, selector, cache, *,
                max_new_tokens: int, greedy: bool, attn_impl: str, mlp_impl: str, parallel: Any = None,
                dead: jax.Array | None = None):
    """Prefill, then decode until `max_new_tokens` or every sequence has emitted EOS: [B, max_new_tokens].
    `parallel`: inside the tensor-parallel shard_map (rows may be split over "data": the loop stops when
    every shard is done); `dead`: rows that only pad the batch (they never decode)."""
    b = tokens.shape[0]
    logits, cache = model.prefill(tokens, lengths, cache, parallel=parallel)
    if parallel is not None:
        key = parallel.row_key(key)
    key, sub = jax.random.split(key)
    tok = sample_tokens(logits, sub, temperature, top_p, greedy)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids) if dead is None else jnp.isin(tok, eos_ids) | dead

    def all_done(done):
        return jnp.all(done) if parallel is None else ~parallel.any_rows(~jnp.all(done))

    def cond(carry):
        i, _, _, _, _, finished, _ = carry
        return (i < max_new_tokens) & ~finished

    def body(carry):
        i, tok, cache, out, done, _, key = carry
        # a finished row stops decoding: it reads no KV and does not count in the MLP union
        logits, cache = model.decode(tok, cache.with_live(~done), selector=selector, attn_impl=attn_impl,
                                     mlp_impl=mlp_impl, parallel=parallel)
        key, sub = jax.random.split(key)
        new = sample_tokens(logits, sub, temperature, top_p, greedy)
        new = jnp.where(done, pad_id, new)  # after EOS a sequence only emits padding
        out = out.at[:, i].set(new)
        done = done | jnp.isin(new, eos_ids)
        return i + 1, new, cache, out, done, all_done(done), key

    carry = (jnp.int32(1), tok, cache, out, done, all_done(done), key)
    return jax.lax.while_loop(cond, body, carry)[3]


_LOOP_STATIC = ("graphdef", "max_new_tokens", "capacity", "greedy", "cache_dtype", "attn_impl", "mlp_impl")


@functools.partial(jax.jit, static_argnames=_LOOP_STATIC)
def _generate_on_device(
    graphdef, state, tokens, lengths, key, temperature, top_p, eos_ids, pad_id, selector,
    *, max_new_tokens: int, capacity: int, greedy: bool, cache_dtype: str, attn_impl: str, mlp_impl: str,
):
    model = merge_graph(graphdef, state)
    cache = KVCache.create(model.config, tokens.shape[0], capacity, jnp.dtype(cache_dtype))
    return _token_loop(model, tokens, lengths, key, temperature, top_p, eos_ids, pad_id, selector, cache,
                       max_new_tokens=max_new_tokens, greedy=greedy, attn_impl=attn_impl, mlp_impl=mlp_impl)


@functools.partial(jax.jit, static_argnames=_LOOP_STATIC + ("mesh", "rows"))
def _generate_on_mesh(
    graphdef, state, tokens, lengths, dead, key, temperature, top_p, eos_ids, pad_id, selector,
    *, max_new_tokens: int, capacity: int, greedy: bool, cache_dtype: str, attn_impl: str, mlp_impl: str, mesh: Any,
    rows: int,
):
    """`_generate_on_device` with the prefill and the token loop under shard_map on `mesh`."""
    cfg = merge_graph(graphdef, state).config
    # created inside the jit with its sharding known: XLA allocates each device's part only
    cache = KVCache.create(cfg, tokens.shape[0], capacity, jnp.dtype(cache_dtype))
    parallel = tp.parallel_of(mesh)

    def run(state, tokens, lengths, dead, key, temperature, top_p, eos_ids, pad_id, selector, cache):
        model = merge_graph(graphdef, state)
        return _token_loop(model, tokens, lengths, key, temperature, top_p, eos_ids, pad_id,
                           tp.for_shard(selector, mesh, cfg, rows), cache, max_new_tokens=max_new_tokens, greedy=greedy,
                           attn_impl=attn_impl, mlp_impl=mlp_impl, parallel=parallel, dead=dead)

    rep = P()
    in_specs = (state_specs(state), rows_spec(2), rows_spec(1), rows_spec(1), rep, rep, rep, rep, rep,
                tp.selector_specs(selector), cache_specs(cache))
    return tp.on_mesh(run, mesh, in_specs, rows_spec(2))(state, tokens, lengths, dead, key, temperature, top_p,
                                                          eos_ids, pad_id, selector, cache)


def _pad_rows(req: "_Request", data: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts padded with one-token dummy rows to a multiple of the "data" size, and which rows are dummy."""
    b = req.tokens.shape[0]
    extra = -b % data
    tokens = np.concatenate([req.tokens, np.full((extra, req.tokens.shape[1]), req.pad_id, np.int32)])
    lengths = np.concatenate([req.lengths, np.ones((extra,), np.int32)])
    return tokens, lengths, np.arange(b + extra) >= b


def _host_array(x: jax.Array) -> np.ndarray:
    """A result as a NumPy array on every process (rows of other hosts gathered when several run)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(
    model: CausalLM,
    prompts: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    cache_size: int | None = None,
    selector: Any = None,
    attn_impl: str = "auto",
    mlp_impl: str = "auto",
    *,
    sparsity: Any = None,
    attn_density: float | None = None,
    mlp_recall: float | None = 0.99,
    policy: str = "auto",
    adaptive: bool = False,
    impl: str | None = None,
    mesh: Any = None,
    head_topk: str = tp.DEFAULT_HEAD_TOPK,
) -> np.ndarray:
    """Generates `max_new_tokens` for each prompt; returns int32 [B, max_new_tokens].

    prompts: int array [B, T] or a list of token-id lists (ragged lengths allowed). temperature 0 is greedy.
    After a sequence emits EOS (`eos_token_id`, default the model's), its remaining slots hold the pad id.

    Sparse decoding: `sparsity` is a sparsity bundle, a bundle folder or "default" (the bundle made for
    the embedded default model); `attn_density` the fraction of heads / KV groups each sequence keeps,
    `mlp_recall` the MLP table's recall target, `adaptive` input-adaptive head budgets; `policy` picks
    what is sparsified: "auto" (from the cost table measured on the device, never slower than dense),
    "both", "heads", "mlp" or "dense". `impl` sets the kernels' backend ("auto", "xla", "triton").
    `selector` (a DecodeSelector) is the low-level alternative to `sparsity`.

    Tensor parallelism: `mesh` (polar_jax.sharding.make_mesh) runs prefill and decoding split over its
    devices (greedy tokens are those of one device); `head_topk` says how a sparse bundle's head budget is
    applied across the "tensor" shards: "global" (each sequence's k best heads overall) or "balanced"
    (its ceil(k/n) best on each of the n shards, so no shard waits for another).
    """
    check("seed", seed)
    req = _prepare(model, prompts, max_new_tokens, temperature, top_p, eos_token_id, cache_size, selector,
                   sparsity, attn_density, mlp_recall, policy, adaptive, impl, attn_impl, mlp_impl, mesh, head_topk)
    graphdef, state = split_model(model)
    static = dict(max_new_tokens=int(max_new_tokens), capacity=req.capacity, greedy=req.greedy,
                  cache_dtype=str(model.dtype), attn_impl=req.attn_impl, mlp_impl=req.mlp_impl)
    scalars = (jax.random.key(seed), jnp.float32(req.temperature), jnp.float32(req.top_p), jnp.asarray(req.eos),
               jnp.int32(req.pad_id), req.selector)
    if req.mesh is None:
        out = _generate_on_device(graphdef, state, jnp.asarray(req.tokens), jnp.asarray(req.lengths), *scalars,
                                  **static)
        return np.asarray(out)
    tokens, lengths, dead = _pad_rows(req, mesh_shape(req.mesh)[0])
    out = _generate_on_mesh(graphdef, shard_state(state, req.mesh), tokens, lengths, dead, *scalars, **static,
                            mesh=req.mesh, rows=req.tokens.shape[0])
    return _host_array(out)[: req.tokens.shape[0]]


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample_jit(logits, key, temperature, top_p, greedy):
    return sample_tokens(logits, key, temperature, top_p, greedy)


def generate_stream(
    model: CausalLM,
    prompts: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    cache_size: int | None = None,
    selector: Any = None,
    attn_impl: str = "auto",
    mlp_impl: str = "auto",
    *,
    sparsity: Any = None,
    attn_density: float | None = None,
    mlp_recall: float | None = 0.99,
    policy: str = "auto",
    adaptive: bool = False,
    impl: str | None = None,
    mesh: Any = None,
    head_topk: str = tp.DEFAULT_HEAD_TOPK,
) -> Iterator[np.ndarray]:
    """Like `generate` (same arguments), but yields each step's tokens [B] as soon as they exist (stops
    when all sequences have emitted EOS). The same tokens as `generate` for the same arguments."""
    check("seed", seed)
    req = _prepare(model, prompts, max_new_tokens, temperature, top_p, eos_token_id, cache_size, selector,
                   sparsity, attn_density, mlp_recall, policy, adaptive, impl, attn_impl, mlp_impl, mesh, head_topk)
    graphdef, state = split_model(model)
    temp, top = jnp.float32(req.temperature), jnp.float32(req.top_p)
    b = req.tokens.shape[0]
    if req.mesh is None:
        tokens, lengths, done = req.tokens, req.lengths, np.zeros(b, bool)
        cache = KVCache.create(model.config, b, req.capacity, model.dtype)
    else:  # dummy rows fill the batch up to a multiple of "data"; they are done from the start
        tokens, lengths, done = _pad_rows(req, mesh_shape(req.mesh)[0])
        state = shard_state(state, req.mesh)
        cache = empty_cache(model.config, tokens.shape[0], req.capacity, model.dtype, req.mesh)
    logits, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache, req.mesh)
    key = jax.random.key(seed)
    for i in range(int(max_new_tokens)):
        if i > 0:
            logits, cache = decode_step(graphdef, state, cache.with_live(~done), jnp.asarray(tok), req.selector,
                                        req.attn_impl, req.mlp_impl, mesh=req.mesh, rows=b)
        key, sub = jax.random.split(key)
        tok = _host_array(_sample_jit(logits, sub, temp, top, req.greedy))  # rows of every process
        tok = np.where(done, req.pad_id, tok).astype(np.int32)
        yield tok[:b]
        done |= np.isin(tok, req.eos)
        if done.all():
            return
