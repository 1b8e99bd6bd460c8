"""The `polar-jax` command line.

Verbs: demo, convert, generate, bench, and (from polar_jax.routers.cli) collect, train-routers, calibrate,
eval. A user mistake prints one line `error: ...` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterable, Sequence, TextIO

import jax
import numpy as np

import polar_jax
from convert import convert_checkpoint
from polar_jax.bench.decode_bench import main as bench_main
from polar_jax.cli_common import (
    Parser, SparseDecoding, add_model_args, add_sparsity_args, check_prompt, load_from_args, require_tokenizer,
    sparse_decoding,
)
from polar_jax.distributed import add_distributed_args, config_from_args, initialize, split_argv
from polar_jax.dtypes import DTYPE_NAMES
from polar_jax.errors import InputError, PolarError
from polar_jax.models import CausalLM
from polar_jax.routers.cli import register as register_router_verbs
from polar_jax.sharding import make_mesh, mesh_shape
from polar_jax.tensor_parallel import DEFAULT_HEAD_TOPK, HEAD_TOPK
from polar_jax.tokenizer import Tokenizer
from polar_jax.validate import arg_type

DEMO_PROMPTS = (
    "The history of the city",
    "In the early years of the war ,",
    "KING RICHARD :",
    "The album was released",
)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `demo` and `generate` (the same defaults for both)."""
    p.add_argument("--max-new-tokens", type=arg_type("max_new_tokens"), default=32, help="tokens generated per prompt")
    p.add_argument("--temperature", type=arg_type("temperature"), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=arg_type("top_p"), default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=arg_type("seed"), default=0, help="sampling seed")


def generated_length(row: Sequence[int], eos_ids: Iterable[int]) -> int:
    """Tokens a row really generated: up to and including its first EOS (the rest is padding)."""
    eos = set(int(e) for e in eos_ids)
    for i, t in enumerate(row):
        if int(t) in eos:
            return i + 1
    return len(row)


def _run_settings(args: argparse.Namespace, model: CausalLM, prompts: list[list[int]],
                  mesh: Any = None) -> tuple[dict, SparseDecoding]:
    context = max(len(p) for p in prompts) + args.max_new_tokens
    decoding = sparse_decoding(args, model, batch=len(prompts), context=context)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              **decoding.generate_kwargs())
    if mesh is not None:
        kw.update(mesh=mesh, head_topk=args.head_topk)
    return kw, decoding


def _mesh(args: argparse.Namespace) -> Any:
    """The ("data", "tensor") mesh of `--tensor` / `--data` over the devices of every process, or None;
    announced on stderr with this process's place in it."""
    if args.tensor is None and args.data is None:
        return None
    mesh = make_mesh(tensor=args.tensor, data=args.data or 1)
    data, tensor = mesh_shape(mesh)
    print(f"mesh: data={data} x tensor={tensor} over {jax.device_count()} devices in {jax.process_count()} "
          f"process(es) (this is process {jax.process_index()})", file=sys.stderr, flush=True)
    return mesh


def _speed_line(rows: np.ndarray, eos_ids: Iterable[int], seconds: float, note: str) -> tuple[int, str]:
    n = int(sum(generated_length(row, eos_ids) for row in rows))
    return n, f"{len(rows)} rows, {n} new tokens in {seconds:.2f} s = {n / max(seconds, 1e-9):.1f} tokens/s ({note})"


# ---- demo ----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    tok = require_tokenizer(tok, args.model)
    prompts = [tok.encode(p) for p in DEMO_PROMPTS]
    print(f"model: {args.model} ({model.config.model_type}, {model.config.num_layers} layers, "
          f"d={model.config.hidden_size}) on {jax.default_backend()}, loaded in {time.perf_counter() - t0:.1f}s")
    kw, decoding = _run_settings(args, model, prompts)
    print(f"decoding: {decoding.describe()}")
    t0 = time.perf_counter()
    polar_jax.generate(model, prompts, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = polar_jax.generate(model, prompts, **kw)  # compiled now: this run measures decoding speed
    _, speed = _speed_line(out, model.config.eos_token_ids, time.perf_counter() - t0, "second call, compiled")
    print()
    for p, row in zip(DEMO_PROMPTS, out):
        print(f"[{p}] -> {tok.decode(row[: generated_length(row, model.config.eos_token_ids)])}")
        print()
    print(f"first call {first:.2f}s (compile + run); {speed}")
    return 0


# ---- convert -------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# ---- generate ------------------------------------------------------------------------------------------
class RowPrinter:
    """Prints generated text row by row as tokens arrive: the first unfinished row live (prompt echoed, then
    its text as it grows), later rows buffered until it is their turn. Text, not token pieces: each row is
    decoded whole and only the new suffix is written (a byte-level piece can be half a character)."""

    def __init__(self, tok: Tokenizer, prompts: Sequence[str], eos_ids: Iterable[int], out: TextIO):
        self.tok, self.prompts, self.out = tok, list(prompts), out
        self.eos = set(int(e) for e in eos_ids)
        self.ids: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.row = 0  # the row being printed live
        self.shown = ""  # its text printed so far
        self._start_row()

    def _start_row(self) -> None:
        if self.row < len(self.prompts):
            if self.row > 0:
                self.out.write("\n")  # a blank line between rows
            self.out.write(self.prompts[self.row])
            self.shown = ""
            self._show(final=False)

    def _show(self, final: bool) -> None:
        text = self.tok.decode(self.ids[self.row])
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for the next piece
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.shown = text
        self.out.flush()

    def add(self, step: np.ndarray) -> None:
        for r, t in enumerate(step):
            if not self.done[r]:
                self.ids[r].append(int(t))
                self.done[r] = int(t) in self.eos
        self._show(final=False)
        while self.row < len(self.prompts) and self.done[self.row]:
            self._finish_row()

    def _finish_row(self) -> None:
        self._show(final=True)
        self.out.write("\n")
        self.row += 1
        self._start_row()

    def close(self) -> np.ndarray:
        """Finishes every row; returns the generated ids, padded like `generate`'s output."""
        while self.row < len(self.prompts):
            self._finish_row()
        self.out.flush()
        width = max(len(r) for r in self.ids)
        return np.array([r + [-1] * (width - len(r)) for r in self.ids], np.int64)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.stream and args.json:
        raise InputError("--stream and --json do not combine: --json prints one object after generation")
    texts = [check_prompt(p, i) for i, p in enumerate(args.prompt)]
    mesh = _mesh(args)
    model, tok = load_from_args(args, mesh)
    tok = require_tokenizer(tok, args.model)
    prompts = [tok.encode(p) for p in texts]
    kw, decoding = _run_settings(args, model, prompts, mesh)
    eos_ids = model.config.eos_token_ids
    t0 = time.perf_counter()
    if args.stream:
        printer = RowPrinter(tok, texts, eos_ids, sys.stdout)
        for step in polar_jax.generate_stream(model, prompts, **kw):
            printer.add(step)
        out = printer.close()
    else:
        out = polar_jax.generate(model, prompts, **kw)
    seconds = time.perf_counter() - t0
    n_tokens, speed = _speed_line(out, eos_ids, seconds, "first call: includes compilation")
    rows = [list(map(int, row[: generated_length(row, eos_ids)])) for row in out]
    if args.json:
        print(json.dumps({
            "model": args.model, "new_tokens": n_tokens, "seconds": round(seconds, 4),
            "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 2), **decoding.to_dict(),
            "rows": [{"prompt": p, "prompt_ids": ids, "ids": row, "text": tok.decode(row)}
                     for p, ids, row in zip(texts, prompts, rows)],
        }))
        return 0
    if not args.stream:
        print("\n\n".join(p + tok.decode(row) for p, row in zip(texts, rows)))
    print(f"{speed}; decoding: {decoding.describe()}", file=sys.stderr)
    return 0


# ---- bench ---------------------------------------------------------------------------------------------
def cmd_bench_decode(args: argparse.Namespace) -> int:
    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="polar-jax", description="Polar Sparsity decoding in JAX/Pallas")
    p.add_argument("--version", action="version", version=f"polar-jax {polar_jax.__version__} (jax {jax.__version__})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="generate a batch of texts with the embedded default model, with tokens/s")
    add_model_args(d)
    add_generation_args(d)
    add_sparsity_args(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="convert an HF safetensors folder or a GGUF file to a polar-jax checkpoint")
    c.add_argument("hf_dir", help="HF checkpoint folder, or a .gguf file (dequantized)")
    c.add_argument("out_dir", help="output folder (never the input; written beside it and renamed at the end)")
    c.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="stored dtype (default: the checkpoint's)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is an earlier converted checkpoint (any other folder is refused)")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="generate continuations of text prompts (dense, or sparse with --sparsity)")
    g.add_argument("prompt", nargs="+", help="text prompt(s); several run as one batch")
    add_model_args(g)
    add_generation_args(g)
    g.add_argument("--stream", action="store_true", help="print each row's text as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object: token ids, texts, tokens/s, dense/sparse")
    add_sparsity_args(g)
    t = g.add_argument_group("tensor parallelism (polar_jax.sharding)")
    t.add_argument("--tensor", type=arg_type("tensor"), default=None,
                   help="tensor-parallel degree: heads, KV cache and MLP neurons split over this many devices "
                        "(with --data alone: the devices left)")
    t.add_argument("--data", type=arg_type("data"), default=None,
                   help="data-parallel degree: the batch split this many ways")
    t.add_argument("--head-topk", choices=HEAD_TOPK, default=DEFAULT_HEAD_TOPK,
                   help="sparse heads under tensor parallelism: each sequence's k best heads overall (global) "
                        "or ceil(k/n) best on each of the n shards (balanced)")
    add_distributed_args(g)
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks (GPU; --tiny checks the code path on CPU); "
                       "--coordinator/--num-processes/--process-id as for generate")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bd = bsub.add_parser("decode", add_help=False,
                         help="end-to-end decode step, sparse variants vs dense (`polar-jax bench decode --help`)")
    bd.add_argument("rest", nargs=argparse.REMAINDER)
    bd.set_defaults(fn=cmd_bench_decode)

    register_router_verbs(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["bench", "decode"]:
            # the benchmark owns its flags (argparse cannot forward options through nested sub-commands)
            ours, rest = split_argv(argv[2:])
            dist = Parser(prog="polar-jax bench decode")
            add_distributed_args(dist)
            args: Any = dist.parse_args(ours)
            args.fn, args.rest = cmd_bench_decode, rest
        else:
            args = build_parser().parse_args(argv)
        initialize(config_from_args(args))  # before JAX touches a device
        return int(args.fn(args) or 0)
    except PolarError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written (missing, a folder, permissions, disk full)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version print and exit 0; the benchmark's own parser exits 2
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
