"""Mutation testing of the core numerical modules with cosmic-ray (PyPI `cosmic-ray==8.7.0`).

    pip install ".[mutation]"                                     # cosmic-ray, once
    python tests/mutation/run.py                                  # every module below, all mutants
    python tests/mutation/run.py --modules sampling rope          # some modules
    python tests/mutation/run.py --max-mutants 20                 # bounded: an even sample per module
    python tests/mutation/run.py --record                         # also record into REPORT.md + results.json

Why cosmic-ray: it edits the source file on disk and runs the test command in a fresh process per
mutant, which is what JAX code needs (jitted functions are traced from the file; a mutant must not
share a process, a compilation cache or a fork with another). mutmut 3 skips decorated functions, so it
cannot mutate the `jax.jit`-decorated decode loop.

Each module is mutated in a temporary copy of the checkout (the working tree is never touched), only
inside the functions listed for it, and tested with the tests that are about it (see MODULES), one
mutant at a time. The score of a module is killed / (killed + survived); a mutant whose test run times
out or errors counts as killed (cosmic-ray's rule). Survivors are listed with their diff; the ones
judged equivalent (no test can tell them apart from the original) are explained in EQUIVALENT and
reported separately, never hidden.

Operators: cosmic-ray's core set, minus replacements of an arithmetic operator by a bitwise or shift
operator (`a / b` -> `a >> b`, ...) and the variable inserter/replacer: on float arrays the former are
type errors (killed by any test that runs the line, but each costs a full test run), the latter produce
mostly nonsense names (NameError). `--all-operators` keeps them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from named import copy_checkout  # noqa: E402  (same folder; tests/ is not a package)

PYTEST = "python -m pytest -x -q -p no:cacheprovider"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: str  # file mutated, relative to the repository root
    functions: tuple[str, ...] | None  # qualified names mutated (None: the whole file)
    tests: str  # pytest arguments that exercise it
    timeout: float  # seconds per mutant at least (raised to 4x the unmutated run's time on a loaded machine)


MODULES: tuple[Module, ...] = (
    Module("sampling", "polar_jax/decode.py", ("sample_tokens",), "tests/test_sampling.py", 120),
    Module("decode-loop", "polar_jax/decode.py", ("_token_loop", "_generate_on_device", "generate_stream"),
           # One -k only: pytest keeps the last of several, so the recorded run's two -k options selected
           # exactly what this selects (the whole of test_generate.py by its file name, and the
           # generate tests of test_sampling.py).
           "tests/test_generate.py tests/test_sampling.py -k generate", 300),
    Module("rope", "polar_jax/models/layers.py", ("rope_inv_freq", "apply_rope"),
           "tests/test_parity.py -k 'rope_frequencies or prefill_logits'", 200),
    Module("selection", "polar_jax/selection.py", None,
           "tests/test_routers_core.py tests/test_sparse_selection.py -k 'union_rules or adaptive_counts or "
           "top_units or adaptive_budgets or attention_selection or selection_types'", 120),
    Module("unit-top-k-reference", "pallas_kernels/unit_top_k_xla.py", None,
           "tests/test_sparse_selection.py tests/test_kernels_xla.py -k 'top_units or unit_top_k'", 120),
    Module("calibrate", "polar_jax/routers/calibrate.py", None,
           "tests/test_calibrate.py tests/test_routers_core.py tests/test_sparse_selection.py -k 'calibrat or "
           "recall_curve or adaptive_budgets or monotone or importance'", 150),
    Module("gemm-reference", "pallas_kernels/selective_gemm_xla.py", None, "tests/test_kernel_references.py", 120),
    Module("attention-reference", "pallas_kernels/selective_attention_xla.py", None,
           "tests/test_kernel_references.py", 120),
    Module("union-reference", "pallas_kernels/union_select_xla.py", None, "tests/test_kernels_xla.py -k union", 120),
    Module("gemv-reference", "pallas_kernels/dense_gemv_xla.py", None, "tests/test_kernels_xla.py -k gemv", 120),
    Module("slots", "pallas_kernels/slots.py", None, "tests/test_kernel_references.py", 120),
    Module("activations", "pallas_kernels/activations.py", None, "tests/test_kernel_references.py", 120),
)

EXCLUDED_OPERATORS = (
    r"core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow)_(BitOr|BitAnd|BitXor|LShift|RShift)$",
    r"core/VariableInserter", r"core/VariableReplacer",
)

# Survivors judged equivalent: (module name, source line, mutated line; both stripped) -> why no test can
# fail. Keyed by the exact mutated text, so that another mutant of the same line is never excused by it.
def _equivalent_table() -> dict[tuple[str, str, str], str]:
    table: dict[tuple[str, str, str], str] = {}

    def add(module: str, src: str, mutated: tuple[str, ...], why: str) -> None:
        for new in mutated:
            table[(module, src, new)] = why

    dest = "dest = jnp.where(mask & (pos < capacity), pos, capacity)"
    add("union-reference", dest, tuple(dest.replace("mask & (pos < capacity)", m) for m in (
        "mask // (pos < capacity)", "mask ** (pos < capacity)", "mask & (pos is not capacity)",
        "mask & (pos != capacity)", "mask & (pos <= capacity)")),
        "`pos < capacity` is redundant: where mask is True, pos >= 0, and a pos >= capacity is out of range of "
        "idx, which the scatter (mode='drop') drops just as it drops dest = capacity; where mask is False the "
        "mutated condition is still False (pos < capacity holds there) or pos >= capacity is dropped anyway")
    spec = 'return jnp.einsum("mk,kn->mn" if layout == "kn" else "mk,nk->mn", x, w, preferred_element_type=jnp.float32)'
    add("gemv-reference", spec, (spec.replace("==", "<="),),
        "layout is 'kn' or 'nk' (dense_gemv.check_gemv refuses anything else before dispatch), and "
        "'kn' <= 'kn' is True, 'nk' <= 'kn' False: the same branch as ==")
    for src in ("y = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], y, 0.0)",
                "hm = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], h, jnp.zeros((), h.dtype))",
                "hm = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], h.astype(jnp.float32), 0.0)"):
        add("gemm-reference", src, (src.replace("idx.shape[0]", "idx.shape[ -1]"),),
            "idx is 1-D [A] (selective_gemm._check_idx refuses any other rank): shape[-1] is shape[0]")
    add("rope", 'if rope.kind != "llama3":', ('if rope.kind < "llama3":',),
        "kind is 'default', 'linear' or 'llama3' (config._rope refuses any other) and 'linear' has returned "
        "above: 'default' < 'llama3' is True, 'llama3' < 'llama3' False, the same as !=")
    medium = "medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)"
    add("rope", medium, (medium.replace(">=", ">"),),
        "at wavelen == high_wavelen the blend factor is 1, so the blended value is `scaled` (= inv there), which "
        "is also what the edge gets when it is left out of the band (equal up to float32 rounding; the test "
        "test_rope_frequencies_llama3_are_continuous_at_the_band_edges[high] puts a frequency on this edge)")
    bracket = "lo0, hi0 = float(logits.min()) - 1.0, float(logits.max()) + 1.0"
    add("calibrate", bracket, (bracket.replace("+ 1.0", "+ 2.0"), bracket.replace("- 1.0", "- 2.0")),
        "a wider starting bracket of the bisection: any bracket that holds every logit contains the same step "
        "point, and 60 halvings of a bracket a few units wide end within ~1e-17 of it (below float64's "
        "resolution there), so the threshold is the same up to rounding")
    kept = ("kept = np.cumsum(np.take_along_axis(mass, order, axis=-1), axis=-1) / "
            "np.maximum(mass.sum(-1, keepdims=True), 1e-30)")
    add("calibrate", kept, (kept.replace("order, axis=-1", "order, axis=1"),
                            kept.replace("), axis=-1)", "), axis=1)")),
        "importance_curve takes [tokens, units] arrays (one router's scores and unit norms): axis 1 is axis -1")
    step = "done = done | jnp.isin(new, eos_ids)"
    add("decode-loop", step, (step.replace("done |", "done +"),),
        "done and jnp.isin(...) are boolean arrays, and jnp's + on booleans is logical or (the carry stays bool: "
        "any other dtype would make while_loop refuse the body)")
    add("decode-loop", "if i > 0:", ("if i != 0:",), "i comes from range(max_new_tokens): never negative")
    rank = "return jnp.sum(above | tie_before, axis=-1, dtype=jnp.int32)"
    add("unit-top-k-reference", rank, (rank.replace("|", "+"), rank.replace("|", "^")),
        "above (s_j > s_i) and tie_before (s_j == s_i) are never both True, so on booleans + and ^ are |")
    add("selection", "if start <= 0:", ("if start < 0:",),
        "at start = 0 the skipped line returns jnp.where(arange(t) < 0, 1.0, mask), which is mask (the float "
        "masks the evaluation passes); the early return only saves that work")
    stab = "p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))"
    add("attention-reference", stab, (stab.replace("0.0", "1.0"), stab.replace("0.0", "-1.0")),
        "the fallback only applies where mx = -inf, i.e. every key of the row is masked: then s = -inf and "
        "exp(-inf - c) = 0 for any finite c (den = 0, the output is 0 either way)")
    for src in ("return jnp.argmax(logits, axis=-1).astype(jnp.int32)",
                "order = jnp.argsort(-logits, axis=-1)",
                "sorted_logits = jnp.take_along_axis(logits, order, axis=-1)",
                "probs = jax.nn.softmax(sorted_logits, axis=-1)",
                "keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p",
                "choice = jax.random.categorical(key, sorted_logits, axis=-1)",
                "return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)"):
        add("sampling", src, (src.replace("axis=-1", "axis=+1"),),
            "sample_tokens takes logits [B, V] (its contract; generate and generate_stream pass [B, V]): on a "
            "2-D array axis +1 is axis -1")
    return table


EQUIVALENT = _equivalent_table()


def _mutated_line(diff: str) -> str:
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return added[0] if len(added) == 1 else "\n".join(added)


def function_lines(path: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Line ranges (1-based, inclusive) of the named top-level functions, decorators excluded."""
    tree = ast.parse(path.read_text())
    spans = {n.name: (n.lineno, n.end_lineno) for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    missing = set(names) - set(spans)
    if missing:
        raise SystemExit(f"{path}: no top-level function(s) {sorted(missing)}; update MODULES in {__file__}")
    return [spans[n] for n in names]


def write_config(root: Path, m: Module, all_operators: bool, timeout: float) -> Path:
    cfg = root / f"cr-{m.name}.toml"
    excluded = [] if all_operators else list(EXCLUDED_OPERATORS)
    cfg.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{m.path}"\n'
        f"timeout = {timeout:.0f}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {m.tests}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {json.dumps(excluded)}\n"
    )
    return cfg


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions ((line 1-based, column 0-based), end exclusive) of every annotation in a file
    that has `from __future__ import annotations` (there annotations are strings that nothing evaluates at
    run time, so a mutant inside one is equivalent by construction); [] for any other file."""
    tree = ast.parse(path.read_text())
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    if not future:
        return []
    nodes = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            nodes += [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                      if x is not None and x.annotation is not None]
            nodes += [n.returns] if n.returns is not None else []
        elif isinstance(n, ast.AnnAssign):
            nodes.append(n.annotation)
    return [((x.lineno, x.col_offset), (x.end_lineno, x.end_col_offset)) for x in nodes]


def select_work(session: Path, m: Module, root: Path, max_mutants: int | None) -> tuple[int, int, int]:
    """Marks as skipped the mutants outside the module's functions, those inside annotations (equivalent,
    see `annotation_spans`; counted and reported) and, when bounded, all but an even sample of
    `max_mutants`; returns how many remain, how many the functions hold outside annotations, and how many
    were inside annotations."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = function_lines(root / m.path, m.functions) if m.functions else None
    annotations = annotation_spans(root / m.path)
    n_annotation = 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        kept = []
        for item in db.pending_work_items:
            pos = tuple(item.mutations[0].start_pos)
            if spans is not None and not any(a <= pos[0] <= b for a, b in spans):
                db.set_result(item.job_id, WorkResult(output="outside the module's functions",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
            elif any(a <= pos < b for a, b in annotations):
                n_annotation += 1
                db.set_result(item.job_id, WorkResult(output="inside an annotation (never evaluated)",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
            else:
                kept.append(item)
        population = len(kept)
        if max_mutants is not None and len(kept) > max_mutants:
            kept.sort(key=lambda it: (it.mutations[0].start_pos, it.mutations[0].operator_name,
                                      it.mutations[0].occurrence))
            step = len(kept) / max_mutants
            chosen = {kept[int(i * step)].job_id for i in range(max_mutants)}
            for it in kept:
                if it.job_id not in chosen:
                    db.set_result(it.job_id, WorkResult(output="not in the bounded sample",
                                                        worker_outcome=WorkerOutcome.SKIPPED))
            kept = [it for it in kept if it.job_id in chosen]
        return len(kept), population, n_annotation


def collect(session: Path, m: Module, root: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    lines = (root / m.path).read_text().splitlines()
    killed = survived = equivalent = incompetent = timeouts = 0
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            mut = item.mutations[0]
            if result.test_outcome == TestOutcome.SURVIVED:
                src = lines[mut.start_pos[0] - 1].strip()
                why = EQUIVALENT.get((m.name, src, _mutated_line(result.diff or "")))
                entry = {"line": mut.start_pos[0], "operator": mut.operator_name, "occurrence": mut.occurrence,
                         "source": src, "diff": result.diff, "equivalent": why}
                survivors.append(entry)
                if why:
                    equivalent += 1
                else:
                    survived += 1
            else:
                killed += 1
                incompetent += result.test_outcome == TestOutcome.INCOMPETENT
                timeouts += result.output == "timeout"  # cosmic-ray's marker; counted as killed, reported apart
    total = killed + survived + equivalent
    return {"module": m.name, "file": m.path, "functions": list(m.functions) if m.functions else "whole file",
            "tests": m.tests, "mutants": total, "killed": killed, "survived": survived,
            "equivalent": equivalent, "incompetent": incompetent, "timeouts": timeouts,
            "score": round(killed / total, 4) if total else None,
            "score_excluding_equivalent": round(killed / (killed + survived), 4) if killed + survived else None,
            "survivors": sorted(survivors, key=lambda s: (s["line"], s["operator"]))}


def run_module(m: Module, root: Path, args, log, baseline_s: float | None = None) -> dict:
    timeout = max(m.timeout, 4 * baseline_s) if baseline_s else m.timeout
    cfg = write_config(root, m, args.all_operators, timeout)
    session = root / f"cr-{m.name}.sqlite"
    env = dict(os.environ, PYTHONPATH=str(root), POLAR_SHARED=str(REPO.parent / "shared"))

    def cr(*a: str) -> None:
        r = subprocess.run(list(a), cwd=root, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(a)} failed:\n{r.stdout}\n{r.stderr}")

    cr("cosmic-ray", "init", cfg.name, session.name)
    cr("cr-filter-operators", session.name, cfg.name)
    n, population, n_annotation = select_work(session, m, root, args.max_mutants)
    log(f"{m.name}: {n} of {population} mutants ({n_annotation} more inside annotations, not run) in {m.path} "
        f"({', '.join(m.functions) if m.functions else 'whole file'})")
    if args.count:
        return {"module": m.name, "mutants": n, "population": population, "annotation_mutants": n_annotation}
    t0 = time.time()
    cr("cosmic-ray", "exec", cfg.name, session.name)
    res = collect(session, m, root)
    res["seconds"] = round(time.time() - t0)
    res["population"] = population
    res["annotation_mutants"] = n_annotation
    res["timeout_s"] = round(timeout)
    res["baseline_s"] = round(baseline_s) if baseline_s else None
    log(f"{m.name}: {res['killed']}/{res['mutants']} killed ({res['timeouts']} by timeout), {res['survived']} "
        f"survived, {res['equivalent']} equivalent ({res['seconds']} s)")
    return res


def baseline(m: Module, root: Path) -> float:
    """Runs the module's tests on the unmutated copy (they must pass); returns their wall time."""
    env = dict(os.environ, PYTHONPATH=str(root), POLAR_SHARED=str(REPO.parent / "shared"))
    t0 = time.time()
    r = subprocess.run(f"{PYTEST} {m.tests}", shell=True, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{m.name}: the unmutated tests fail, fix them first:\n{r.stdout[-3000:]}")
    return time.time() - t0


def report_md(entries: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    L = ["# Mutation testing report", "",
         "Written by `tests/mutation/run.py --record` (cosmic-ray) from `results.json`; do not edit by hand.",
         "Each row states the command, commit and date of the run that produced it.", "",
         "Killed includes mutants whose tests ran past the timeout (4x the unmutated tests' time, at least the",
         "module's floor); that count is given apart. Score = killed / mutants run; score without equivalent =",
         "killed / (mutants run - equivalent), the usual mutation score, which the goal of issue 13 (85 %) is",
         "measured on, with every survivor either killed by a test or explained below as equivalent.", "",
         "Mutants inside annotations are not run: every file here has `from __future__ import annotations`, so",
         "an annotation is a string nothing evaluates and such a mutant (`jax.Array | int` -> `jax.Array % int`)",
         "is equivalent by construction. Their number is given; 'of all' counts the others.", "",
         "| module | file (functions) | tests | mutants run (of all) | in annotations (not run) | killed (by timeout) "
         "| survived | equivalent | score | score without equivalent | goal (>= 85 %, no unexplained survivor) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in entries:
        fn = r["functions"] if isinstance(r["functions"], str) else ", ".join(r["functions"])
        L.append(f"| {r['module']} | `{r['file']}` ({fn}) | `{r['tests']}` | {r['mutants']} ({r.get('population', '?')}) "
                 f"| {r.get('annotation_mutants', 'not filtered')} | {r['killed']} ({r.get('timeouts', '?')}) | {r['survived']} | {r['equivalent']} | {pct(r['score'])} | "
                 f"{pct(r['score_excluding_equivalent'])} | {'met' if goal_met(r) else 'not met'} |")
    L += ["", "## Runs", ""]
    for r in entries:
        m = r["meta"]
        L.append(f"- {r['module']}: `{m['command']}` — {m['date']}, commit {m['commit']}, cosmic-ray "
                 f"{m['cosmic_ray']}, jax {m['jax']}, Python {m['python']}, {m['device']} (load average "
                 f"{m.get('load_average_at_start', '?')} at the start); "
                 f"{'every mutant' if not m['max_mutants'] else 'bounded sample of ' + str(m['max_mutants'])}; "
                 f"{'all operators' if m['all_operators'] else 'standard operator set'}; {r['seconds']} s "
                 f"(unmutated tests {r.get('baseline_s', '?')} s, timeout {r.get('timeout_s', '?')} s)"
                 + (f"; survivors judged against the equivalence table of commit {m['reclassified']['commit']} "
                    f"(`{m['reclassified']['command']}`, {m['reclassified']['date']})" if m.get("reclassified") else ""))
    L += ["", "## Survivors", ""]
    for r in entries:
        if not r["survivors"]:
            continue
        L += [f"### {r['module']}", ""]
        for s in r["survivors"]:
            tag = f"equivalent: {s['equivalent']}" if s["equivalent"] else "**not killed**"
            L.append(f"- line {s['line']} `{s['operator']}`: `{s['source']}` -> `{_mutated_line(s['diff'] or '')}` "
                     f"— {tag}")
        L.append("")
    return "\n".join(L) + "\n"


def goal_met(r: dict) -> bool:
    return r["survived"] == 0 and r["score_excluding_equivalent"] is not None and r["score_excluding_equivalent"] >= 0.85


def reclassify(r: dict) -> dict:
    """A recorded module result with its survivors judged again against the current EQUIVALENT table (the
    mutants' outcomes are those recorded; only the judgement of the survivors changes)."""
    survivors = [{**s, "equivalent": EQUIVALENT.get((r["module"], s["source"], _mutated_line(s["diff"] or "")))}
                 for s in r["survivors"]]
    equivalent = sum(bool(s["equivalent"]) for s in survivors)
    survived = len(survivors) - equivalent
    killed = r["killed"]
    return {**r, "survivors": survivors, "survived": survived, "equivalent": equivalent,
            "score_excluding_equivalent": round(killed / (killed + survived), 4) if killed + survived else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="mutation testing of the core numerical modules (cosmic-ray)")
    ap.add_argument("--modules", nargs="+", choices=[m.name for m in MODULES], default=None)
    ap.add_argument("--max-mutants", type=int, default=None, help="bounded mode: at most this many per module")
    ap.add_argument("--all-operators", action="store_true", help="do not exclude any cosmic-ray operator")
    ap.add_argument("--record", action="store_true", help="write tests/mutation/REPORT.md and results.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (sessions, configs)")
    ap.add_argument("--count", action="store_true", help="only count the mutants per module (no test runs)")
    ap.add_argument("--reclassify", action="store_true",
                    help="no test runs: judge the recorded survivors again against EQUIVALENT and rewrite the report")
    args = ap.parse_args(argv)
    command = "python tests/mutation/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.reclassify:
        path = HERE / "results.json"
        recorded = json.loads(path.read_text())["modules"]
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        stamp = {"commit": _git("rev-parse", "--short", "HEAD"), "command": command, "date": date}
        for name, r in recorded.items():
            if args.modules and name not in args.modules:
                continue
            new = reclassify(r)
            if (new["survived"], new["equivalent"]) != (r["survived"], r["equivalent"]):
                new["meta"] = {**r["meta"], "reclassified": stamp}
            recorded[name] = new
            print(f"{name}: {new['killed']}/{new['mutants']} killed, {new['survived']} survived, "
                  f"{new['equivalent']} equivalent", flush=True)
        for r in recorded.values():
            record(r, r["meta"])
        return 0
    if shutil.which("cosmic-ray") is None:
        raise SystemExit('cosmic-ray is not installed: pip install ".[mutation]"')
    chosen = [m for m in MODULES if not args.modules or m.name in args.modules]
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="polar-mutation-"))
    root = tmp / "repo"
    root.mkdir()
    copy_checkout(root)
    dirty = _git("status", "--porcelain", "--", ".", ":!tests/mutation/results.json", ":!tests/mutation/REPORT.md")
    meta = {"commit": _git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""),
            "load_average_at_start": round(os.getloadavg()[0], 1),
            "cosmic_ray": _version("cosmic-ray"), "jax": _version("jax"), "python": platform.python_version(),
            "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "max_mutants": args.max_mutants,
            "all_operators": args.all_operators,
            "command": command}
    try:
        for m in chosen:
            r = run_module(m, root, args, log, None if args.count else baseline(m, root))
            if args.count:
                continue
            log(f"{r['module']}: score {r['score']}")
            if args.record:  # after each module, so that a long run that stops keeps what it finished
                date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                record(r, {**meta, "date": date})
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def record(result: dict, meta: dict) -> None:
    """Merges one module's result into results.json (a run replaces only the modules it ran) and rewrites
    REPORT.md from it."""
    path = HERE / "results.json"
    recorded = json.loads(path.read_text())["modules"] if path.exists() else {}
    recorded[result["module"]] = {**result, "meta": meta}
    order = [m.name for m in MODULES]
    entries = [recorded[k] for k in sorted(recorded, key=lambda k: order.index(k) if k in order else 99)]
    path.write_text(json.dumps({"modules": {e["module"]: e for e in entries}}, indent=1) + "\n")
    (HERE / "REPORT.md").write_text(report_md(entries))


def _git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
