"""Where each file in benchmarks/results comes from: device, jax version, date and command.

A JSON result states them itself (top level, or in `meta` / `env`; `jax_version` counts as `jax`; a file that
holds several runs as top-level objects states what its runs state, joined by "; "). What a file does not
state comes from `benchmarks/results/PROVENANCE.json`: either the missing fields, or `derived_from` (the
result files it was made from, e.g. a report or a plot of a JSON). A report or plot named after a JSON
result (`X.md`, `X_*.png` beside `X.json`) derives from it without an entry. A field nobody recorded is the
exact string "not recorded", and the jax version of a run that did not use jax (a torch baseline) is the
exact string "not used"; both come with a `note` saying what is known, never a guess.

    python benchmarks/provenance.py      # prints every file's four fields (tests/test_results_provenance.py checks them)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIDECAR = RESULTS / "PROVENANCE.json"
FIELDS = ("device", "jax", "date", "command")
NOT_RECORDED = "not recorded"
NOT_USED = "not used"  # only for `jax`: the run did not use jax (e.g. an HF/torch baseline)


def stated(path: Path) -> dict[str, str]:
    """The fields a JSON result states itself (nothing for other formats)."""
    if path.suffix != ".json" or path == SIDECAR:
        return {}
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
        return {}
    found: dict[str, str] = {}
    for scope in (d, d.get("meta") or {}, d.get("env") or {}):
        for field, value in _fields(scope).items():
            found.setdefault(field, value)
    runs = list(d.values())
    if not found and runs and all(isinstance(r, dict) for r in runs):  # several runs, one object each
        per_run = [_fields(r) for r in runs]
        for f in FIELDS:
            values = list(dict.fromkeys(r[f] for r in per_run if f in r))
            if values:
                found[f] = "; ".join(values)
    return found


def _fields(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(scope, dict):
        return out
    for key, field in (("device", "device"), ("jax", "jax"), ("jax_version", "jax"), ("date", "date"),
                       ("command", "command")):
        if scope.get(key) and field not in out:
            out[field] = str(scope[key])
    return out


def sidecar() -> dict[str, dict]:
    return json.loads(SIDECAR.read_text())["files"] if SIDECAR.exists() else {}


def _named_source(path: Path) -> list[Path]:
    stems = [p.stem for p in path.parent.glob("*.json") if p != path and p != SIDECAR]
    match = [s for s in stems if path.stem == s or path.stem.startswith(s + "_")]
    return [path.parent / (max(match, key=len) + ".json")] if match else []


def resolve(path: Path, entries: dict[str, dict] | None = None, _depth: int = 0) -> dict[str, str]:
    """The four fields of a result file (missing ones absent from the dict)."""
    entries = sidecar() if entries is None else entries
    rel = path.relative_to(RESULTS).as_posix()
    out = stated(path)
    entry = entries.get(rel, {})
    for f in FIELDS:
        if f in entry and f not in out:
            out[f] = entry[f]
    sources = [RESULTS / s for s in entry.get("derived_from", [])] or ([] if out else _named_source(path))
    if sources and _depth < 3:
        got = [resolve(s, entries, _depth + 1) for s in sources]
        for f in FIELDS:
            values = list(dict.fromkeys(g[f] for g in got if g.get(f)))
            if f not in out and values:
                out[f] = "; ".join(values)
    return out


def result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p != SIDECAR)


if __name__ == "__main__":
    for p in result_files():
        r = resolve(p)
        print(p.relative_to(RESULTS), "|", " | ".join(f"{f}: {r.get(f, 'MISSING')[:60]}" for f in FIELDS))
    sys.exit(0)
