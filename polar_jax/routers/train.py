"""Router training with Optax (AdamW, weighted BCE), per layer, with a validation split and early stopping.

- Attention router: labels are the top-k units by true output norm at the training density (k =
  floor(rho_train * U)); metric = recall@k, the fraction of the true top-k units the router's top-k finds.
- MLP router (ReLU models): labels are ReLU > 0; metric = recall@|active|, per token the fraction of its
  active neurons found among the router's top-|active| scores (a ranking metric that cannot be gamed by
  predicting everything active).
Both losses down-weight negatives by the label density (PAPER.md method 2), so rare positives matter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from polar_jax.errors import InputError
from polar_jax.routers.bundle import SparsityBundle, set_prefix
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.config import (ATTN_SET_RULE, AttnRouterSet, SparsityConfig, check_train_densities,
                                      nearest_attn_set, units_kept)
from polar_jax.routers.modules import AttentionRouter, MLPRouter
from polar_jax.validate import check, check_optional


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024
    patience: int = 2  # epochs without a better validation recall before stopping
    seed: int = 0
    max_val_tokens: int = 8192

    def __post_init__(self):
        for name, label in (("epochs", "epochs"), ("lr", "learning rate"), ("weight_decay", "weight decay"),
                            ("batch_size", "training batch size"), ("patience", "patience"), ("seed", "seed"),
                            ("max_val_tokens", "max_val_tokens")):
            check(name, getattr(self, name), label)


def weighted_bce(logits: jax.Array, labels: jax.Array, neg_weight: float | jax.Array) -> jax.Array:
    """Mean BCE with negatives weighted by `neg_weight` (the positive-label density) and positives by 1."""
    y = labels.astype(jnp.float32)
    per = y * jax.nn.softplus(-logits) + neg_weight * (1.0 - y) * jax.nn.softplus(logits)
    return jnp.mean(per)


def pairwise_mass_loss(logits: jax.Array, norms: jax.Array, k: int | None = None) -> jax.Array:
    """Mass-weighted pairwise ranking loss of attention-router logits against the true unit norms: for each
    pair of units with norms n_i > n_j, softplus(s_j - s_i) weighted by (n_i - n_j) / sum(n) (the share of
    the row's norm lost when j is kept instead of i). With `k`, only the pairs across the top-k boundary
    (i among the true top-k, j not), the inversions that change a top-k selection."""
    n = norms.astype(jnp.float32)
    n = n / jnp.maximum(jnp.sum(n, -1, keepdims=True), 1e-12)
    w = jnp.maximum(n[..., :, None] - n[..., None, :], 0.0)  # [..., i, j]
    if k is not None:
        thr = -jnp.sort(-n, axis=-1)[..., k - 1 : k]
        top = n >= thr
        w = w * (top[..., :, None] & ~top[..., None, :])
    per = w * jax.nn.softplus(logits[..., None, :] - logits[..., :, None])
    return jnp.mean(jnp.sum(per, axis=(-2, -1)))


ATTN_LOSSES = ("bce", "pair", "pair_k")


def topk_labels(norms: np.ndarray, k: int) -> np.ndarray:
    """True for the k largest units of each row."""
    idx = np.argpartition(-norms, k - 1, axis=-1)[..., :k]
    out = np.zeros(norms.shape, bool)
    np.put_along_axis(out, idx, True, axis=-1)
    return out


@jax.jit
def recall_at_k(scores: jax.Array, labels: jax.Array, k: int | jax.Array) -> jax.Array:
    """Mean over rows of |top-k(scores) ∩ labels| / |labels| with the same k for every row."""
    thr = -jnp.sort(-scores, axis=-1)[:, k - 1]
    hit = (scores >= thr[:, None]) & labels
    return jnp.mean(jnp.sum(hit, -1) / jnp.maximum(jnp.sum(labels, -1), 1))


@jax.jit
def recall_at_count(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over rows of the fraction of positives found in the row's top-|positives| scores."""
    cnt = jnp.sum(labels, -1)
    srt = -jnp.sort(-scores, axis=-1)
    thr = jnp.take_along_axis(srt, jnp.maximum(cnt - 1, 0)[:, None], axis=-1)[:, 0]
    hit = (scores >= thr[:, None]) & labels
    rec = jnp.where(cnt > 0, jnp.sum(hit, -1) / jnp.maximum(cnt, 1), 1.0)
    return jnp.mean(rec)


def fit(
    module: nnx.Module,
    x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    metric: Callable[[jax.Array, jax.Array], jax.Array],
    opts: TrainOptions, desc: str, log: Callable[[str], None] = print, progress: bool = True,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Trains `module` (logits = module(x)) with `loss(logits, y)` (default: BCE with negatives weighted by
    the label density) + AdamW; keeps the parameters of the epoch with the best validation metric; stops
    after `patience` epochs without improvement."""
    if len(x_tr) == 0 or len(x_val) == 0:
        raise InputError("no training or validation tokens: collect more text")
    objective = loss
    if objective is None:
        neg_weight = float(np.clip(y_tr.mean(), 1e-3, 1.0))
        objective = functools.partial(_bce_loss, neg_weight=neg_weight)
    graphdef, params = nnx.split(module, nnx.Param)
    tx = optax.adamw(opts.lr, weight_decay=opts.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return objective(nnx.merge(graphdef, p)(x), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return objective(logits, y), metric(logits, y)

    rng = np.random.default_rng(opts.seed)
    xv, yv = jnp.asarray(x_val[: opts.max_val_tokens]), jnp.asarray(y_val[: opts.max_val_tokens])
    best, best_params, history, bad = -1.0, params, [], 0
    n_steps = max(1, len(x_tr) // opts.batch_size)
    for epoch in range(1, opts.epochs + 1):
        perm = rng.permutation(len(x_tr))
        losses = []
        for s in tqdm(range(n_steps), desc=f"{desc} epoch {epoch}", leave=False, disable=not progress):
            idx = np.sort(perm[s * opts.batch_size : (s + 1) * opts.batch_size])
            params, opt_state, loss = step(params, opt_state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
            losses.append(loss)
        val_loss, val_rec = (float(v) for v in evaluate(params, xv, yv))
        train_loss = float(np.mean(np.asarray(jax.device_get(losses))))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_recall": val_rec})
        log(f"{desc} epoch {epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  val recall {val_rec:.4f}")
        if val_rec > best + 1e-5:
            best, best_params, bad = val_rec, params, 0
        else:
            bad += 1
            if bad >= opts.patience:
                log(f"{desc}: early stop (no better validation recall for {opts.patience} epochs)")
                break
    nnx.update(module, best_params)
    return module, {"best_val_recall": best, "epochs_run": len(history), "history": history}


def train_attention_router(x_tr, norms_tr, x_val, norms_val, k: int, opts: TrainOptions, desc: str = "attn",
                           log=print, progress: bool = True, hidden: int = 0, loss: str = "bce"
                           ) -> tuple[AttentionRouter, dict]:
    """Trains one layer's attention router for top-k selection; `hidden` > 0 adds a hidden layer of that
    width. `loss`: "bce" on top-k labels, or `pairwise_mass_loss` on the norms ("pair": all pairs, "pair_k":
    the pairs across the top-k boundary); the validation metric is recall@k either way."""
    if loss not in ATTN_LOSSES:
        raise InputError(f"attention router loss must be one of {ATTN_LOSSES}, got {loss!r}")
    units = norms_tr.shape[-1]
    router = AttentionRouter(x_tr.shape[-1], units, nnx.Rngs(opts.seed), hidden=hidden)
    if loss == "bce":
        metric = functools.partial(_recall_k_fixed, k=k)
        return fit(router, x_tr, topk_labels(norms_tr, k), x_val, topk_labels(norms_val, k), metric, opts, desc, log,
                   progress)
    metric = functools.partial(_recall_k_of_norms, k=k)
    fn = functools.partial(pairwise_mass_loss, k=k if loss == "pair_k" else None)
    return fit(router, np.asarray(x_tr), np.asarray(norms_tr, np.float32), x_val, np.asarray(norms_val, np.float32),
               metric, opts, desc, log, progress, loss=fn)


def _bce_loss(logits, labels, neg_weight):
    return weighted_bce(logits, labels, neg_weight)


def _recall_k_fixed(scores, labels, k):
    return recall_at_k(scores, labels, k)


def _recall_k_of_norms(scores, norms, k):
    thr = -jnp.sort(-norms, axis=-1)[:, k - 1]
    return recall_at_k(scores, norms >= thr[:, None], k)


def train_mlp_router(x_tr, act_tr, x_val, act_val, rank: int, opts: TrainOptions, desc: str = "mlp",
                     log=print, progress: bool = True) -> tuple[MLPRouter, dict]:
    router = MLPRouter(x_tr.shape[-1], rank, act_tr.shape[-1], nnx.Rngs(opts.seed))
    return fit(router, x_tr, act_tr, x_val, act_val, recall_at_count, opts, desc, log, progress)


def train_routers(
    data: CollectedData,
    rank: int | None = None,
    attn_train_density: float | Sequence[float] = 0.5,
    opts: TrainOptions = TrainOptions(),
    mlp_opts: TrainOptions | None = None,
    val_fraction: float = 0.1,
    max_train_tokens: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    attn_hidden: int = 0,
    attn_loss: str = "bce",
) -> SparsityBundle:
    """Trains the attention router of every sparse layer (1..L-1) and, for ReLU models, the MLP router.
    `attn_hidden` > 0 gives the attention routers a hidden layer of that width (0: linear).
    `attn_train_density` several densities: one attention-router set per density (labels = top-k units at
    that density), in one bundle whose sparsifiers use the set nearest the density served (bundle.py); one
    density (a number or a one-element list): a single-set bundle as before. The bundle's default density
    is the first one given. `attn_loss`: see `train_attention_router`.
    Returns an uncalibrated bundle (no MLP k table yet: run `calibrate`)."""
    if attn_loss not in ATTN_LOSSES:
        raise InputError(f"attention router loss must be one of {ATTN_LOSSES}, got {attn_loss!r}")
    many = not isinstance(attn_train_density, (int, float, np.floating, np.integer))
    requested = [float(v) for v in attn_train_density] if many else [attn_train_density]
    densities = check_train_densities(requested, int(data.meta["units"]))
    attn_hidden = check("attn_hidden", attn_hidden, "attention router hidden width (0: linear)")
    check("val_fraction", val_fraction, "validation fraction")
    check_optional("max_train_tokens", max_train_tokens)
    m = data.meta
    d, units, n, layers = int(m["hidden_size"]), int(m["units"]), int(m["ffn"]), int(m["num_layers"])
    rank = min(1024, d) if rank is None else check("rank", rank, "router rank")
    if rank > max(d, n):
        raise InputError(f"router rank {rank} is larger than both the model width {d} and its {n} MLP neurons")
    tr, val = data.split(val_fraction, opts.seed)
    if max_train_tokens is not None:
        tr = tr[np.random.default_rng(opts.seed).permutation(len(tr))[:max_train_tokens]]
        tr.sort()
    params: dict[str, np.ndarray] = {}
    metrics: dict[str, Any] = {}
    sets = len(densities) > 1
    bar = tqdm(total=(layers - 1) * len(densities), desc="train-routers", unit="router", disable=not progress)
    for layer in range(1, layers):
        x = data.field("router_input", layer)
        norms = data.field("unit_norm", layer)
        x_tr, n_tr, x_val, n_val = x[tr], norms[tr], x[val], norms[val]
        for j, rho in enumerate(densities):
            k = units_kept(rho, units)
            prefix = set_prefix(j) if sets else "attn"
            which = f" (set {j}, top-{k} of {units})" if sets else ""
            bar.set_postfix_str(f"layer {layer}{which}")
            r, info = train_attention_router(x_tr, n_tr, x_val, n_val, k, opts, f"layer {layer} attn{which}", log,
                                             progress, hidden=attn_hidden, loss=attn_loss)
            # the names the bundle stores, in the order SparsityBundle.attn returns them
            for name, arr in zip(("w", "b", "w1", "b1"), r.arrays()):
                params[f"{prefix}.{layer}.{name}"] = np.asarray(arr)
            metrics[f"{prefix}.{layer}"] = info
            bar.update(1)
        if m.get("mlp_active"):
            act = data.field("mlp_active", layer)
            r, info = train_mlp_router(x[tr], act[tr], x[val], act[val], rank, mlp_opts or opts,
                                       f"layer {layer} mlp", log, progress)
            params[f"mlp.{layer}.a"], params[f"mlp.{layer}.b"] = np.asarray(r.a[...]), np.asarray(r.b[...])
            metrics[f"mlp.{layer}"] = info
            del act
    bar.close()
    rho = float(requested[0])
    cfg = SparsityConfig(
        num_layers=layers, attn_units=units, unit=m["unit"], ffn=n, mlp_router=bool(m.get("mlp_active")),
        mlp_rank=rank if m.get("mlp_active") else 0, attn_density=rho,
        attn_train_density=densities[nearest_attn_set(densities, rho, units)], attn_hidden=attn_hidden,
        attn_sets=tuple(AttnRouterSet(d) for d in densities) if sets else (),
        attn_set_rule=ATTN_SET_RULE if sets else None,
        train={"data": str(data.path), "texts": m["texts"], "tokens": len(tr), "val_tokens": len(val),
               "val_fraction": val_fraction, "seed": opts.seed, "attn_loss": attn_loss,
               "options": dataclasses.asdict(opts),
               "mlp_options": dataclasses.asdict(mlp_opts or opts), "metrics": metrics},
    )
    return SparsityBundle(cfg, params, m["signature"])
