"""SparsityConfig: what a sparse model keeps per layer (JSON-serialisable, stored in a sparsity bundle).

- Attention: a global density rho (fraction of units kept; a unit is a query head for MHA and a KV group
  for GQA), layer 0 always dense, optionally per-layer densities (explicit, or allocated from measured
  head importance curves so the average stays rho).
- MLP (ReLU models): per recall target, a table layer x batch size -> k (union top-k, a multiple of the
  kernel tile), with a dense fallback when k / N exceeds `mlp_dense_threshold`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from polar_jax.errors import InputError

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


@dataclasses.dataclass(frozen=True)
class MLPTable:
    """k per (layer, calibrated batch size) for one recall target; layer 0 holds N (dense)."""

    recall: float
    batch_sizes: tuple[int, ...]
    k: tuple[tuple[int, ...], ...]  # [layer][batch-size index]

    def k_for(self, layer: int, batch: int, tile: int, n: int) -> int:
        """k at any batch size: exact at calibrated sizes, linear in log2(B) in between (rounded up to the
        tile), clamped to the ends outside the calibrated range."""
        bs, ks = self.batch_sizes, self.k[layer]
        if batch <= bs[0]:
            return ks[0]
        if batch >= bs[-1]:
            return ks[-1]
        j = next(i for i, b in enumerate(bs) if b >= batch)
        if bs[j] == batch:
            return ks[j]
        lo, hi = math.log2(bs[j - 1]), math.log2(bs[j])
        w = (math.log2(batch) - lo) / (hi - lo)
        k = ks[j - 1] + w * (ks[j] - ks[j - 1])
        return min(n, int(math.ceil(k / tile - 1e-9)) * tile)

    def to_dict(self) -> dict[str, Any]:
        return {"recall": self.recall, "batch_sizes": list(self.batch_sizes), "k": [list(r) for r in self.k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLPTable":
        return cls(float(d["recall"]), tuple(int(b) for b in d["batch_sizes"]), tuple(tuple(int(x) for x in r) for r in d["k"]))


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
    mlp_tables: tuple[MLPTable, ...] = ()
    mlp_tile: int = 32
    mlp_dense_threshold: float = 0.9
    dense_layers: tuple[int, ...] = (0,)
    train: dict | None = None  # how the routers were trained (data, split, seed, metrics)

    # ---- attention ------------------------------------------------------------------------------------
    def attn_k(self, rho: float | None = None, per_layer: bool = False) -> tuple[int, ...]:
        """Units kept per layer (U = dense) at global density rho (default: the configured one)."""
        rho = check_density(self.attn_density if rho is None else rho)
        u, n = self.attn_units, self.num_layers
        sparse = [i for i in range(n) if i not in self.dense_layers]
        if self.attn_layer_densities is not None and rho == self.attn_density:
            dens = self.attn_layer_densities
            return tuple(u if i in self.dense_layers else units_kept(check_density(dens[i]), u) for i in range(n))
        if per_layer:
            if self.attn_importance is None:
                raise InputError("this bundle has no head-importance curves: run `polar-jax calibrate` on it first")
            from polar_jax.routers.calibrate import allocate_units

            ks = allocate_units([self.attn_importance[i] for i in sparse], units_kept(rho, u) * len(sparse), u)
            out = [u] * n
            for i, k in zip(sparse, ks):
                out[i] = k
            return tuple(out)
        return tuple(u if i in self.dense_layers else units_kept(rho, u) for i in range(n))

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
        if d.get("attn_importance") is not None:
            d["attn_importance"] = tuple(tuple(float(x) for x in r) for r in d["attn_importance"])
        return cls(**d)
