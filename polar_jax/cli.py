"""The `polar-jax` command line.

Verbs: demo, convert, generate, bench, and (from polar_jax.routers.cli) collect, train-routers, calibrate,
eval. A user mistake prints one line `error: ...` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from polar_jax.distributed import add_distributed_args, config_from_args, initialize, split_argv
from polar_jax.tensor_parallel import DEFAULT_HEAD_TOPK, HEAD_TOPK

DEMO_PROMPTS = (
    "The history of the city",
    "In the early years of the war ,",
    "KING RICHARD :",
    "The album was released",
)


def _load_any(path: str, dtype: str | None = None, mesh=None):
    """A converted checkpoint, "default", or an HF folder (converted on the fly); with a mesh, each tensor
    streamed onto its shards."""
    from polar_jax.checkpoint import is_polar_checkpoint, load, load_hf

    if path == "default" or is_polar_checkpoint(path):
        return load(path, dtype, mesh=mesh)
    return load_hf(path, dtype, mesh=mesh)


def _selector(args: argparse.Namespace, model, balance: int = 1):
    """A sparse-decode selector from `--sparsity` (a bundle path or "default"), or None for dense.
    `balance`: the head budget per shard of that many tensor-parallel shards (balanced top-k)."""
    if not getattr(args, "sparsity", None) or args.sparsity == "none":
        return None
    import polar_jax
    from polar_jax.routers.sparsify import router_selector

    bundle = polar_jax.load_sparsity(args.sparsity, model)
    return router_selector(bundle, attn_density=args.attn_density, balance=balance)


def _mesh(args: argparse.Namespace):
    """The ("data", "tensor") mesh of `--tensor` / `--data` (over the devices of every process), or None."""
    if args.tensor is None and args.data is None:
        return None
    from polar_jax.sharding import make_mesh

    data = args.data or 1
    return make_mesh(tensor=args.tensor, data=data)


def _add_sparsity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", default=None, help="sparsity bundle folder or 'default' (sparse decode); none = dense")
    p.add_argument("--attn-density", type=float, default=None, help="fraction of heads/KV groups kept per sequence")


def cmd_demo(args: argparse.Namespace) -> int:
    import jax

    import polar_jax

    t0 = time.perf_counter()
    model, tok = _load_any(args.model, args.dtype)
    prompts = [tok.encode(p) for p in DEMO_PROMPTS]
    print(f"model: {args.model} ({model.config.model_type}, {model.config.num_layers} layers, "
          f"d={model.config.hidden_size}) on {jax.default_backend()}, loaded in {time.perf_counter() - t0:.1f}s")
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              selector=_selector(args, model))
    if kw["selector"] is not None:
        print(f"sparse decode with routers from {args.sparsity}")
    t0 = time.perf_counter()
    out = polar_jax.generate(model, prompts, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = polar_jax.generate(model, prompts, **kw)  # compiled now: this run measures decoding speed
    dt = time.perf_counter() - t0
    n_tokens = int(sum(_generated_count(row, model.config.eos_token_ids) for row in out))
    print()
    for p, row in zip(DEMO_PROMPTS, out):
        print(f"[{p}] -> {tok.decode(row)}")
        print()
    print(f"batch {len(prompts)} x {args.max_new_tokens} new tokens: first call {first:.2f}s (compile + run), "
          f"second call {dt:.3f}s = {n_tokens / dt:.1f} tokens/s")
    return 0


def _generated_count(row, eos_ids) -> int:
    for i, t in enumerate(row):
        if int(t) in eos_ids:
            return i + 1
    return len(row)


def cmd_convert(args: argparse.Namespace) -> int:
    from convert import convert_checkpoint

    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import polar_jax
    from polar_jax.sharding import mesh_shape

    mesh = _mesh(args)
    if mesh is not None:
        import jax

        data, tensor = mesh_shape(mesh)
        print(f"mesh: data={data} x tensor={tensor} over {jax.device_count()} devices in {jax.process_count()} "
              f"process(es) (this is process {jax.process_index()})", file=sys.stderr, flush=True)
    model, tok = _load_any(args.model, args.dtype, mesh)
    if tok is None:
        from polar_jax.errors import CheckpointError

        raise CheckpointError(f"{args.model} has no tokenizer files; generate needs text prompts")
    prompts = [tok.encode(p) for p in args.prompt]
    balance = mesh_shape(mesh)[1] if args.head_topk == "balanced" else 1
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              selector=_selector(args, model, balance), mesh=mesh)
    if args.stream:
        for step in polar_jax.generate_stream(model, prompts, **kw):
            print(" | ".join(tok.decode([t]) for t in step), flush=True)
        return 0
    out = polar_jax.generate(model, prompts, **kw)
    for p, row in zip(args.prompt, out):
        print(p + tok.decode(row))
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from polar_jax.bench.decode_bench import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polar-jax", description="Polar Sparsity decoding in JAX/Pallas")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate a batch of texts with the embedded default model")
    d.add_argument("--model", default="default", help="checkpoint folder, HF folder, .gguf file, or 'default'")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument("--top-p", type=float, default=0.95)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default=None)
    _add_sparsity_args(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="convert an HF safetensors folder or a GGUF file to a polar-jax checkpoint")
    c.add_argument("hf_dir", help="HF checkpoint folder, or a .gguf file (dequantized)")
    c.add_argument("out_dir")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="generate continuations of text prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--model", default="default")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None)
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    _add_sparsity_args(g)
    g.add_argument("--tensor", type=int, default=None,
                   help="tensor-parallel degree: heads, KV cache and MLP neurons split over this many devices "
                        "(with --data alone: the devices left)")
    g.add_argument("--data", type=int, default=None, help="data-parallel degree: the batch split this many ways")
    g.add_argument("--head-topk", choices=HEAD_TOPK, default=DEFAULT_HEAD_TOPK,
                   help="sparse heads under tensor parallelism: each sequence's k best heads overall (global) "
                        "or ceil(k/n) best on each of the n shards (balanced)")
    add_distributed_args(g)
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks (GPU; --tiny checks the code path on CPU); "
                       "--coordinator/--num-processes/--process-id as for generate")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bd = bsub.add_parser("decode", add_help=False,
                         help="end-to-end decode step, sparse variants vs dense (`polar-jax bench decode --help`)")
    bd.add_argument("rest", nargs=argparse.REMAINDER)
    bd.set_defaults(fn=cmd_bench_decode)

    try:
        from polar_jax.routers.cli import register
    except ImportError:
        register = None
    if register is not None:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from polar_jax.errors import PolarError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "decode"]:
        # the benchmark owns its flags (argparse cannot forward options through nested sub-commands)
        ours, rest = split_argv(argv[2:])
        dist = argparse.ArgumentParser(prog="polar-jax bench decode")
        add_distributed_args(dist)
        args = dist.parse_args(ours)
        args.fn, args.rest = cmd_bench_decode, rest
    else:
        args = build_parser().parse_args(argv)
    try:
        initialize(config_from_args(args))  # before JAX touches a device
        return int(args.fn(args) or 0)
    except PolarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
