"""Router pipeline: collect router data, train routers (NNX + Optax), calibrate per-layer top-k, and the
sparsity bundle the sparse evaluation and sparse decode consume.

    model, tok = polar_jax.load("default")
    bundle = polar_jax.load_sparsity("default", model)
    sel = router_selector(bundle, attn_density=0.5, mlp_recall=0.99)
    polar_jax.generate(model, prompts, 32, selector=sel)
"""

from polar_jax.routers.bundle import ModelMismatchError, SparsityBundle, load_bundle, load_sparsity
from polar_jax.routers.config import MLPTable, SparsityConfig
from polar_jax.routers.sparsify import (
    OracleSparsifier,
    RouterSelector,
    RouterSparsifier,
    oracle_sparsifier,
    router_selector,
    router_sparsifier,
)

__all__ = [
    "SparsityBundle", "SparsityConfig", "MLPTable", "ModelMismatchError", "load_bundle", "load_sparsity",
    "RouterSparsifier", "RouterSelector", "OracleSparsifier", "router_sparsifier", "router_selector",
    "oracle_sparsifier",
]
