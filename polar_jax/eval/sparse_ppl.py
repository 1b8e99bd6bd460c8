"""Sparse perplexity (masked evaluation with decode semantics) on the standard windowed protocol.

Modes: "dense"; "router" (trained routers from a bundle); "oracle" (true top-k units by output norm, true
union of active MLP neurons). The windows of one evaluation batch form the decode batch whose MLP union
is shared, so `batch_size` is the decode batch size B the MLP k is looked up for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polar_jax.errors import InputError
from polar_jax.eval.perplexity import PerplexityResult, perplexity
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.config import check_density
from polar_jax.routers.sparsify import oracle_sparsifier, router_sparsifier

MODES = ("dense", "router", "oracle")


def build_sparsifier(model: Any, bundle: SparsityBundle | None, mode: str, attn_density: float | None = None,
                     mlp_recall: float | None = 0.99, per_layer: bool = False, attn: bool = True,
                     mlp: bool = True, adaptive: bool = False, mlp_rule: str | None = None,
                     unit: str | None = None) -> Any:
    """The sparsifier for a mode (None = dense). Oracle densities come from `attn_density`, else the bundle;
    the oracle's unit (KV group or query head) is the bundle's, else `unit` (default: see attention_units).
    Router mode: `adaptive` head budgets, `mlp_rule` "threshold" | "topk" (default: the bundle's)."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if attn_density is not None:
        check_density(attn_density)
    if mlp_recall is not None:
        check_density(mlp_recall, "MLP recall target")
    if mode == "dense":
        return None
    if mode == "router":
        if bundle is None:
            raise InputError("router mode needs a sparsity bundle (--sparsity PATH|default)")
        bundle.check_model(model)
        return router_sparsifier(bundle, attn_density, mlp_recall, per_layer, attn, mlp, adaptive=adaptive,
                                 mlp_rule=mlp_rule)
    if bundle is not None:
        bundle.check_model(model)
        k = bundle.config.attn_k(attn_density, per_layer)
        if not attn:
            k = (bundle.config.attn_units,) * model.config.num_layers
        return oracle_sparsifier(model.config, 1.0, mlp=mlp, attn_k=k, unit=bundle.config.unit)
    if attn_density is None:
        raise InputError("oracle mode without a bundle needs an attention density (--attn-density)")
    return oracle_sparsifier(model.config, attn_density if attn else 1.0, mlp=mlp, unit=unit)


def sparse_perplexity(model: Any, tokens: np.ndarray, bundle: SparsityBundle | None = None, mode: str = "router",
                      attn_density: float | None = None, mlp_recall: float | None = 0.99, per_layer: bool = False,
                      attn: bool = True, mlp: bool = True, seq_len: int = 256, batch_size: int = 8,
                      max_tokens: int | None = None, progress: bool = True, adaptive: bool = False,
                      mlp_rule: str | None = None, unit: str | None = None) -> PerplexityResult:
    sp = build_sparsifier(model, bundle, mode, attn_density, mlp_recall, per_layer, attn, mlp, adaptive, mlp_rule,
                          unit)
    return perplexity(model, tokens, seq_len, batch_size, max_tokens=max_tokens, sparsifier=sp, progress=progress)
