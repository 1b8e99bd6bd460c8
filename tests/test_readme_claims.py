"""README result tables and counts equal what benchmarks/readme_claims.py computes from benchmarks/results:
a number edited by hand, or a result file changed without regenerating the README, fails here."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import readme_claims  # noqa: E402


def test_readme_blocks_match_the_results():
    text = readme_claims.README.read_text()
    assert readme_claims.render(text) == text, "README is stale: run python benchmarks/readme_claims.py"
    for name in readme_claims.CLAIMS:
        assert f"<!-- claims:{name} " in text and f"<!-- /claims:{name} -->" in text


def test_a_hand_edited_number_is_caught():
    text = readme_claims.README.read_text()
    for old, new in (("| 6.11 ms |", "| 6.10 ms |"), ("at 39 of the 43", "at 43 of the 43"),
                     ("| 1.093 |", "| 1.039 |"), ("93 of the 96", "96 of the 96"),
                     ("| 13.11 ms | 1.66x", "| 13.11 ms | 1.86x"),
                     ("within 90 % of their Amdahl bound: 4 of 8", "within 90 % of their Amdahl bound: 8 of 8"),
                     ("SHA-256 runs at 0.56 GB/s", "SHA-256 runs at 5.6 GB/s")):
        assert text.count(old) == 1, old
        assert readme_claims.render(text.replace(old, new)) == text  # regenerating restores the source's value


def test_no_placeholder_is_left_in_the_docs():
    """A sentence waiting for a measurement was once committed as VERIFY_COST_SENTENCE."""
    for path in (readme_claims.README, REPO / "docs" / "ARCHITECTURE.md"):
        text = path.read_text()
        assert not re.findall(r"\b[A-Z]+_[A-Z_]*(?:SENTENCE|NUMBER|RESULT|PLACEHOLDER)\b|\bTODO\b|\bTBD\b|\bFIXME\b",
                              text), path


def test_unregistered_or_missing_blocks_are_errors():
    text = readme_claims.README.read_text()
    with pytest.raises(KeyError, match="no registered claim"):
        readme_claims.render(text + "\n<!-- claims:nope -->\nx\n<!-- /claims:nope -->\n")
    start = text.index("<!-- claims:accuracy ")
    end = text.index("<!-- /claims:accuracy -->") + len("<!-- /claims:accuracy -->")
    with pytest.raises(KeyError, match="without a README block"):
        readme_claims.render(text[:start] + text[end:])


def test_an_unmeasured_point_never_counts_as_met(tmp_path):
    """A NaN / missing XLA dense time or a missing bandwidth takes the point out of 'met'."""
    results = tmp_path / "results"
    shutil.copytree(readme_claims.RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    path = results / readme_claims.KERNELS
    data = json.loads(path.read_text())
    big = [r for r in data["attn"] if r["active_bytes"] >= 256e6 and r["dense_xla"] is not None
           and not math.isnan(r["dense_xla"])]
    big[0]["dense_xla"] = None
    big[1]["ours_TBps"] = float("nan")
    path.write_text(json.dumps(data))
    out = readme_claims.select_decode(results)
    assert "at 38 of the 43" in out and "the other 5" in out
    assert "at 42 of the 43 shapes" in out


def test_the_oracle_at_a_fractional_unit_count():
    """Adaptive budgets keep a fractional mean of units: the oracle they are compared with mixes its two nearest
    whole counts per token (log-perplexity linear in the mix), never extrapolates below the sparsest count
    measured, and reaches the dense model at all units."""
    oracle = {("head", 4): 40.0, ("head", 5): 20.0, ("group", 1): 90.0}
    at = readme_claims._oracle_at
    assert at(oracle, 10.0, "head", 6, 5.0) == pytest.approx(20.0)
    assert at(oracle, 10.0, "head", 6, 4.5) == pytest.approx(math.sqrt(40.0 * 20.0))
    assert at(oracle, 10.0, "head", 6, 5.25) == pytest.approx(20.0 ** 0.75 * 10.0 ** 0.25)  # 6 of 6 = dense
    assert at(oracle, 10.0, "head", 6, 3.7) == 40.0 and at(oracle, 10.0, "group", 3, 0.9) == 90.0


def test_the_routers_gemv_counted_in_other_is_added_back_to_router_and_selection():
    """Profiles before 2026-12-08 named the routers' float32 GEMV gemv_nk, like the down projections: the claims add
    its time back to router + selection, and only where the sparse step launched more gemv_nk kernels than it has
    layers with a dense MLP."""
    def row(kernels):
        return {"kernels": [{"kernel": k, "part": p, "per_step": n, "ms_per_step": ms} for k, p, n, ms in kernels]}

    dense = row([("gemv_nk", "other", 32.0, 1.6)])  # 32 down projections, 0.05 ms each
    old = row([("union_mask", "router", 31.0, 0.5), ("gemv_nk", "other", 32.0, 0.25)])  # 31 router GEMVs + layer 0
    new = row([("union_mask", "router", 31.0, 0.5), ("gemv_nk_router", "router", 31.0, 0.2),
               ("gemv_nk", "other", 1.0, 0.05)])
    b1 = row([("union_mask", "router", 31.0, 0.5), ("gemv_nk", "other", 1.0, 0.05)])  # XLA's product at B=1
    assert math.isclose(readme_claims._router_gemv_ms(old, dense), 0.2)
    assert readme_claims._router_gemv_ms(new, dense) == 0.0 and readme_claims._router_gemv_ms(b1, dense) == 0.0
    assert readme_claims._router_gemv_ms(row([]), dense) == 0.0  # no MLP router: nothing to add


def test_ab_lines_read_a_step_variants_file():
    """The A/B lines a README block will take from a step_variants file (the 'priority' GPU run): the speed change
    against base in the same process, the launches removed, the dense step and the ratio where timed."""
    def row(sel, code, ms, launches=None):
        r = dict(shape="opt-6.7b", batch=32, context=2048, selector=sel, code=code, step_ms=ms)
        if launches is not None:
            r["pallas_launches"] = launches
        return r

    rows = [row("dense", "base", 16.0), row("both", "base", 8.0, {"a": 10, "b": 5}),
            row("dense", "overlap", 16.0), row("both", "overlap", 7.5, {"a": 9}),
            row("dense", "row_norm32", 15.5), row("both", "row_norm32", 8.2, {"a": 10, "b": 5})]
    lines = readme_claims.ab_lines(rows)
    assert lines == [
        "- opt-6.7b B=32 both `overlap`: +6.7 %, -6 Pallas launches per step; dense +0.0 %, dense / both 2.13x "
        "(with `base`: 2.00x)",
        "- opt-6.7b B=32 both `row_norm32`: -2.4 %, +0 Pallas launches per step; dense +3.2 %, dense / both 1.89x "
        "(with `base`: 2.00x)"]
    # files written before the launches were recorded, and points without a dense step
    old = [{k: v for k, v in r.items() if k != "pallas_launches"} for r in rows if r["selector"] == "both"]
    assert readme_claims.ab_lines(old) == ["- opt-6.7b B=32 both `overlap`: +6.7 %", "- opt-6.7b B=32 both `row_norm32`: -2.4 %"]
