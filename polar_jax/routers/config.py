"""SparsityConfig: what a sparse model keeps per layer (JSON-serialisable, stored in a sparsity bundle).

- Attention: a global density rho (fraction of units kept; a unit is a query head for MHA and a KV group
  for GQA), layer 0 always dense, optionally per-layer densities (explicit, or allocated from measured
  head importance curves so the average stays rho).
- Several attention-router sets (optional): each trained on the top-k labels of one density; the set that
  serves a requested density is chosen by `ATTN_SET_RULE` (see `nearest_attn_set`).
- MLP (ReLU models): per recall target, a table layer x batch size -> k (union top-k, a multiple of the
  kernel tile), with a dense fallback when k / N exceeds `mlp_dense_threshold`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from polar_jax.config import ModelConfig
from polar_jax.errors import InputError
from polar_jax.validate import check

CALIBRATION_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def check_density(rho: float, what: str = "attention density") -> float:
    """A density is a fraction of units kept: it must lie in (0, 1]."""
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in (0, 1], got {rho!r}") from None
    if not (0.0 < rho <= 1.0) or math.isnan(rho):
        raise InputError(f"{what} must be in (0, 1], got {rho}")
    return rho


def units_kept(rho: float, units: int) -> int:
    """floor(rho * units) as in the paper (PS-rho), at least one unit; tolerant of float noise."""
    return max(1, min(units, int(math.floor(rho * units + 1e-9))))


def _log2_interp(bs: tuple[int, ...], values: tuple, batch: int) -> float:
    """Value at any batch size: exact at calibrated sizes, linear in log2(B) in between, clamped to the
    ends outside the calibrated range."""
    if batch <= bs[0]:
        return float(values[0])
    if batch >= bs[-1]:
        return float(values[-1])
    j = next(i for i, b in enumerate(bs) if b >= batch)
    if bs[j] == batch:
        return float(values[j])
    lo, hi = math.log2(bs[j - 1]), math.log2(bs[j])
    w = (math.log2(batch) - lo) / (hi - lo)
    return float(values[j - 1]) + w * (float(values[j]) - float(values[j - 1]))


@dataclasses.dataclass(frozen=True)
class MLPTable:
    """What the MLP keeps per (layer, calibrated batch size) for one recall target; layer 0 holds N (dense).

    - `k`: the paper's rule, the union top-k of batch-summed scores (non-decreasing in B, <= N).
    - `thresholds` (optional): the threshold rule, a neuron is kept when any live row's router logit
      exceeds the threshold; no sort is needed at decode time. `capacity` is the most neurons that
      rule selected in calibration (plus a margin), the static slot count of the compiled step; a union
      that does not fit runs the dense MLP. `union` is the mean fraction of N the rule kept.
    """

    recall: float
    batch_sizes: tuple[int, ...]
    k: tuple[tuple[int, ...], ...]  # [layer][batch-size index]
    thresholds: tuple[tuple[float, ...], ...] | None = None
    capacity: tuple[tuple[int, ...], ...] | None = None
    union: tuple[tuple[float, ...], ...] | None = None

    def k_for(self, layer: int, batch: int, tile: int, n: int) -> int:
        """k at any batch size: exact at calibrated sizes, linear in log2(B) in between (rounded up to the
        tile), clamped to the ends outside the calibrated range."""
        k = _log2_interp(self.batch_sizes, self.k[layer], batch)
        if batch in self.batch_sizes or batch <= self.batch_sizes[0] or batch >= self.batch_sizes[-1]:
            return int(k)
        return min(n, int(math.ceil(k / tile - 1e-9)) * tile)

    @property
    def has_thresholds(self) -> bool:
        return self.thresholds is not None and self.capacity is not None

    def threshold_for(self, layer: int, batch: int) -> float:
        """The threshold rule's logit threshold for a decode batch of `batch` live rows."""
        return _log2_interp(self.batch_sizes, self.thresholds[layer], batch)

    def capacity_for(self, layer: int, batch: int, n: int) -> int:
        """Static slots for a batch of up to `batch` rows: the capacity of the smallest calibrated size that
        covers it (N beyond the calibrated range)."""
        for b, c in zip(self.batch_sizes, self.capacity[layer]):
            if b >= batch:
                return min(n, int(c))
        return n

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"recall": self.recall, "batch_sizes": list(self.batch_sizes), "k": [list(r) for r in self.k]}
        for name in ("thresholds", "capacity", "union"):
            if getattr(self, name) is not None:
                d[name] = [list(r) for r in getattr(self, name)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLPTable":
        def table(name, kind):
            return None if d.get(name) is None else tuple(tuple(kind(x) for x in r) for r in d[name])

        return cls(float(d["recall"]), tuple(int(b) for b in d["batch_sizes"]), table("k", int),
                   table("thresholds", float), table("capacity", int), table("union", float))


UNITS = ("group", "head")

# How a bundle with several attention-router sets picks the set serving density rho (stored in the bundle's
# config as `attn_set_rule`, so a reader knows which rule the bundle was written for):
# "nearest_k": the set whose training label count k_s = floor(rho_s * U) is nearest the count served,
# k = floor(rho * U) (what `units_kept` gives); a tie goes to the set whose training density is nearer rho,
# then to the denser set. A set trained at exactly the k it serves therefore always wins.
ATTN_SET_RULE = "nearest_k"
ATTN_SET_RULES = (ATTN_SET_RULE,)


def nearest_attn_set(train_densities: Sequence[float], rho: float, units: int) -> int:
    """Index of the attention-router set (trained at `train_densities`) that serves density `rho` under
    the "nearest_k" rule."""
    if not train_densities:
        raise InputError("no attention-router sets to choose from")
    rho = check_density(rho)
    k = units_kept(rho, units)
    return min(range(len(train_densities)),
               key=lambda i: (abs(units_kept(train_densities[i], units) - k), abs(train_densities[i] - rho),
                              -train_densities[i]))


def check_train_densities(densities: Sequence[float], units: int) -> tuple[float, ...]:
    """Training densities of attention-router sets, sorted: each in (0, 1], no two equal and no two giving
    the same label count k = floor(rho * U) (they would train the same router twice)."""
    values = [check_density(d, "training density") for d in densities]
    if not values:
        raise InputError("give at least one attention training density")
    seen: dict[int, float] = {}
    for d in values:
        k = units_kept(d, units)
        if k in seen:
            same = "are the same density" if seen[k] == d else f"both keep {k} of {units} units"
            raise InputError(f"attention training densities {seen[k]} and {d} {same}: give each density once")
        seen[k] = d
    return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class AttnRouterSet:
    """One attention-router set of a multi-set bundle: its training density (labels = top-k units with
    k = floor(train_density * U)) and what `calibrate` measured with its logits. The set's tensors are
    `attn_set{index}.{layer}.w|b[|w1|b1]` in the bundle (`attn.{layer}.*` of a single-set bundle)."""

    train_density: float
    importance: tuple[tuple[float, ...], ...] | None = None  # as SparsityConfig.attn_importance
    thresholds: tuple[tuple[float, ...], ...] | None = None  # as SparsityConfig.attn_thresholds

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"train_density": self.train_density}
        for name in ("importance", "thresholds"):
            if getattr(self, name) is not None:
                d[name] = [list(r) for r in getattr(self, name)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttnRouterSet":
        unknown = set(d) - {"train_density", "importance", "thresholds"}
        if unknown:
            raise InputError(f"unknown attention-router set fields {sorted(unknown)}")

        def table(name):
            return None if d.get(name) is None else tuple(tuple(float(x) for x in r) for r in d[name])

        return cls(check_density(d["train_density"], "training density"), table("importance"), table("thresholds"))


def attention_units(cfg: ModelConfig, unit: str | None = None) -> tuple[int, str]:
    """What an attention router scores: KV groups for GQA (skipping a group skips its KV reads), heads for MHA.
    `unit="head"` on a GQA model scores query heads instead (finer selection; masked evaluation only, the
    decode kernel skips whole KV groups); `unit="group"` forces groups."""
    if unit is not None and unit not in UNITS:
        raise InputError(f"attention unit must be one of {UNITS}, got {unit!r}")
    if unit == "head":
        return cfg.num_heads, "head"
    if cfg.num_kv_heads < cfg.num_heads or unit == "group":
        return cfg.num_kv_heads, "group"
    return cfg.num_heads, "head"


def budget_bounds(k: int, units: int, floor: float, cap: float) -> tuple[int, int]:
    """Clip bounds of an adaptive budget averaging k units: [max(1, floor*k), min(U, cap*k)]."""
    return max(1, int(math.floor(floor * k + 1e-9))), min(units, max(k, int(math.ceil(cap * k - 1e-9))))


def allocate_units(curves: Sequence[Sequence[float]], total: int, units: int) -> list[int]:
    """Units per layer summing to `total` (each in [1, U]), greedily where the kept mass grows most."""
    n = len(curves)
    total = max(n, min(total, n * units))
    ks = [1] * n
    for _ in range(total - n):
        gains = [curves[i][ks[i] + 1] - curves[i][ks[i]] if ks[i] < units else -math.inf for i in range(n)]
        # Equal gains go to the layer holding fewest units (then the lower layer): spreads flat curves.
        ks[max(range(n), key=lambda i: (round(float(gains[i]), 9), -ks[i], -i))] += 1
    return ks


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    num_layers: int
    attn_units: int  # H (MHA) or H_kv (GQA): what the attention router scores
    unit: str  # "head" | "group"
    ffn: int  # MLP width N
    mlp_router: bool  # ReLU models only
    mlp_rank: int = 0
    attn_density: float = 0.5
    attn_layer_densities: tuple[float, ...] | None = None  # explicit per-layer densities (layer 0 = 1.0)
    attn_importance: tuple[tuple[float, ...], ...] | None = None  # [layer][k] mass kept by top-k router units
    attn_train_density: float = 0.5
    # width of the attention routers' hidden layer (0: linear routers, the format of every bundle before it)
    attn_hidden: int = 0
    # input-adaptive head budgets: [layer][k-1] router-logit threshold whose clipped per-token count
    # averages k units (k = 1..U), and the clip bounds as fractions of k
    attn_thresholds: tuple[tuple[float, ...], ...] | None = None
    attn_budget_floor: float = 0.5
    attn_budget_cap: float = 2.0
    mlp_tables: tuple[MLPTable, ...] = ()
    mlp_tile: int = 32
    mlp_dense_threshold: float = 0.9
    dense_layers: tuple[int, ...] = (0,)
    train: dict | None = None  # how the routers were trained (data, split, seed, metrics)
    # several attention-router sets, each trained at one density (empty: one set, the format before them).
    # With sets, the top-level attn_importance / attn_thresholds are None (each set holds its own) and
    # attn_train_density is that of the set serving attn_density; `for_density` gives the single-set view.
    attn_sets: tuple[AttnRouterSet, ...] = ()
    attn_set_rule: str | None = None  # ATTN_SET_RULE when attn_sets is not empty

    def __post_init__(self):
        if not self.attn_sets:
            if self.attn_set_rule is not None:
                raise InputError("attn_set_rule is set but the config has no attention-router sets")
            return
        if self.attn_set_rule not in ATTN_SET_RULES:
            raise InputError(f"attention-router set rule must be one of {ATTN_SET_RULES}, got {self.attn_set_rule!r}")
        dens = [s.train_density for s in self.attn_sets]
        if tuple(dens) != check_train_densities(dens, self.attn_units):
            raise InputError(f"attention-router sets must be sorted by training density, got {dens}")
        if self.attn_importance is not None or self.attn_thresholds is not None:
            raise InputError("a config with attention-router sets keeps importance curves and thresholds per set")
        served = dens[self.attn_set_index(self.attn_density)]
        if abs(served - self.attn_train_density) > 1e-12:
            raise InputError(f"attn_train_density {self.attn_train_density} is not that of the set serving "
                             f"attn_density {self.attn_density} ({served})")

    # ---- attention-router sets ------------------------------------------------------------------------
    @property
    def attn_train_densities(self) -> tuple[float, ...]:
        """The training density of every attention-router set (one for a single-set config)."""
        return tuple(s.train_density for s in self.attn_sets) or (self.attn_train_density,)

    def attn_set_index(self, rho: float | None = None) -> int:
        """Which set serves density rho (default: attn_density); 0 for a single-set config."""
        return nearest_attn_set(self.attn_train_densities, self.attn_density if rho is None else rho, self.attn_units)

    def for_set(self, index: int) -> "SparsityConfig":
        """The single-set config of attention-router set `index` (itself for a single-set config)."""
        if not self.attn_sets:
            if index != 0:
                raise InputError(f"this config has one attention-router set, not {index + 1}")
            return self
        s = self.attn_sets[index]
        return dataclasses.replace(self, attn_sets=(), attn_set_rule=None, attn_train_density=s.train_density,
                                   attn_importance=s.importance, attn_thresholds=s.thresholds)

    # ---- attention ------------------------------------------------------------------------------------
    def attn_k(self, rho: float | None = None, per_layer: bool = False) -> tuple[int, ...]:
        """Units kept per layer (U = dense) at global density rho (default: the configured one). With several
        attention-router sets, per-layer allocation uses the importance curves of the set serving rho."""
        if self.attn_sets:
            return self.for_set(self.attn_set_index(rho)).attn_k(rho, per_layer)
        rho = check_density(self.attn_density if rho is None else rho)
        u, n = self.attn_units, self.num_layers
        sparse = [i for i in range(n) if i not in self.dense_layers]
        if self.attn_layer_densities is not None and rho == self.attn_density:
            dens = self.attn_layer_densities
            return tuple(u if i in self.dense_layers else units_kept(check_density(dens[i]), u) for i in range(n))
        if per_layer:
            if self.attn_importance is None:
                raise InputError("this bundle has no head-importance curves: run `polar-jax calibrate` on it first")
            ks = allocate_units([self.attn_importance[i] for i in sparse], units_kept(rho, u) * len(sparse), u)
            out = [u] * n
            for i, k in zip(sparse, ks):
                out[i] = k
            return tuple(out)
        return tuple(u if i in self.dense_layers else units_kept(rho, u) for i in range(n))

    def adaptive_budgets(self, rho: float | None = None, per_layer: bool = False
                         ) -> tuple[tuple[float, int, int] | None, ...]:
        """Per layer (threshold, floor, cap) of the input-adaptive head budgets whose mean matches the
        fixed budget at density rho; None for dense layers. With several attention-router sets, the
        thresholds of the set serving rho (they are that set's logits)."""
        if self.attn_sets:
            return self.for_set(self.attn_set_index(rho)).adaptive_budgets(rho, per_layer)
        if self.attn_thresholds is None:
            raise InputError("this bundle has no head-budget thresholds: run `polar-jax calibrate` on it first")
        out: list[tuple[float, int, int] | None] = []
        for i, k in enumerate(self.attn_k(rho, per_layer)):
            if k >= self.attn_units:
                out.append(None)
                continue
            floor, cap = budget_bounds(k, self.attn_units, self.attn_budget_floor, self.attn_budget_cap)
            out.append((float(self.attn_thresholds[i][k - 1]), floor, cap))
        return tuple(out)

    # ---- MLP ------------------------------------------------------------------------------------------
    def mlp_table(self, recall: float) -> MLPTable:
        for t in self.mlp_tables:
            if abs(t.recall - recall) < 1e-9:
                return t
        have = sorted(t.recall for t in self.mlp_tables)
        if not have:
            raise InputError("this bundle has no calibrated MLP top-k table: run `polar-jax calibrate` first")
        raise InputError(f"no MLP table for recall {recall}; the bundle has {have} (calibrate with --recall {recall})")

    def mlp_k(self, recall: float, batch: int) -> tuple[int | None, ...]:
        """Neurons kept per layer for a decode batch of `batch` rows; None = dense (layer 0, or above the
        dense-fallback density)."""
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        table = self.mlp_table(recall)
        out: list[int | None] = []
        for i in range(self.num_layers):
            if i in self.dense_layers:
                out.append(None)
                continue
            k = table.k_for(i, batch, self.mlp_tile, self.ffn)
            out.append(None if k >= self.mlp_dense_threshold * self.ffn else k)
        return tuple(out)

    def with_tables(self, tables: list[MLPTable]) -> "SparsityConfig":
        keep = [t for t in self.mlp_tables if all(abs(t.recall - n.recall) > 1e-9 for n in tables)]
        return dataclasses.replace(self, mlp_tables=tuple(sorted(keep + list(tables), key=lambda t: t.recall)))

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_tables"] = [t.to_dict() for t in self.mlp_tables]
        if not self.attn_hidden:
            # a linear bundle keeps the exact format older polar-jax reads (it refuses unknown fields)
            del d["attn_hidden"]
        if self.attn_sets:
            d["attn_sets"] = [s.to_dict() for s in self.attn_sets]
        else:  # likewise a single-set bundle
            del d["attn_sets"], d["attn_set_rule"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown SparsityConfig fields {sorted(unknown)}")
        d["mlp_tables"] = tuple(MLPTable.from_dict(t) for t in d.get("mlp_tables", ()))
        for key in ("attn_layer_densities", "dense_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        for key in ("attn_importance", "attn_thresholds"):
            if d.get(key) is not None:
                d[key] = tuple(tuple(float(x) for x in r) for r in d[key])
        check("attn_hidden", d.get("attn_hidden", 0), "attn_hidden (hidden width of the attention routers, 0: linear)")
        if "attn_sets" in d:
            if not isinstance(d["attn_sets"], list) or not d["attn_sets"]:
                raise InputError("attn_sets must be a non-empty list of attention-router sets")
            d["attn_sets"] = tuple(AttnRouterSet.from_dict(s) for s in d["attn_sets"])
        return cls(**d)
