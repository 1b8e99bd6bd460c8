"""Greedy agreement of sparse decoding (the real decode path with a selector) with dense decoding."""

from __future__ import annotations

from typing import Any

import numpy as np

from polar_jax.decode import generate
from polar_jax.errors import InputError
from polar_jax.validate import check


def sample_prompts(tokens: np.ndarray, n_prompts: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    """`n_prompts` prompts of `prompt_len` tokens from non-overlapping random positions of the stream."""
    check("prompts", n_prompts, "number of prompts")
    check("prompt_len", prompt_len, "prompt length")
    check("seed", seed)
    tokens = np.asarray(tokens, np.int32)
    slots = len(tokens) // prompt_len
    if slots < n_prompts:
        raise InputError(f"text has {len(tokens)} tokens, too few for {n_prompts} prompts of {prompt_len}")
    pick = np.sort(np.random.default_rng(seed).choice(slots, n_prompts, replace=False))
    return np.stack([tokens[i * prompt_len : (i + 1) * prompt_len] for i in pick])


def agreement_stats(dense: np.ndarray, sparse: np.ndarray) -> dict[str, float]:
    """token_agreement: fraction of positions where the two greedy continuations are equal;
    mean_prefix: mean length of the identical prefix (tokens before the first difference)."""
    eq = np.asarray(dense) == np.asarray(sparse)
    prefix = np.where(eq.all(1), eq.shape[1], np.argmin(eq, axis=1))
    return {"token_agreement": float(eq.mean()), "mean_prefix": float(prefix.mean()),
            "full_match": float(eq.all(1).mean())}


def greedy_agreement(model: Any, tokens: np.ndarray, selector: Any, n_prompts: int = 8, prompt_len: int = 32,
                     new_tokens: int = 64, seed: int = 0, eos_token_id: int | None = -1) -> dict[str, Any]:
    """Greedy continuations of random prompts, dense vs `selector` (one batch of `n_prompts`). EOS is
    ignored by default (-1) so both runs produce `new_tokens` tokens to compare."""
    check("new_tokens", new_tokens, "number of new tokens")
    prompts = sample_prompts(tokens, n_prompts, prompt_len, seed)
    dense = generate(model, prompts, new_tokens, eos_token_id=eos_token_id)
    sparse = generate(model, prompts, new_tokens, eos_token_id=eos_token_id, selector=selector)
    return {**agreement_stats(dense, sparse), "prompts": n_prompts, "prompt_len": prompt_len, "new_tokens": new_tokens}
