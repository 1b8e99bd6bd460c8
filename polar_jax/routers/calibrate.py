"""Calibration of what each layer keeps, on held-out router data (the validation split of training).

MLP (PAPER.md method 3): for each layer and batch size B, the smallest k (a multiple of the kernel tile)
whose mean recall of the true union of active neurons, over random batches of B tokens, reaches the
target. The k for batch sizes in between is interpolated by `MLPTable.k_for`.

Attention: a global density (layer 0 dense) and, optionally, per-layer densities allocated from measured
head importance: for each layer the fraction of attention-output mass (sum of squared unit norms) kept by
the router's top-k units, k = 0..U; units are handed out greedily where they keep the most extra mass, with
the same total as the global density.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from polar_jax.errors import InputError
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.config import CALIBRATION_BATCH_SIZES, MLPTable, check_density


def union_recall_curve(scores: np.ndarray, labels: np.ndarray, batch: int, n_batches: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Mean over `n_batches` random batches of `batch` rows of the recall of the batch's true union of
    positives by the top-k of the batch-summed scores, for every k = 1..N (returned [N])."""
    n, width = labels.shape
    if batch > n:
        raise InputError(f"calibration needs at least {batch} held-out tokens, have {n}: collect more text")
    total = np.zeros(width, np.float64)
    for _ in range(n_batches):
        idx = rng.choice(n, size=batch, replace=False)
        union = labels[idx].any(axis=0)
        size = union.sum()
        if size == 0:
            total += 1.0  # nothing to find: every k has full recall
            continue
        order = np.argsort(-scores[idx].sum(axis=0), kind="stable")
        total += np.cumsum(union[order]) / size
    return total / n_batches


def smallest_k(curve: np.ndarray, target: float, tile: int) -> int:
    """Smallest multiple of `tile` (capped at N) whose recall curve value reaches `target`; N if none."""
    width = len(curve)
    for k in range(tile, width + tile, tile):
        k = min(k, width)
        if curve[k - 1] >= target - 1e-12:
            return k
    return width


def calibrate_mlp_layer(scores: np.ndarray, labels: np.ndarray, target: float, tile: int,
                        batch_sizes: Sequence[int] = CALIBRATION_BATCH_SIZES, n_batches: int = 64,
                        seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    # Small batches need more draws: the mean recall at B=1 is set by the rare hard tokens.
    return [smallest_k(union_recall_curve(scores, labels, b, max(n_batches, 2048 // b), rng), target, tile)
            for b in batch_sizes]


def importance_curve(router_scores: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[U+1]: mean fraction of attention-output mass kept by each token's top-k router units, k = 0..U."""
    mass = np.square(norms.astype(np.float64))
    order = np.argsort(-router_scores, axis=-1, kind="stable")
    kept = np.cumsum(np.take_along_axis(mass, order, axis=-1), axis=-1) / np.maximum(mass.sum(-1, keepdims=True), 1e-30)
    return np.concatenate([[0.0], kept.mean(axis=0)])


def allocate_units(curves: Sequence[Sequence[float]], total: int, units: int) -> list[int]:
    """Units per layer summing to `total` (each in [1, U]), greedily where the kept mass grows most."""
    n = len(curves)
    total = max(n, min(total, n * units))
    ks = [1] * n
    for _ in range(total - n):
        gains = [curves[i][ks[i] + 1] - curves[i][ks[i]] if ks[i] < units else -np.inf for i in range(n)]
        # Equal gains go to the layer holding fewest units (then the lower layer): spreads flat curves.
        ks[max(range(n), key=lambda i: (round(float(gains[i]), 9), -ks[i], -i))] += 1
    return ks


def calibrate(
    bundle: SparsityBundle,
    data: CollectedData,
    recalls: Sequence[float] = (0.99,),
    batch_sizes: Sequence[int] = CALIBRATION_BATCH_SIZES,
    tile: int = 32,
    n_batches: int = 64,
    dense_threshold: float = 0.75,
    attn_density: float | None = None,
    layer_densities: Sequence[float] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> SparsityBundle:
    """Returns the bundle with MLP k tables for each recall target, head-importance curves, and the
    attention density settings; uses only the held-out split the routers were not trained on."""
    c = bundle.config
    if tile < 1:
        raise InputError(f"tile must be >= 1, got {tile}")
    check_density(dense_threshold, "dense fallback threshold")
    for r in recalls:
        check_density(r, "recall target")
    bs = sorted(set(int(b) for b in batch_sizes))
    if not bs or bs[0] < 1:
        raise InputError(f"batch sizes must be positive, got {batch_sizes}")
    train = c.train or {}
    _, val = data.split(float(train.get("val_fraction", 0.1)), int(train.get("seed", 0)))
    importance: list[tuple[float, ...]] = []
    ks: dict[float, list[list[int]]] = {r: [] for r in recalls}
    for layer in tqdm(range(c.num_layers), desc="calibrate", unit="layer", disable=not progress):
        if layer in c.dense_layers:
            importance.append(tuple(np.linspace(0, 1, c.attn_units + 1)))
            for r in recalls:
                ks[r].append([c.ffn] * len(bs))
            continue
        x = data.field("router_input", layer)[val]
        w, b = bundle.attn(layer)
        curve = importance_curve(x @ w + b, data.field("unit_norm", layer)[val])
        importance.append(tuple(float(v) for v in curve))
        log(f"layer {layer}: attention mass kept by router top-k, k=1..{c.attn_units}: "
            + " ".join(f"{v:.3f}" for v in curve[1:]))
        if c.mlp_router:
            a, bb = bundle.mlp(layer)
            scores = np.maximum((x @ a) @ bb, 0.0)  # ReLU'd logits, summed over the batch (decode rule)
            labels = data.field("mlp_active", layer)[val]
            for r in recalls:
                row = calibrate_mlp_layer(scores, labels, r, tile, bs, n_batches, seed=layer)
                ks[r].append(row)
                log(f"layer {layer}: MLP k at recall {r} for B={bs}: {row}")
    if layer_densities is not None:
        layer_densities = tuple(check_density(v, "layer density") for v in layer_densities)
        if len(layer_densities) != c.num_layers:
            raise InputError(f"need {c.num_layers} layer densities (layer 0 included), got {len(layer_densities)}")
    new = dataclasses.replace(
        c, attn_importance=tuple(importance), mlp_tile=tile, mlp_dense_threshold=dense_threshold,
        attn_density=check_density(attn_density) if attn_density is not None else c.attn_density,
        attn_layer_densities=layer_densities,
    )
    if c.mlp_router:
        new = new.with_tables([MLPTable(float(r), tuple(bs), tuple(tuple(row) for row in ks[r])) for r in recalls])
    return SparsityBundle(new, bundle.params, bundle.signature)
