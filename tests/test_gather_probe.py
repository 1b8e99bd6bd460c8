"""The gather probe (benchmarks/kernels/gather_probe.py) on CPU: every variant runs and matches its reference."""

import json
import subprocess
import sys

from conftest import REPO


def test_every_gather_probe_variant_runs_and_matches_the_reference(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/kernels/gather_probe.py", "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                                       "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "gather_probe.json").read_text())["rows"]
    errors = [(r["op"], r["variant"], r["order"], r["error"]) for r in rows if "error" in r]
    assert not errors
    got = {(r["op"], r["variant"], r["order"]) for r in rows}
    for order in ("sorted", "contiguous", "unsorted"):
        assert {("up", "base", order), ("down", "base", order)} <= got
    assert {("up", "dense_gemv", "contiguous"), ("up", "xla", "contiguous"), ("down", "dense_gemv", "contiguous"),
            ("down", "xla", "contiguous"), ("up", "a16", "sorted"), ("down", "split_double", "sorted")} <= got
    assert all(r["rel_err"] < 2e-2 for r in rows)
    assert {("up", f"sweep_{kind}_{rows}", order) for kind, order in (("dense", "contiguous"), ("gather", "sorted"))
            for rows in (64, 128, 256, 512)} <= got


def test_the_launch_fit_recovers_a_fixed_cost_and_a_bandwidth():
    sys.path.insert(0, str(REPO / "benchmarks" / "kernels"))
    import gather_probe

    # 6 us per launch, then 3 TB/s = 3e6 bytes per us
    fit = gather_probe.launch_fit([(b, 6.0 + b / 3e6) for b in (16.8e6, 33.5e6, 67e6, 134e6)])
    assert abs(fit["fixed_us"] - 6.0) < 1e-6 and abs(fit["stream_TBps"] - 3.0) < 1e-6
