"""From a user's sparsity settings to the selector the decode step runs, with checks before tracing.

`sparse_selector` loads the bundle (refusing one made for another model), asks the step-level policy
what to sparsify at this batch size and context, and builds a `RouterSelector` with router weights in
the model's dtype. `check_selector` refuses a selector whose shapes do not fit the model, so a mismatch
is one clear error instead of a failure inside jit.
"""

from __future__ import annotations

from typing import Any

from pallas_kernels.backends import CHOICES as IMPL_CHOICES
from polar_jax.errors import InputError
from polar_jax.models import CausalLM
from polar_jax.policy import PARTS, choose_variant
from polar_jax.routers.bundle import SparsityBundle, load_sparsity
from polar_jax.routers.config import check_density
from polar_jax.routers.sparsify import RouterSelector, fuse_routers_for, router_selector

__all__ = ["IMPL_CHOICES", "sparse_selector", "check_selector"]


def sparse_selector(model: CausalLM, sparsity: Any, batch: int, context: int, attn_density: float | None = None,
                    mlp_recall: float | None = 0.99, policy: str = "auto", adaptive: bool = False,
                    impl: str = "auto", balance: int = 1) -> RouterSelector | None:
    """The decode selector for `sparsity` (a SparsityBundle, a bundle folder or "default"); None when the
    policy decides that dense decoding is fastest here. `balance` n > 1: the head budget per shard of n
    tensor-parallel shards (balanced top-k)."""
    if policy != "auto" and policy not in PARTS:
        raise InputError(f"policy must be 'auto' or one of {sorted(PARTS)}, got {policy!r}")
    if attn_density is not None:
        check_density(attn_density)
    if mlp_recall is not None:
        check_density(mlp_recall, "MLP recall target")
    bundle = sparsity if isinstance(sparsity, SparsityBundle) else load_sparsity(sparsity, model)
    bundle.check_model(model)
    variant = choose_variant(model.config, batch, context, bundle.config.mlp_router) if policy == "auto" else policy
    attn, mlp = PARTS[variant]
    if mlp and not bundle.config.mlp_router:
        if policy == "mlp":
            raise InputError("this bundle has no MLP routers (MLP sparsity needs a ReLU model such as OPT)")
        mlp = False
    if not attn and not mlp:
        return None
    return router_selector(bundle, attn_density=attn_density, mlp_recall=mlp_recall if mlp else None,
                           attn=attn, mlp=mlp, adaptive=adaptive, dtype=model.dtype, select_impl=impl,
                           balance=balance, fuse_routers=fuse_routers_for(batch))


def check_selector(model: CausalLM, selector: Any) -> None:
    """Refuses a router selector built for another architecture (layers, width, heads, MLP size)."""
    if not isinstance(selector, RouterSelector):
        return  # a user's own DecodeSelector: nothing to compare
    cfg, plan = model.config, selector.plan
    problems = []
    if plan is not None and plan.num_layers != cfg.num_layers:
        problems.append(f"{plan.num_layers} layers vs the model's {cfg.num_layers}")
    # the attention router's input matrix: w1 [d, h] with a hidden layer, else w [d, U]
    attn_in = selector.attn_w1 if selector.attn_w1 is not None else selector.attn_w
    for name, arrays, axis, want in (("attention router", attn_in, 0, cfg.hidden_size),
                                     ("MLP router", selector.mlp_a, 1, cfg.hidden_size),
                                     ("MLP router", selector.mlp_b, selector.mlp_neuron_axis, cfg.intermediate_size)):
        shapes = {a.shape[axis] for a in arrays if a is not None}
        if shapes and shapes != {want}:
            problems.append(f"{name} dimension {sorted(shapes)} vs the model's {want}")
    units = {a.shape[1] for a in selector.attn_w if a is not None}
    if units and units - {cfg.num_heads, cfg.num_kv_heads}:
        problems.append(f"attention router scores {sorted(units)} units, the model has {cfg.num_heads} heads / "
                        f"{cfg.num_kv_heads} KV groups")
    if problems:
        raise InputError("this selector was built for another model: " + "; ".join(problems))
