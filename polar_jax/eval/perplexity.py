"""Perplexity with the standard protocol: the token stream cut into non-overlapping windows of `seq_len`,
each scored independently (no BOS added); every token after the first of its window is predicted once."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from polar_jax.errors import InputError
from polar_jax.models import CausalLM
from polar_jax.validate import check, check_optional, check_positions
from polar_jax.graph import merge as merge_graph, split as split_graph


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int  # tokens read (windows * seq_len)
    predictions: int  # tokens scored
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, state, windows: jax.Array, sparsifier: Any = None) -> jax.Array:
    """Summed negative log-likelihood of tokens 1..T-1 of each window [B, T], per window."""
    model = merge_graph(graphdef, state)
    logits = model(windows, sparsifier=sparsifier).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll, axis=-1)


def make_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    check("seq_len", seq_len)
    tokens = np.asarray(tokens, np.int32)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = len(tokens) // seq_len
    if n == 0:
        raise InputError(f"text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def perplexity(
    model: CausalLM,
    tokens: np.ndarray,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    sparsifier: Any = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on a token stream. `sparsifier` (see models.base.Sparsifier) applies masked
    sparsity; with it, the windows of one batch form the decode batch whose MLP union is shared (a smaller
    last batch is a smaller decode batch, so its calibrated MLP k differs, as it would when decoding)."""
    check("batch_size", batch_size)
    check_optional("max_tokens", max_tokens)
    windows = make_windows(tokens, seq_len, max_tokens)
    check_positions(model.config, seq_len, f"seq_len {seq_len}")
    graphdef, state = split_graph(model)
    total = 0.0
    n_full = (len(windows) // batch_size) * batch_size
    batches = [windows[i : i + batch_size] for i in range(0, n_full, batch_size)]
    if n_full < len(windows):
        batches.append(windows[n_full:])  # a smaller last batch (one extra compile) rather than dropped data
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        total += float(np.sum(np.asarray(_window_nll(graphdef, state, jnp.asarray(batch), sparsifier), np.float64)))
    predictions = len(windows) * (seq_len - 1)
    mean = total / predictions
    return PerplexityResult(math.exp(mean), mean, int(windows.size), predictions, seq_len)
