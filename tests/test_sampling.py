"""The sampling distribution itself: temperature and nucleus (top-p) frequencies on fixed logits against
the softmax they promise, within 3 standard deviations over 20k draws per setting (one jitted call).

The seeds are fixed, so each check is deterministic; a correct sampler passes a 3-sigma band per token, and
a wrong temperature (x T instead of / T) or nucleus (one token too many or too few) moves at least one
frequency by tens of sigmas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from polar_jax.decode import sample_tokens

DRAWS = 20_000
# Unsorted on purpose: the sampler sorts internally and must map choices back to the right token ids.
LOGITS = np.array([1.5, 0.3, 2.2, -0.5, 0.9, 0.0, -2.0], np.float32)
# (temperature, top_p): T = 1 and top_p = 1 leave the softmax as is; the others change it visibly.
SETTINGS = [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.8), (0.7, 0.6), (1.5, 0.95)]


def expected_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Reference in float64: softmax(logits / T), keep the smallest prefix (by probability) whose mass
    reaches top_p, renormalise."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]  # mass of the strictly more likely tokens
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@jax.jit
def _draw_all(keys, temps, top_ps):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, LOGITS.size))
    return jax.vmap(lambda k, t, p: sample_tokens(logits, k, t, p, False))(keys, temps, top_ps)


def assert_frequencies(tokens: np.ndarray, probs: np.ndarray, what: str) -> None:
    n = tokens.size
    counts = np.bincount(tokens.reshape(-1), minlength=probs.size)
    assert counts.size == probs.size, f"{what}: token id out of range"
    freq = counts / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    for v in range(probs.size):
        if probs[v] == 0:
            assert counts[v] == 0, f"{what}: token {v} is outside the nucleus but was drawn {counts[v]} times"
        else:
            assert abs(freq[v] - probs[v]) <= 3 * sigma[v], (
                f"{what}: token {v} frequency {freq[v]:.4f}, expected {probs[v]:.4f} +- {3 * sigma[v]:.4f}")


def test_temperature_and_top_p_frequencies_match_the_softmax():
    temps = jnp.asarray([t for t, _ in SETTINGS], jnp.float32)
    top_ps = jnp.asarray([p for _, p in SETTINGS], jnp.float32)
    keys = jax.random.split(jax.random.key(1234), len(SETTINGS))
    draws = np.asarray(_draw_all(keys, temps, top_ps))
    assert draws.shape == (len(SETTINGS), DRAWS) and draws.dtype == np.int32
    for (t, p), tokens in zip(SETTINGS, draws):
        assert_frequencies(tokens, expected_probs(LOGITS, t, p), f"T={t} top_p={p}")
    # The settings really differ: the reference distributions are far apart (so the test can tell them apart).
    ref = [expected_probs(LOGITS, t, p) for t, p in SETTINGS]
    assert min(np.abs(a - b).max() for i, a in enumerate(ref) for b in ref[i + 1:]) > 0.05


def test_nucleus_sizes_are_the_smallest_prefix_reaching_top_p():
    """Sorted probabilities of LOGITS at T=1 are about .45 .22 .14 .08 .06 .04 .01: the nucleus for top_p
    just above a cumulative mass includes the next token, just below it does not."""
    p = np.sort(expected_probs(LOGITS, 1.0, 1.0))[::-1]
    cum = np.cumsum(p)
    for j in (0, 1, 2):
        below = expected_probs(LOGITS, 1.0, float(cum[j]) - 1e-3)
        above = expected_probs(LOGITS, 1.0, float(cum[j]) + 1e-3)
        assert (below > 0).sum() == j + 1 and (above > 0).sum() == j + 2
        keys = jax.random.split(jax.random.key(j), 2)
        draws = np.asarray(_draw_all(keys, jnp.ones(2, jnp.float32),
                                     jnp.asarray([cum[j] - 1e-3, cum[j] + 1e-3], jnp.float32)))
        assert_frequencies(draws[0], below, f"top_p just below {cum[j]:.3f}")
        assert_frequencies(draws[1], above, f"top_p just above {cum[j]:.3f}")


def test_a_prefix_whose_mass_equals_top_p_closes_the_nucleus():
    """Four equal logits: each probability is exactly 0.25 in float32, so the mass before the j-th token is
    exactly j/4. At top_p = j/4 the nucleus holds j tokens (a token is dropped once the mass before it
    reaches top_p, HF's rule), not j + 1; which of the tied tokens is left to the sort, so only the count
    and the frequencies are checked."""
    ps = jnp.asarray([0.25, 0.5, 0.75], jnp.float32)
    draws = np.asarray(jax.jit(jax.vmap(lambda k, p: sample_tokens(jnp.zeros((DRAWS, 4), jnp.float32), k,
                                                                   jnp.float32(1.0), p, False)))(
        jax.random.split(jax.random.key(77), 3), ps))
    for j, tokens in enumerate(draws, start=1):
        kept = np.unique(tokens)
        assert kept.size == j, f"top_p={j / 4}: {kept.size} tokens drawn, the nucleus holds {j}"
        probs = np.zeros(4)
        probs[kept] = 1.0 / j
        assert_frequencies(tokens, probs, f"top_p={j / 4}")


def test_greedy_is_argmax_per_row():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    got = sample_tokens(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), True)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))


@pytest.fixture(scope="module")
def default():
    return polar_jax.load("default")


def test_generate_samples_its_first_token_from_the_tempered_nucleus(default):
    """End to end: `generate` feeds its temperature and top_p to the sampler (the first token of 1024
    identical prompts is 2048 independent draws from the prefill logits)."""
    model, tok = default
    prompt = tok.encode("The history of the city")
    logits = np.asarray(model(jnp.asarray([prompt]))[0, -1], np.float32)
    n = 1024
    for temperature, top_p, seed in ((0.5, 0.9, 11), (1.5, 0.6, 12)):
        out = polar_jax.generate(model, [prompt] * n, 1, temperature=temperature, top_p=top_p, seed=seed,
                                 eos_token_id=())
        probs = expected_probs(logits, temperature, top_p)
        # Pool the nucleus tail into one bin so each checked probability is large enough for 3 sigma.
        top = np.argsort(-probs)[:3]
        pooled = np.where(np.isin(out[:, 0], top), out[:, 0], -1)
        for v in top:
            f, q = np.mean(pooled == v), probs[v]
            assert abs(f - q) <= 3 * np.sqrt(q * (1 - q) / n), (temperature, top_p, v, f, q)
        assert np.all(probs[out[:, 0]] > 0), "a token outside the nucleus was drawn"
