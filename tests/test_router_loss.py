"""The attention-router ranking losses (`train.pairwise_mass_loss`, `train-routers --attn-loss`): values
checked by hand, the top-k boundary variant, a router trained with them, and the flag."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import model_dir, require
from polar_jax.cli import main
from polar_jax.errors import InputError
from polar_jax.routers import load_bundle
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.train import TrainOptions, pairwise_mass_loss, train_attention_router, train_routers
from test_cli_routers import VALID

LN2 = math.log(2.0)


def test_pairwise_mass_loss_by_hand():
    """norms (3, 2, 1) share 1/2, 1/3, 1/6: the pairs weigh 1/6 (0>1), 1/3 (0>2), 1/6 (1>2); at equal logits
    each pair costs ln 2. Top-1 boundary: only the pairs of unit 0 with the others."""
    norms = jnp.asarray([[3.0, 2.0, 1.0]])
    zero = jnp.zeros((1, 3))
    np.testing.assert_allclose(float(pairwise_mass_loss(zero, norms)), (1 / 6 + 1 / 3 + 1 / 6) * LN2, rtol=1e-6)
    np.testing.assert_allclose(float(pairwise_mass_loss(zero, norms, k=1)), (1 / 6 + 1 / 3) * LN2, rtol=1e-6)
    np.testing.assert_allclose(float(pairwise_mass_loss(zero, norms, k=2)), (1 / 3 + 1 / 6) * LN2, rtol=1e-6)
    # a correct order with margins costs little, the reversed order much more; the weight is the mass lost
    good, bad = jnp.asarray([[5.0, 0.0, -5.0]]), jnp.asarray([[-5.0, 0.0, 5.0]])
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    want_bad = (1 / 6) * sp(5) + (1 / 3) * sp(10) + (1 / 6) * sp(5)
    np.testing.assert_allclose(float(pairwise_mass_loss(bad, norms)), want_bad, rtol=1e-5)
    assert float(pairwise_mass_loss(good, norms)) < 0.01 * want_bad
    # equal norms: no pair carries weight; rows are averaged
    two = jnp.asarray([[1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    np.testing.assert_allclose(float(pairwise_mass_loss(jnp.zeros((2, 3)), two)), (2 / 3) * LN2 / 2, rtol=1e-6)


@pytest.mark.parametrize("loss", ["pair", "pair_k"])
def test_ranking_losses_train_a_router(loss):
    """Unit j's norm is |x_j| times a fixed gain: the hidden-layer router trained on the ranking loss finds
    the top-2 of 4 (the gains make the labels depend on more than the sign pattern)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 16)).astype(np.float32)
    norms = np.abs(x[:, :4]) * np.asarray([1.0, 0.7, 1.3, 0.5], np.float32)
    opts = TrainOptions(epochs=25, lr=3e-3, batch_size=256, patience=5, seed=0)
    router, info = train_attention_router(x[:5000], norms[:5000], x[5000:], norms[5000:], 2, opts, hidden=32,
                                          loss=loss, log=lambda s: None, progress=False)
    assert info["best_val_recall"] > 0.85
    with pytest.raises(InputError, match="loss must be one of"):
        train_attention_router(x[:10], norms[:10], x[10:20], norms[10:20], 2, opts, loss="mse")


def test_attn_loss_flag(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["collect", "--model", str(model_dir("tiny-llama")), "--text", str(require(VALID)), "--out", str(data),
                 "--seq-len", "32", "--max-tokens", "1280", "--batch-size", "8"]) == 0
    assert main(["train-routers", "--data", str(data), "--out", str(tmp_path / "b"), "--attn-loss", "pair_k",
                 "--epochs", "1", "--batch-size", "128", "--val-fraction", "0.2"]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.config.train["attn_loss"] == "pair_k"
    capsys.readouterr()
    assert main(["train-routers", "--data", str(data), "--out", str(tmp_path / "c"), "--attn-loss", "mse"]) == 2
    assert "invalid choice: 'mse'" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with pytest.raises(InputError, match="loss must be one of"):
        train_routers(CollectedData(data), attn_loss="mse", progress=False)
