"""CLI verbs of the router pipeline: collect, train-routers, calibrate, eval ppl, eval agreement.

Registered by polar_jax.cli through `register(subparsers)`; user mistakes raise PolarError subclasses (the
main CLI prints `error: ...` and exits 2). Every output folder follows polar_jax.outputs (never over an
input, `--overwrite` replaces only an output of the same kind) and is checked before any work starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from polar_jax.cli_common import add_model_args, load_from_args, model_input, require_tokenizer
from polar_jax.errors import InputError
from polar_jax.eval.agreement import greedy_agreement
from polar_jax.eval.lm_eval_cli import register as register_lm_eval
from polar_jax.eval.sparse_ppl import sparse_perplexity
from polar_jax.outputs import check_target
from polar_jax.routers.bundle import BUNDLE_OUTPUT, SparsityBundle, check_signature, load_bundle, load_sparsity
from polar_jax.routers.calibrate import calibrate
from polar_jax.routers.collect import COLLECT_OUTPUT, CollectedData, collect, read_text_tokens
from polar_jax.routers.sparsify import router_selector
from polar_jax.routers.train import ATTN_LOSSES, TrainOptions, train_routers
from polar_jax.validate import arg_type, check


def _density_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got {text!r}") from None
    return [check("attn_density", v, "layer density") for v in values]


# ---- collect -------------------------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    inputs = [*args.text, model_input(args.model)]
    check_target(args.out, COLLECT_OUTPUT, inputs, args.overwrite)  # before the model is loaded and run
    model, tok = load_from_args(args)
    out = collect(model, require_tokenizer(tok, args.model), args.text, args.out, seq_len=args.seq_len,
                  batch_size=args.batch_size, max_tokens=args.max_tokens, chunk_tokens=args.chunk_tokens,
                  overwrite=args.overwrite, model_name=args.model, unit=args.unit)
    meta = CollectedData(out).meta
    print(f"wrote {meta['tokens']} tokens ({meta['windows']} windows of {meta['seq_len']}, "
          f"{len(meta['chunks'])} chunks) to {out}")
    return 0


# ---- train ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    check_target(args.out, BUNDLE_OUTPUT, [args.data], args.overwrite)  # before training, not after
    data = CollectedData(args.data)
    opts = TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    mlp_opts = TrainOptions(epochs=args.mlp_epochs or args.epochs, lr=args.mlp_lr or args.lr,
                            batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    bundle = train_routers(data, rank=args.rank, attn_train_density=args.attn_train_density, opts=opts,
                           mlp_opts=mlp_opts, val_fraction=args.val_fraction, max_train_tokens=args.max_train_tokens,
                           attn_hidden=args.attn_hidden, attn_loss=args.attn_loss)
    bundle.save(args.out, overwrite=args.overwrite, inputs=[args.data])
    print(f"wrote routers to {args.out} (uncalibrated: run `polar-jax calibrate --bundle {args.out} --data {args.data}`)")
    return 0


# ---- calibrate -----------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    in_place = args.out is None or Path(args.out).resolve() == Path(args.bundle).resolve()
    out = args.bundle if in_place else args.out
    # in place, the bundle is read whole first and replaced only once the calibrated one is written
    inputs = [args.data] if in_place else [args.data, args.bundle]
    overwrite = True if in_place else args.overwrite
    check_target(out, BUNDLE_OUTPUT, inputs, overwrite)
    bundle = load_bundle(args.bundle)
    data = CollectedData(args.data)
    check_signature(bundle.signature, data.meta["signature"], "sparsity bundle (vs. the collected data)")
    dens = _density_list(args.layer_densities) if args.layer_densities else None
    new = calibrate(bundle, data, recalls=args.recall, tile=args.tile, n_batches=args.batches,
                    dense_threshold=args.dense_threshold, attn_density=args.attn_density, layer_densities=dens)
    new.save(out, overwrite=overwrite, inputs=inputs)
    print(f"wrote calibrated bundle to {out}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------
def _eval_common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--text", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--max-tokens", type=arg_type("max_tokens"), default=None, help="read at most this many tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attn-density", type=arg_type("attn_density"), default=None,
                   help="fraction of heads/groups kept (default: the bundle's)")
    p.add_argument("--mlp-recall", type=arg_type("mlp_recall"), default=0.99, help="MLP recall target (a calibrated table)")
    p.add_argument("--per-layer", action="store_true", help="per-layer densities from measured head importance")
    p.add_argument("--no-attn", action="store_true", help="keep attention dense")
    p.add_argument("--no-mlp", action="store_true", help="keep the MLP dense")


def _ppl_mode(args: argparse.Namespace) -> str:
    """dense unless --sparsity (router) or --mode oracle is given; contradictions are errors, not ignored."""
    sparsity = args.sparsity not in (None, "none")
    mode = args.mode or ("router" if sparsity else "dense")
    if mode == "router" and not sparsity:
        raise InputError("--mode router needs --sparsity (a bundle folder or 'default')")
    if args.adaptive and mode != "router":
        raise InputError("--adaptive sets the routers' head budgets: it needs router sparsity (--sparsity)")
    if mode == "dense":
        if sparsity:
            raise InputError("--mode dense contradicts --sparsity: drop one")
        given = [flag for flag, on in (("--attn-density", args.attn_density is not None), ("--per-layer", args.per_layer),
                                       ("--no-attn", args.no_attn), ("--no-mlp", args.no_mlp)) if on]
        if given:
            raise InputError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --sparsity or --mode oracle "
                             "(the run would be dense)")
    return mode


def cmd_ppl(args: argparse.Namespace) -> int:
    mode = _ppl_mode(args)
    model, tok = load_from_args(args)
    bundle = None if args.sparsity in (None, "none") else load_sparsity(args.sparsity, model)
    tokens = read_text_tokens(require_tokenizer(tok, args.model), [args.text], args.max_tokens)[0]
    res = sparse_perplexity(model, np.asarray(tokens), bundle, mode, args.attn_density, args.mlp_recall,
                            args.per_layer, not args.no_attn, not args.no_mlp, seq_len=args.seq_len,
                            batch_size=args.batch_size, progress=not args.json, unit=args.unit,
                            adaptive=args.adaptive)
    out = {**res.to_dict(), "mode": mode, "model": args.model, "sparsity": args.sparsity,
           "attn_density": args.attn_density, "mlp_recall": args.mlp_recall, "batch_size": args.batch_size,
           "per_layer": args.per_layer, "adaptive": args.adaptive}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {res.ppl:.3f} ({mode}) over {res.predictions} predictions, {res.tokens} tokens, "
              f"windows of {res.seq_len}, decode batch {args.batch_size}")
    return 0


def cmd_agree(args: argparse.Namespace) -> int:
    if args.sparsity in (None, "none"):
        raise InputError("agreement compares sparse decoding with dense: give --sparsity PATH|default")
    model, tok = load_from_args(args)
    bundle = load_sparsity(args.sparsity, model)
    sel = router_selector(bundle, args.attn_density, args.mlp_recall, args.per_layer, not args.no_attn, not args.no_mlp)
    tokens = read_text_tokens(require_tokenizer(tok, args.model), [args.text], args.max_tokens)[0]
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
    add_model_args(c)
    c.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s), tokenized with the model's tokenizer")
    c.add_argument("--out", required=True, help="output folder (never an input; written beside it, renamed at the end)")
    c.add_argument("--seq-len", type=arg_type("seq_len"), default=256, help="tokens per window")
    c.add_argument("--batch-size", type=arg_type("batch_size"), default=16, help="windows per forward pass")
    c.add_argument("--max-tokens", type=arg_type("max_tokens"), default=None,
                   help="cap on tokens (split evenly over the files)")
    c.add_argument("--chunk-tokens", type=arg_type("chunk_tokens"), default=32768,
                   help="tokens per chunk file (bounds memory)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier collection")
    c.add_argument("--unit", choices=["group", "head"], default=None,
                   help="attention unit the labels score: KV group (GQA default) or query head (masked eval only)")
    c.set_defaults(fn=cmd_collect)

    t = subparsers.add_parser("train-routers", help="train attention (and MLP) routers on collected data")
    t.add_argument("--data", required=True, help="folder written by `polar-jax collect`")
    t.add_argument("--out", required=True, help="bundle folder to write")
    t.add_argument("--rank", type=arg_type("rank"), default=None, help="MLP router rank r (default min(1024, d))")
    t.add_argument("--attn-hidden", type=arg_type("attn_hidden"), default=0,
                   help="hidden width of the attention routers (0: linear d -> U; h > 0: d -> h -> ReLU -> U)")
    t.add_argument("--attn-train-density", type=arg_type("attn_train_density"), nargs="+", default=[0.5],
                   metavar="RHO",
                   help="top-k label density for attention; several (e.g. 0.34 0.67) train one attention-router set "
                        "per density into the bundle, and a density is then served by the set whose top-k is nearest "
                        "its own (the first density is the bundle's default)")
    t.add_argument("--attn-loss", choices=list(ATTN_LOSSES), default="bce",
                   help="attention-router loss: bce (weighted BCE on top-k labels), pair (pairwise ranking of all "
                        "units weighted by their norm difference), pair_k (those pairs across the top-k boundary)")
    t.add_argument("--epochs", type=arg_type("epochs"), default=10, help="training epochs (attention routers)")
    t.add_argument("--mlp-epochs", type=arg_type("epochs"), default=None, help="MLP router epochs (default: --epochs)")
    t.add_argument("--lr", type=arg_type("lr"), default=1e-3, help="AdamW learning rate")
    t.add_argument("--mlp-lr", type=arg_type("lr"), default=None, help="MLP router learning rate (default: --lr)")
    t.add_argument("--batch-size", type=arg_type("batch_size"), default=1024, help="tokens per training step")
    t.add_argument("--patience", type=arg_type("patience"), default=2,
                   help="epochs without a better validation recall before stopping")
    t.add_argument("--val-fraction", type=arg_type("val_fraction"), default=0.1, help="held-out share of the windows")
    t.add_argument("--max-train-tokens", type=arg_type("max_train_tokens"), default=None, help="cap on training tokens")
    t.add_argument("--seed", type=arg_type("seed"), default=0, help="initialisation, split and shuffling seed")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier sparsity bundle")
    t.set_defaults(fn=cmd_train)

    k = subparsers.add_parser("calibrate", help="per-layer MLP top-k per batch size; attention densities")
    k.add_argument("--bundle", required=True, help="bundle folder written by `polar-jax train-routers`")
    k.add_argument("--data", required=True, help="the collected data the routers were trained on (held-out split used)")
    k.add_argument("--out", default=None,
                   help="write here instead of replacing the bundle (in place: written beside it, then swapped)")
    k.add_argument("--recall", type=arg_type("recall"), nargs="+", default=[0.99], help="MLP recall target(s)")
    k.add_argument("--tile", type=arg_type("tile"), default=32, help="k is rounded up to a multiple of this (kernel tile)")
    k.add_argument("--batches", type=arg_type("batches"), default=64, help="random batches per (layer, batch size)")
    k.add_argument("--dense-threshold", type=arg_type("dense_threshold"), default=0.75,
                   help="k/N above this runs the MLP dense")
    k.add_argument("--attn-density", type=arg_type("attn_density"), default=None, help="global attention density to store")
    k.add_argument("--layer-densities", default=None, help="explicit per-layer densities, e.g. 1,0.75,0.5,0.5")
    k.add_argument("--overwrite", action="store_true", help="with --out: replace OUT if it is an earlier bundle")
    k.set_defaults(fn=cmd_calibrate)

    e = subparsers.add_parser("eval", help="evaluation: ppl (perplexity), agreement (greedy sparse vs dense), lm-eval")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVALUATION")
    p = esub.add_parser("ppl", help="perplexity on non-overlapping windows: dense, or router / oracle sparsity")
    _eval_common(p)
    p.add_argument("--sparsity", default=None, help="bundle folder or 'default': router sparsity (default: dense)")
    p.add_argument("--mode", choices=["dense", "router", "oracle"], default=None,
                   help="router: trained routers (needs --sparsity); oracle: true top-k heads by output norm + true "
                        "MLP union (default: router with --sparsity, else dense)")
    _router_args(p)
    p.add_argument("--seq-len", type=arg_type("seq_len"), default=256, help="tokens per window")
    p.add_argument("--batch-size", type=arg_type("batch_size"), default=8,
                   help="decode batch size (windows sharing an MLP union)")
    p.add_argument("--unit", choices=["group", "head"], default=None,
                   help="oracle without a bundle: KV groups (GQA default) or query heads")
    p.add_argument("--adaptive", action="store_true",
                   help="input-adaptive head budgets (router mode): per token the units whose router logit passes "
                        "the layer's calibrated threshold, between k/2 and 2k")
    p.set_defaults(fn=cmd_ppl)
    a = esub.add_parser("agreement", help="greedy agreement of sparse decoding with dense")
    _eval_common(a)
    a.add_argument("--sparsity", default=None, help="bundle folder or 'default' (required)")
    _router_args(a)
    a.add_argument("--prompts", type=arg_type("prompts"), default=8, help="number of prompts (= decode batch size)")
    a.add_argument("--prompt-len", type=arg_type("prompt_len"), default=32, help="tokens per prompt")
    a.add_argument("--new-tokens", type=arg_type("new_tokens"), default=64, help="greedy tokens compared")
    a.add_argument("--seed", type=arg_type("seed"), default=0, help="which prompts are drawn")
    a.set_defaults(fn=cmd_agree)
    register_lm_eval(esub)
