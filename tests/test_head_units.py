"""Per-query-head selection on a GQA model (unit="head"): collection labels, router training, the oracle
and router sparsifiers, and the refusal of such routers on the KV-group decode path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED, load_cached, require
from polar_jax.errors import InputError
from polar_jax.models.base import head_output_norms
from polar_jax.models.collect import forward_with_stats, group_norms
from polar_jax.routers.collect import CollectedData, collect
from polar_jax.routers.sparsify import attention_units, oracle_sparsifier, router_selector, router_sparsifier
from polar_jax.routers.train import TrainOptions, train_routers

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


def test_attention_units_options():
    cfg = load_cached("tiny-llama")[0].config  # 16 query heads, 4 KV groups
    assert attention_units(cfg) == (4, "group")
    assert attention_units(cfg, "group") == (4, "group")
    assert attention_units(cfg, "head") == (16, "head")
    mha = load_cached("tiny-opt")[0].config
    assert attention_units(mha) == attention_units(mha, "head") == (mha.num_heads, "head")
    with pytest.raises(InputError, match="attention unit"):
        attention_units(cfg, "neuron")


def test_oracle_over_query_heads_keeps_each_tokens_top_heads():
    model, _ = load_cached("tiny-llama")
    cfg = model.config
    heads = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, cfg.num_heads, cfg.head_dim)), jnp.float32)
    norms = np.asarray(head_output_norms(heads))
    for unit, width, ref_norms in (("head", 16, norms), ("group", 4, np.asarray(group_norms(norms, 4)))):
        sp = oracle_sparsifier(cfg, 0.5, unit=unit)
        assert sp.attn_k == (width,) + (width // 2,) * (cfg.num_layers - 1)  # layer 0 dense
        assert sp.heads_mask(0, None, heads) is None
        mask = np.asarray(sp.heads_mask(1, None, heads))
        assert mask.shape == (2, 5, width)
        want = np.zeros_like(mask)
        np.put_along_axis(want, np.argsort(-ref_norms, axis=-1)[..., : width // 2], 1.0, axis=-1)
        np.testing.assert_array_equal(mask, want)


def test_head_unit_collection_training_and_sparsifiers(tmp_path):
    model, tok = load_cached("tiny-llama")
    cfg = model.config
    kw = dict(seq_len=32, batch_size=4, max_tokens=32 * 8, chunk_tokens=128, progress=False)
    out = collect(model, tok, [require(VALID)], tmp_path / "d", unit="head", **kw)
    data = CollectedData(out)
    assert (data.meta["unit"], data.meta["units"]) == ("head", cfg.num_heads)
    windows = data.field("tokens").reshape(-1, 32)
    _, stats = forward_with_stats(model, windows)
    for layer in (1, cfg.num_layers - 1):  # labels are per-query-head norms, not per-group norms
        want = np.asarray(stats["head_norm"][layer]).reshape(-1, cfg.num_heads)
        np.testing.assert_allclose(data.field("unit_norm", layer), want, rtol=1e-5, atol=1e-6)
    bundle = train_routers(data, opts=TrainOptions(epochs=1, batch_size=64), log=lambda _: None, progress=False)
    assert (bundle.config.unit, bundle.config.attn_units) == ("head", cfg.num_heads)
    assert bundle.attn(1)[0].shape == (cfg.hidden_size, cfg.num_heads)
    sp = router_sparsifier(bundle, attn_density=0.25)
    h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, cfg.hidden_size)), jnp.float32)
    mask = np.asarray(sp.heads_mask(1, h, None))
    assert mask.shape == (2, 3, cfg.num_heads) and (mask.sum(-1) == 4).all()
    logits = np.asarray(h) @ bundle.attn(1)[0] + bundle.attn(1)[1]
    want = np.zeros_like(mask)
    np.put_along_axis(want, np.argsort(-logits, axis=-1)[..., :4], 1.0, axis=-1)
    np.testing.assert_array_equal(mask, want)
    # Evaluation through the model: masking 4 of 16 heads changes the logits, masking none does not.
    toks = jnp.asarray(windows[:1, :16])
    dense = np.asarray(model(toks))
    assert not np.allclose(np.asarray(model(toks, sparsifier=sp)), dense, atol=1e-3)
    np.testing.assert_allclose(np.asarray(model(toks, sparsifier=router_sparsifier(bundle, attn_density=1.0))),
                               dense, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="query heads"):
        router_selector(bundle, attn_density=0.5)
    assert router_selector(bundle, attn_density=0.5, attn=False) is not None  # MLP-only selection is fine
