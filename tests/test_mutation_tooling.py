"""The mutation-testing tooling's own rules (tests/mutation/run.py), without running cosmic-ray: every
survivor it excuses as equivalent names a line that still exists, the annotation filter covers annotations
and nothing else, and every module's functions exist."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "mutation"))

import run as mutation_run  # noqa: E402  (tests/mutation is not a package)

REPO = HERE.parent


def test_equivalent_entries_name_lines_that_exist():
    """A stale entry (its line edited or gone) would excuse nothing, or the wrong mutant: it must fail here."""
    files = {m.name: REPO / m.path for m in mutation_run.MODULES}
    assert mutation_run.EQUIVALENT
    for (module, src, mutated), why in mutation_run.EQUIVALENT.items():
        lines = {ln.strip() for ln in files[module].read_text().splitlines()}
        assert src in lines, f"{module}: no line {src!r} in {files[module]}"
        assert mutated != src and why, (module, src)
        ast.parse(mutated if not mutated.endswith(":") else mutated + " pass")  # a real Python line


def test_annotation_spans_cover_annotations_only():
    path = REPO / "polar_jax/selection.py"
    lines = path.read_text().splitlines()
    spans = mutation_run.annotation_spans(path)

    def inside(needle: str, line_with: str) -> bool:
        row = next(i for i, ln in enumerate(lines, 1) if line_with in ln)
        pos = (row, lines[row - 1].index(needle))
        return any(a <= pos < b for a, b in spans)

    assert inside("jax.Array | int", "def unit_mask(")  # a parameter annotation
    assert inside("jax.Array | float", "def adaptive_counts(")
    assert not inside("-jnp.inf", "logits = jnp.where(live.reshape(shape), logits, -jnp.inf)")  # code
    assert not inside("scores > threshold", "n = jnp.sum(scores > threshold")


def test_a_file_without_postponed_annotations_has_no_exempt_spans(tmp_path):
    """Without `from __future__ import annotations` an annotation is evaluated: its mutants must run."""
    src = tmp_path / "m.py"
    src.write_text("def f(x: int | None = None) -> int:\n    return 1\n\n\nclass C:\n    y: int | None = None\n")
    assert mutation_run.annotation_spans(src) == []
    src.write_text("from __future__ import annotations\n" + src.read_text())
    assert len(mutation_run.annotation_spans(src)) == 3  # parameter, return, class field


@pytest.mark.parametrize("module", mutation_run.MODULES, ids=lambda m: m.name)
def test_every_module_names_functions_that_exist(module):
    path = REPO / module.path
    assert path.is_file()
    if module.functions:
        assert len(mutation_run.function_lines(path, module.functions)) == len(module.functions)


def test_reclassify_judges_recorded_survivors_by_their_exact_mutated_line():
    src = "if start <= 0:"  # selection.keep_prefix_dense; `< 0` is in EQUIVALENT, `<= 1` is not

    def survivor(new: str) -> dict:
        return {"line": 137, "operator": "op", "occurrence": 0, "source": src, "equivalent": None,
                "diff": f"--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-    {src}\n+    {new}\n"}

    r = {"module": "selection", "killed": 17, "mutants": 20, "survived": 3, "equivalent": 0,
         "survivors": [survivor("if start < 0:"), survivor("if start < 0:"), survivor("if start <= 1:")]}
    new = mutation_run.reclassify(r)
    assert (new["survived"], new["equivalent"]) == (1, 2)
    assert [bool(s["equivalent"]) for s in new["survivors"]] == [True, True, False]
    assert new["score_excluding_equivalent"] == round(17 / 18, 4)
    assert not mutation_run.goal_met(new)  # one survivor is not explained
    r["survivors"] = r["survivors"][:2]
    assert mutation_run.goal_met(mutation_run.reclassify(r))


@pytest.mark.parametrize("module", mutation_run.MODULES, ids=lambda m: m.name)
def test_every_module_selects_its_tests_with_at_most_one_k(module):
    # pytest keeps only the last -k, so a second one would silently widen or narrow the selection that
    # the report names.
    assert module.tests.split().count("-k") <= 1


def test_recorded_test_commands_are_the_modules_commands():
    import json
    recorded = json.loads((REPO / "tests" / "mutation" / "results.json").read_text())["modules"]
    by_name = {m.name: m.tests for m in mutation_run.MODULES}
    for name, entry in recorded.items():
        assert entry["tests"] == by_name[name], name


def test_named_mutations_apply_to_the_current_code():
    """Each hand-written bug's text occurs exactly once where it is applied: an edit that moves or rewrites
    the line would otherwise leave the mutation unapplicable (named.py refuses it) and unnoticed until run."""
    import named  # tests/mutation/named.py

    for m in named.MUTATIONS:
        assert (REPO / m.path).read_text().count(m.old) == 1, (m.id, m.path, m.old)
        assert m.new != m.old and m.tests and m.why, m.id
