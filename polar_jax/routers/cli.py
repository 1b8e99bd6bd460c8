"""CLI verbs of the router pipeline: collect, train-routers, calibrate, eval ppl, eval agreement.

Registered by polar_jax.cli through `register(subparsers)`; user mistakes raise PolarError subclasses (the
main CLI prints `error: ...` and exits 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polar_jax.errors import InputError
from polar_jax.eval.lm_eval_cli import register as register_lm_eval


def _load_model(path: str, dtype: str | None = None):
    from polar_jax.cli import _load_any

    if path != "default" and not Path(path).exists():
        raise InputError(f"model path {path} does not exist")
    return _load_any(path, dtype)


def _load_bundle_arg(spec: str, model):
    from polar_jax.routers.bundle import load_sparsity

    if spec == "none":
        return None
    return load_sparsity(spec, model)


def _density_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got {text!r}") from None


# ---- collect -------------------------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    from polar_jax.routers.collect import collect

    model, tok = _load_model(args.model, args.dtype)
    out = collect(model, tok, args.text, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
                  max_tokens=args.max_tokens, chunk_tokens=args.chunk_tokens, overwrite=args.overwrite,
                  model_name=args.model, unit=args.unit)
    meta = json.loads((out / "collect.json").read_text())
    print(f"wrote {meta['tokens']} tokens ({meta['windows']} windows of {meta['seq_len']}, "
          f"{len(meta['chunks'])} chunks) to {out}")
    return 0


# ---- train ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from polar_jax.routers.bundle import SparsityBundle
    from polar_jax.routers.collect import CollectedData
    from polar_jax.routers.train import TrainOptions, train_routers

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} already exists: pass --overwrite to replace it")
    data = CollectedData(args.data)
    opts = TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    mlp_opts = TrainOptions(epochs=args.mlp_epochs or args.epochs, lr=args.mlp_lr or args.lr,
                            batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    bundle = train_routers(data, rank=args.rank, attn_train_density=args.attn_train_density, opts=opts,
                           mlp_opts=mlp_opts, val_fraction=args.val_fraction, max_train_tokens=args.max_train_tokens)
    SparsityBundle.save(bundle, out, overwrite=args.overwrite)
    print(f"wrote routers to {out} (uncalibrated: run `polar-jax calibrate --bundle {out} --data {args.data}`)")
    return 0


# ---- calibrate -----------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    from polar_jax.routers.bundle import check_signature, load_bundle
    from polar_jax.routers.calibrate import calibrate
    from polar_jax.routers.collect import CollectedData

    bundle = load_bundle(args.bundle)
    data = CollectedData(args.data)
    check_signature(bundle.signature, data.meta["signature"], "sparsity bundle (vs. the collected data)")
    dens = _density_list(args.layer_densities) if args.layer_densities else None
    new = calibrate(bundle, data, recalls=args.recall, tile=args.tile, n_batches=args.batches,
                    dense_threshold=args.dense_threshold, attn_density=args.attn_density, layer_densities=dens)
    out = Path(args.out or args.bundle)
    new.save(out, overwrite=True if args.out is None else args.overwrite)
    print(f"wrote calibrated bundle to {out}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------
def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint folder, HF folder, or 'default'")
    p.add_argument("--sparsity", default="default", help="bundle folder, 'default', or 'none' (dense / oracle only)")
    p.add_argument("--mode", choices=["router", "oracle"], default="router",
                   help="router: trained routers; oracle: true top-k heads by output norm + true MLP union")
    p.add_argument("--attn-density", type=float, default=None, help="fraction of heads/groups kept (default: bundle's)")
    p.add_argument("--mlp-recall", type=float, default=0.99, help="MLP recall target (a calibrated table)")
    p.add_argument("--per-layer", action="store_true", help="per-layer densities from measured head importance")
    p.add_argument("--no-attn", action="store_true", help="keep attention dense")
    p.add_argument("--no-mlp", action="store_true", help="keep the MLP dense")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_ppl(args: argparse.Namespace) -> int:
    import numpy as np

    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers.collect import read_text_tokens

    model, tok = _load_model(args.model, args.dtype)
    bundle = _load_bundle_arg(args.sparsity, model)
    mode = "dense" if (bundle is None and args.mode == "router") else args.mode
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise InputError(f"--max-tokens must be positive, got {args.max_tokens}")
    tokens = read_text_tokens(tok, [args.text], args.max_tokens)[0]
    res = sparse_perplexity(model, np.asarray(tokens), bundle, mode, args.attn_density, args.mlp_recall,
                            args.per_layer, not args.no_attn, not args.no_mlp, seq_len=args.seq_len,
                            batch_size=args.batch_size, progress=not args.json, unit=args.unit)
    out = {**res.to_dict(), "mode": mode, "model": args.model, "sparsity": args.sparsity,
           "attn_density": args.attn_density, "mlp_recall": args.mlp_recall, "batch_size": args.batch_size,
           "per_layer": args.per_layer}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {res.ppl:.3f} ({mode}) over {res.predictions} predictions, {res.tokens} tokens, "
              f"windows of {res.seq_len}, decode batch {args.batch_size}")
    return 0


def cmd_agree(args: argparse.Namespace) -> int:
    from polar_jax.eval.agreement import greedy_agreement
    from polar_jax.routers.collect import read_text_tokens
    from polar_jax.routers.sparsify import router_selector

    model, tok = _load_model(args.model, args.dtype)
    bundle = _load_bundle_arg(args.sparsity, model)
    if bundle is None:
        raise InputError("agreement needs a sparsity bundle (--sparsity PATH|default)")
    sel = router_selector(bundle, args.attn_density, args.mlp_recall, args.per_layer, not args.no_attn, not args.no_mlp)
    tokens = read_text_tokens(tok, [args.text], args.max_tokens)[0]
    res = greedy_agreement(model, tokens, sel, n_prompts=args.prompts, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"greedy agreement with dense over {args.new_tokens} new tokens, {args.prompts} prompts: "
              f"{res['token_agreement']:.3f} of tokens equal, identical prefix {res['mean_prefix']:.1f} tokens")
    return 0


def register(subparsers) -> None:
    c = subparsers.add_parser("collect", help="record router training data from a dense run on text")
    c.add_argument("--model", default="default")
    c.add_argument("--text", nargs="+", required=True, help="text file(s), tokenized with the model's tokenizer")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--max-tokens", type=int, default=None, help="cap on tokens (split evenly over the files)")
    c.add_argument("--chunk-tokens", type=int, default=32768, help="tokens per chunk file (bounds memory)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--dtype", default=None)
    c.add_argument("--unit", choices=["group", "head"], default=None,
                   help="attention unit the labels score: KV group (GQA default) or query head (masked eval only)")
    c.set_defaults(fn=cmd_collect)

    t = subparsers.add_parser("train-routers", help="train attention (and MLP) routers on collected data")
    t.add_argument("--data", required=True, help="folder written by `polar-jax collect`")
    t.add_argument("--out", required=True, help="bundle folder to write")
    t.add_argument("--rank", type=int, default=None, help="MLP router rank r (default min(1024, d))")
    t.add_argument("--attn-train-density", type=float, default=0.5, help="top-k label density for attention")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--mlp-epochs", type=int, default=None)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--mlp-lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--patience", type=int, default=2)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--max-train-tokens", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=cmd_train)

    k = subparsers.add_parser("calibrate", help="per-layer MLP top-k per batch size; attention densities")
    k.add_argument("--bundle", required=True)
    k.add_argument("--data", required=True, help="the collected data the routers were trained on (held-out split used)")
    k.add_argument("--out", default=None, help="write here instead of updating the bundle in place")
    k.add_argument("--recall", type=float, nargs="+", default=[0.99], help="MLP recall target(s)")
    k.add_argument("--tile", type=int, default=32, help="k is rounded up to a multiple of this (kernel tile)")
    k.add_argument("--batches", type=int, default=64, help="random batches per (layer, batch size)")
    k.add_argument("--dense-threshold", type=float, default=0.75, help="k/N above this runs the MLP dense")
    k.add_argument("--attn-density", type=float, default=None, help="global attention density to store")
    k.add_argument("--layer-densities", default=None, help="explicit per-layer densities, e.g. 1,0.75,0.5,0.5")
    k.add_argument("--overwrite", action="store_true")
    k.set_defaults(fn=cmd_calibrate)

    e = subparsers.add_parser("eval", help="evaluation: ppl (sparse perplexity), agreement (greedy vs dense)")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("ppl", help="perplexity, non-overlapping windows, dense / oracle / router sparsity")
    _eval_common(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="decode batch size (windows sharing an MLP union)")
    p.add_argument("--unit", choices=["group", "head"], default=None,
                   help="oracle without a bundle: KV groups (GQA default) or query heads")
    p.set_defaults(fn=cmd_ppl)
    a = esub.add_parser("agreement", help="greedy agreement of sparse decoding with dense")
    _eval_common(a)
    a.add_argument("--prompts", type=int, default=8, help="number of prompts (= decode batch size)")
    a.add_argument("--prompt-len", type=int, default=32)
    a.add_argument("--new-tokens", type=int, default=64)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(fn=cmd_agree)
    register_lm_eval(esub)
