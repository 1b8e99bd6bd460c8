"""Every `polar-jax ...` command shown in the documentation's code blocks is accepted by today's command
line (issue 11: the README's `polar-jax bench --shapes ...` failed with "unrecognized arguments").

Commands are parsed, not run: `[--a | --b]` stands for "nothing, --a or --b" (each variant is parsed), shell
variables and placeholders are paths. `bench decode` with a 7B shape is refused on a host without a GPU,
after its flags were parsed; that refusal is what a user of this CPU host gets, and it is checked too."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import jax
import pytest

from polar_jax.bench import decode_bench
from polar_jax.cli import build_parser
from polar_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/accuracy/README.md", "benchmarks/accuracy/smollm2.md")


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each `polar-jax` command in a fenced code block (continuation lines joined)."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("polar-jax "):
                    found.append((doc, re.split(r"\s#\s", line)[0].strip()))
    return found


def variants(command: str) -> list[list[str]]:
    """The argument lists a command with optional `[...]` groups stands for."""
    groups = re.findall(r"\[([^\]]*)\]", command)
    template = re.sub(r"\[[^\]]*\]", "{}", command.replace("{", "{{").replace("}", "}}"))
    choices = [[""] + [alt.strip() for alt in g.split("|")] for g in groups]
    out = []
    for pick in itertools.product(*choices):
        text = re.sub(r"\$\{?(\w+)\}?", r"\1", template.format(*pick))  # $GGUF -> GGUF (a path)
        out.append(shlex.split(text)[1:])
    return out


COMMANDS = documented_commands()


def test_the_documentation_shows_commands():
    verbs = {argv[0] for _, cmd in COMMANDS for argv in variants(cmd)}
    assert {"demo", "convert", "generate", "bench", "eval", "collect", "train-routers", "calibrate"} <= verbs


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_documented_command_parses(doc, command):
    for argv in variants(command):
        if argv[:2] == ["bench", "decode"]:
            try:
                args = decode_bench.parse_args(argv[2:])
            except InputError as e:
                assert jax.default_backend() != "gpu" and "need a GPU" in str(e), (doc, argv, e)
            else:
                assert args.shapes, argv
            continue
        args = build_parser().parse_args(argv)
        assert callable(args.fn), (doc, argv)
