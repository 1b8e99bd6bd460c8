"""Calibration of what each layer keeps, on held-out router data (the validation split of training).

MLP (PAPER.md method 3): for each layer and batch size B, the smallest k (a multiple of the kernel tile)
whose mean recall of the true union of active neurons, over random batches of B tokens, reaches the
target. The k for batch sizes in between is interpolated by `MLPTable.k_for`; k never decreases with B
(the union of more sequences never needs fewer neurons: a running maximum removes sampling noise).

MLP threshold rule (no sort at decode time): for each layer and B, the largest router-logit threshold t
such that the union over the batch of {neurons whose logit > t in some row} recalls the true union at the
target on average, and the most neurons that rule selected over the calibration batches (the static
capacity of the compiled step, with a margin).

Attention, input-adaptive budgets: per layer and k = 1..U, the logit threshold whose per-token count of
units above it, clipped to [floor, cap], averages k.

Attention: a global density (layer 0 dense) and, optionally, per-layer densities allocated from measured
head importance: for each layer the fraction of attention-output mass (sum of squared unit norms) kept by
the router's top-k units, k = 0..U; units are handed out greedily where they keep the most extra mass, with
the same total as the global density. A bundle with several attention-router sets gets the importance
curves and adaptive thresholds of each set (measured with that set's logits); the MLP tables once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from polar_jax.errors import InputError
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.validate import check
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.config import (CALIBRATION_BATCH_SIZES, MLPTable, allocate_units,  # noqa: F401 (re-export)
                                      budget_bounds, check_density, nearest_attn_set)


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
    row = [smallest_k(union_recall_curve(scores, labels, b, max(n_batches, 2048 // b), rng), target, tile)
           for b in batch_sizes]
    return monotone_k(row, labels.shape[1])


def monotone_k(row: Sequence[int], n: int) -> list[int]:
    """k per batch size made non-decreasing (running maximum) and capped at N."""
    return [int(min(n, v)) for v in np.maximum.accumulate(np.asarray(row, np.int64))]


def calibrate_mlp_thresholds(logits: np.ndarray, labels: np.ndarray, target: float, tile: int,
                             batch_sizes: Sequence[int] = CALIBRATION_BATCH_SIZES, n_batches: int = 64,
                             seed: int = 0, margin: float = 1.1) -> tuple[list[float], list[int], list[float]]:
    """Threshold rule for one layer: (thresholds, capacities, mean kept fraction) per batch size.

    logits [n, N] are the router's raw logits, labels [n, N] the true activity."""
    rng = np.random.default_rng(seed)
    n, width = labels.shape
    thresholds, capacity, kept = [], [], []
    for b in batch_sizes:
        if b > n:
            raise InputError(f"calibration needs at least {b} held-out tokens, have {n}: collect more text")
        draws = max(n_batches, 2048 // b)
        maxes, vals, wts, base = [], [], [], 0.0
        for _ in range(draws):
            idx = rng.choice(n, size=b, replace=False)
            m = logits[idx].max(axis=0)
            union = labels[idx].any(axis=0)
            maxes.append(m)
            size = int(union.sum())
            if size == 0:
                base += 1.0 / draws  # nothing to find: full recall at any threshold
                continue
            vals.append(m[union])
            wts.append(np.full(size, 1.0 / (size * draws)))
        t = _largest_threshold(np.concatenate(vals) if vals else np.zeros(0), np.concatenate(wts) if wts else
                               np.zeros(0), target - base)
        counts = np.array([(m > t).sum() for m in maxes])
        thresholds.append(float(t))
        capacity.append(int(min(width, np.ceil(counts.max() * margin / tile) * tile)) if counts.max() > 0 else tile)
        kept.append(float(counts.mean() / width))
    return thresholds, [int(c) for c in np.maximum.accumulate(capacity)], kept


def _largest_threshold(vals: np.ndarray, wts: np.ndarray, need: float) -> float:
    """Largest t with sum(wts[vals > t]) >= need (t halfway below the deciding value)."""
    if vals.size == 0 or need <= 0:
        return float(vals.max()) if vals.size else 0.0
    order = np.argsort(-vals, kind="stable")
    v, c = vals[order], np.cumsum(wts[order])
    j = int(np.searchsorted(c, need - 1e-12))
    if j >= v.size:
        return float(v[-1]) - 1.0  # unreachable target: keep everything the router ever predicts
    below = v[j + 1:]
    below = below[below < v[j]]
    return float((v[j] + below[0]) / 2) if below.size else float(v[j]) - 1e-3 * (1 + abs(float(v[j])))


def adaptive_thresholds(logits: np.ndarray, floor_frac: float, cap_frac: float) -> list[float]:
    """Per k = 1..U, the threshold whose per-token count of units above it, clipped to the budget's
    [floor, cap], averages k (bisection: the clipped mean falls as the threshold rises)."""
    units = logits.shape[1]
    lo0, hi0 = float(logits.min()) - 1.0, float(logits.max()) + 1.0
    out = []
    for k in range(1, units + 1):
        floor, cap = budget_bounds(k, units, floor_frac, cap_frac)
        lo, hi = lo0, hi0
        for _ in range(60):
            mid = (lo + hi) / 2
            mean = np.clip((logits > mid).sum(axis=1), floor, cap).mean()
            lo, hi = (mid, hi) if mean > k else (lo, mid)
        out.append(float((lo + hi) / 2))
    return out


def importance_curve(router_scores: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[U+1]: mean fraction of attention-output mass kept by each token's top-k router units, k = 0..U."""
    mass = np.square(norms.astype(np.float64))
    order = np.argsort(-router_scores, axis=-1, kind="stable")
    kept = np.cumsum(np.take_along_axis(mass, order, axis=-1), axis=-1) / np.maximum(mass.sum(-1, keepdims=True), 1e-30)
    return np.concatenate([[0.0], kept.mean(axis=0)])


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
    check("tile", tile)
    check("batches", n_batches, "number of calibration batches")
    check_density(dense_threshold, "dense fallback threshold")
    for r in recalls:
        check_density(r, "recall target")
    bs = sorted(set(int(b) for b in batch_sizes))
    if not bs or bs[0] < 1:
        raise InputError(f"batch sizes must be positive, got {batch_sizes}")
    train = c.train or {}
    _, val = data.split(float(train.get("val_fraction", 0.1)), int(train.get("seed", 0)))
    sets = [bundle.attention_set(i) for i in range(bundle.num_attn_sets)]
    attention = [([], []) for _ in sets]  # per set: importance curves, head thresholds
    tables: dict[float, dict[str, list]] = {r: {"k": [], "thresholds": [], "capacity": [], "union": []}
                                            for r in recalls}
    for layer in tqdm(range(c.num_layers), desc="calibrate", unit="layer", disable=not progress):
        if layer in c.dense_layers:
            for importance, head_thresholds in attention:
                importance.append(tuple(np.linspace(0, 1, c.attn_units + 1)))
                head_thresholds.append(tuple([float("-inf")] * c.attn_units))
            for r in recalls:
                for key, value in (("k", c.ffn), ("thresholds", float("-inf")), ("capacity", c.ffn), ("union", 1.0)):
                    tables[r][key].append([value] * len(bs))
            continue
        x = data.field("router_input", layer)[val]
        norms = data.field("unit_norm", layer)[val]
        for single, (importance, head_thresholds) in zip(sets, attention):
            attn_logits = single.attn_logits(layer, x)
            curve = importance_curve(attn_logits, norms)
            importance.append(tuple(float(v) for v in curve))
            head_thresholds.append(tuple(adaptive_thresholds(attn_logits, c.attn_budget_floor, c.attn_budget_cap)))
            which = f" (set trained at {single.config.attn_train_density})" if len(sets) > 1 else ""
            log(f"layer {layer}: attention mass kept by router top-k{which}, k=1..{c.attn_units}: "
                + " ".join(f"{v:.3f}" for v in curve[1:]))
        if c.mlp_router:
            a, bb = bundle.mlp(layer)
            logits = (x @ a) @ bb
            scores = np.maximum(logits, 0.0)  # ReLU'd logits, summed over the batch (top-k rule)
            labels = data.field("mlp_active", layer)[val]
            for r in recalls:
                row = calibrate_mlp_layer(scores, labels, r, tile, bs, n_batches, seed=layer)
                thr, cap, kept = calibrate_mlp_thresholds(logits, labels, r, tile, bs, n_batches, seed=layer)
                for key, value in (("k", row), ("thresholds", thr), ("capacity", cap), ("union", kept)):
                    tables[r][key].append(value)
                log(f"layer {layer}: MLP at recall {r} for B={bs}: top-k {row}; threshold rule keeps "
                    + " ".join(f"{100 * v:.0f}%" for v in kept))
    if layer_densities is not None:
        layer_densities = tuple(check_density(v, "layer density") for v in layer_densities)
        if len(layer_densities) != c.num_layers:
            raise InputError(f"need {c.num_layers} layer densities (layer 0 included), got {len(layer_densities)}")
    rho = check_density(attn_density) if attn_density is not None else c.attn_density
    if c.attn_sets:
        new = dataclasses.replace(
            c, attn_sets=tuple(dataclasses.replace(s, importance=tuple(imp), thresholds=tuple(thr))
                               for s, (imp, thr) in zip(c.attn_sets, attention)),
            mlp_tile=tile, mlp_dense_threshold=dense_threshold, attn_density=rho, attn_layer_densities=layer_densities,
            attn_train_density=c.attn_train_densities[nearest_attn_set(c.attn_train_densities, rho, c.attn_units)])
    else:
        new = dataclasses.replace(
            c, attn_importance=tuple(attention[0][0]), mlp_tile=tile, mlp_dense_threshold=dense_threshold,
            attn_density=rho, attn_layer_densities=layer_densities, attn_thresholds=tuple(attention[0][1]),
        )
    if c.mlp_router:
        def rows(r, key):
            return tuple(tuple(row) for row in tables[r][key])

        new = new.with_tables([MLPTable(float(r), tuple(bs), rows(r, "k"), rows(r, "thresholds"), rows(r, "capacity"),
                                        rows(r, "union")) for r in recalls])
    return SparsityBundle(new, bundle.params, bundle.signature)
