"""The README's examples cannot drift from the code (issue 16): its Python blocks run, in order, in one
namespace (as a reader would paste them), and every `polar-jax ...` line of its shell blocks parses with the
command's own parser (lm-eval's for `eval lm-eval`, the benchmark's for `bench decode`)."""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from polar_jax.bench.decode_bench import parse_args as bench_decode_args
from polar_jax.cli import build_parser
from polar_jax.errors import InputError
from polar_jax.eval.lm_eval_cli import lm_eval_argv

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def cli_lines() -> list[str]:
    out = []
    for body in blocks("bash"):
        for line in body.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("polar-jax "):
                out.append(line)
    return out


def test_the_readme_has_examples_of_every_cli_verb():
    verbs = {shlex.split(line)[1] for line in cli_lines()}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= verbs, f"verbs without a README example: {sorted(set(sub.choices) - verbs)}"


@pytest.mark.parametrize("line", cli_lines())
def test_cli_example_parses(line):
    argv = [re.sub(r"\$\{?\w+\}?", "X", a) for a in shlex.split(line)[1:]]
    if argv[:2] == ["bench", "decode"]:
        try:
            bench_decode_args(argv[2:])
        except InputError as e:  # parsed; only the host is wrong (7B shapes need a GPU)
            assert "need a GPU" in str(e), e
    elif argv[:2] == ["eval", "lm-eval"]:
        from lm_eval.__main__ import HarnessCLI  # the harness's own parser takes what polar-jax hands it

        saved = sys.argv
        try:
            sys.argv = ["lm-eval", "run", *lm_eval_argv(argv[2:])]
            HarnessCLI().parse_args()
        finally:
            sys.argv = saved
    else:
        build_parser().parse_args(argv)


def test_python_blocks_run(tmp_path, capsys):
    """Every Python block of the README, in order, in one namespace, in an empty working folder."""
    code = blocks("python")
    assert len(code) >= 4, "the README lost its Python API examples"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ns: dict = {"__name__": "readme"}
        for i, body in enumerate(code):
            try:
                exec(compile(body, f"README.md python block {i + 1}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{body}") from e
    finally:
        os.chdir(cwd)
    assert ns["out"].shape[0] == 2 and (ns["work"] / "bundle").is_dir() and ns["dense"] > 1.0
