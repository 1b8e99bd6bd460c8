"""Continuation log-likelihoods for a list of token sequences, dense or sparse, in padded batches.

This is the numeric core of the lm-evaluation-harness adapter (polar_jax/eval/lm_eval_adapter.py); it does
not import lm_eval, so it is usable and testable without it.

Sparse semantics (what the real system computes for one request): the context is prefilled densely and
every continuation token is a decode step. In a full-sequence pass that is masked evaluation with the
positions before `start` dense, where `start` = the number of input positions that belong to the context
plus one (the logits of the last context position come from the dense prefill). Each request is its own
decode stream: the MLP neuron set is the union over that one sequence, with the MLP k calibrated for batch
size 1. Rows are evaluated under `jax.vmap`, so a request's score never depends on which other requests
share its evaluation batch (nor on the batch size).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from polar_jax.errors import InputError
from polar_jax.models import CausalLM
from polar_jax.graph import merge as merge_graph, split as split_graph

MIN_BUCKET = 32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner", "start"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseBefore:
    """Wraps a sparsifier built with start=0: positions before `start` keep every unit. Unlike the wrapped
    sparsifier's static `start`, this one is a traced scalar, so each vmapped row has its own."""

    inner: Any
    start: jax.Array

    def _keep_prefix(self, mask: jax.Array | None) -> jax.Array | None:
        if mask is None:
            return None
        t = mask.shape[1]  # heads [1, T, H] and neurons [1, T, N] both have time on axis 1
        shape = [1] * mask.ndim
        shape[1] = t
        before = (jnp.arange(t) < self.start).reshape(shape)
        return jnp.where(before, 1.0, mask)

    def heads_mask(self, layer: int, router_input: jax.Array, head_out: jax.Array) -> jax.Array | None:
        return self._keep_prefix(self.inner.heads_mask(layer, router_input, head_out))

    def neurons_mask(self, layer: int, router_input: jax.Array, act: jax.Array) -> jax.Array | None:
        return self._keep_prefix(self.inner.neurons_mask(layer, router_input, act))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_scores(graphdef, state, inputs: jax.Array, targets: jax.Array, starts: jax.Array,
                  sparsifier: Any = None) -> tuple[jax.Array, jax.Array]:
    """Log-probability of `targets` [B, T] after `inputs` [B, T], and whether each target is the argmax."""
    if sparsifier is None:
        logits = merge_graph(graphdef, state)(inputs)
    else:
        def one_request(row: jax.Array, start: jax.Array) -> jax.Array:
            model = merge_graph(graphdef, state)
            return model(row[None], sparsifier=DenseBefore(sparsifier, start))[0]

        logits = jax.vmap(one_request)(inputs, starts)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits, axis=-1) == targets


def bucket_length(n: int, cap: int) -> int:
    """Padded length for a batch whose longest input has n tokens: a multiple of a quarter of the power of
    two below n (at most ~25 % padding, ~4 compiled shapes per doubling), at least MIN_BUCKET, at most cap."""
    if n <= MIN_BUCKET:
        return max(n, min(MIN_BUCKET, cap))
    step = max(1, 2 ** (int(math.log2(n)) - 2))
    return max(n, min(-(-n // step) * step, cap))


@dataclasses.dataclass(frozen=True)
class Scored:
    logprob: float  # summed log-probability of the continuation tokens
    greedy: bool  # every continuation token is the argmax of its logits


def continuation_scores(
    model: CausalLM,
    sequences: Sequence[tuple[Sequence[int], int]],
    sparsifier: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[Scored]:
    """Score the last `n_cont` tokens of each `(tokens, n_cont)` given the tokens before them.

    `tokens` is context + continuation; when it is longer than `max_length` + 1 the context is cut from the
    left (the model sees at most `max_length` positions). `sparsifier` (built with start=0, e.g. by
    polar_jax.eval.sparse_ppl.build_sparsifier) makes the continuation sparse with decode semantics (see the
    module docstring). Requests are run longest first in batches of `batch_size`; results come back in the
    input order.
    """
    cfg = model.config
    if max_length is None:
        max_length = cfg.max_position_embeddings
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    prepared = []
    for i, (tokens, n_cont) in enumerate(sequences):
        tokens = [int(t) for t in tokens]
        if n_cont < 0 or n_cont >= len(tokens):
            raise InputError(f"request {i}: {n_cont} continuation tokens need at least one context token before them")
        if n_cont > max_length:
            raise InputError(f"request {i}: continuation of {n_cont} tokens is longer than max_length {max_length}")
        bad = [t for t in tokens if t < 0 or t >= cfg.vocab_size]
        if bad:
            raise InputError(f"request {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        tokens = tokens[-(max_length + 1):]
        prepared.append((tokens[:-1], tokens[1:], n_cont))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    graphdef, state = split_graph(model)
    results: list[Scored | None] = [None] * len(prepared)
    with tqdm(total=len(prepared), desc=desc, unit="req", disable=not progress) as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            t = bucket_length(len(prepared[idx[0]][0]), max_length)
            inputs = np.full((batch_size, t), cfg.pad_id, np.int32)  # unused rows keep the compiled shape
            targets = np.zeros((batch_size, t), np.int32)
            starts = np.zeros((batch_size,), np.int32)
            for row, i in enumerate(idx):
                inp, tgt, n_cont = prepared[i]
                inputs[row, : len(inp)] = inp
                targets[row, : len(tgt)] = tgt
                starts[row] = len(inp) - n_cont + 1
            logp, greedy = _token_scores(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                         jnp.asarray(starts), sparsifier)
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for row, i in enumerate(idx):
                inp, _, n_cont = prepared[i]
                span = slice(len(inp) - n_cont, len(inp))
                results[i] = Scored(float(np.sum(logp[row, span])), bool(np.all(greedy[row, span])))
            bar.update(len(idx))
    return results  # type: ignore[return-value]
