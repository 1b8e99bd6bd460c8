"""`polar-jax eval lm-eval ...`: lm-evaluation-harness's own command line with the polar-jax model registered.

lm-eval 0.4.13 has no plugin entry points, so a bare `lm_eval --model polar-jax` cannot find a third-party
model. This verb imports the adapter (which registers "polar-jax"), adds `--model polar-jax` and, unless the
user gives one, `--include_path` with the local tasks shipped with polar-jax, and hands every other argument
to lm-eval's `run` command unchanged: its flags, its progress output and its results table.

    polar-jax eval lm-eval --model_args model=PATH,sparsity=PATH,attn_density=0.5 --tasks polar_next_sentence
"""

from __future__ import annotations

import argparse
import sys

from polar_jax.errors import InputError
from polar_jax.eval.lm_eval_tasks import TASKS_DIR

USAGE = (
    "usage: polar-jax eval lm-eval [lm-eval run arguments]\n"
    "  e.g. polar-jax eval lm-eval --model_args model=default,sparsity=default,attn_density=0.5 "
    "--tasks polar_next_sentence --batch_size 16\n"
    "  model_args: model, sparsity, attn_density, mlp_recall, per_layer, attn, mlp, adaptive, dtype, max_length,\n"
    "  max_gen_toks, prefix_token_id, add_bos_token, seed, verify (see polar_jax/eval/lm_eval_adapter.py).\n"
    "  Local tasks (added unless you give --include_path): polar_next_sentence, polar_wikitext_ppl (tag polar_local).\n"
    "lm-eval's own options follow.\n"
)


def _flag_value(argv: list[str], flag: str) -> tuple[bool, str | None]:
    """Whether `flag` is given (as `--flag v` or `--flag=v`) and its value."""
    for i, a in enumerate(argv):
        if a == flag:
            return True, argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith(flag + "="):
            return True, a.split("=", 1)[1]
    return False, None


def lm_eval_argv(user_args: list[str]) -> list[str]:
    """The argument list for lm-eval's `run` command."""
    given, model = _flag_value(user_args, "--model")
    if given and model != "polar-jax":
        raise InputError(f"polar-jax eval lm-eval evaluates polar-jax models; drop --model {model} "
                         "(choose the checkpoint with --model_args model=PATH)")
    argv = list(user_args)
    if not given:
        argv = ["--model", "polar-jax"] + argv
    if not _flag_value(user_args, "--include_path")[0]:
        argv += ["--include_path", str(TASKS_DIR)]
    return argv


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise InputError('lm-eval is not installed: pip install "polar-jax[eval]"') from None
    import polar_jax.eval.lm_eval_adapter  # noqa: F401  (registers the "polar-jax" model with lm-eval)

    user_args = list(args.lm_eval_args)
    if not user_args or user_args[0] in ("-h", "--help"):
        print(USAGE)
        argv = ["lm-eval", "run", "--help"]
    else:
        argv = ["lm-eval", "run"] + lm_eval_argv(user_args)
    saved = sys.argv
    sys.argv = argv
    try:
        cli_evaluate()
    except ValueError as e:  # lm-eval reports bad task names, model_args and configs as ValueError
        raise InputError(str(e)) from None
    finally:
        sys.argv = saved
    return 0


def register(eval_subparsers) -> None:
    """Adds `lm-eval` under `polar-jax eval` (called from polar_jax/routers/cli.py)."""
    # No option of its own: with '-' not a prefix character here, every argument (--tasks, --help, ...)
    # is collected untouched for lm-eval instead of being rejected as unknown by argparse.
    p = eval_subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="+", help="lm-evaluation-harness on a polar-jax model (dense or "
        "sparse); takes lm-eval's run arguments")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_lm_eval)
