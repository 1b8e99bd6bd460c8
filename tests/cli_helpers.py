"""Running the `polar-jax` CLI in-process and checking the project's promise about it: a run either succeeds
or exits 2 with exactly one `error: ...` line (an exception escaping `main` is a traceback for the user and
fails the test), and the files it reads are byte-identical afterwards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from polar_jax.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The single `error:` line of a refused run (asserts there is exactly one line and nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got {err!r}"
    return lines[0]


def assert_refused(capsys, argv, words: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, (argv, code, err)
    line = error_line(err)
    assert words in line, (argv, line)
    return line


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path` (or of `path` itself), by relative name; symlinks by target."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
