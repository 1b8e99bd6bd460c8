"""The overlap probe (benchmarks/kernels/overlap_probe.py) on CPU: every variant runs and equals the ops apart."""

import json
import subprocess
import sys

from conftest import REPO


def test_every_overlap_probe_variant_runs_and_equals_the_ops_apart(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/kernels/overlap_probe.py", "--tiny", "--batches", "1", "5",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "overlap_probe.json").read_text())["rows"]
    assert not [(r["batch"], r["variant"], r["error"]) for r in rows if "error" in r]
    assert {(r["batch"], r["variant"]) for r in rows} == {
        (b, v) for b in (1, 5) for v in ("apart", "shared", "shared_mask_first", "shared_st3")}
    assert all(0 < r["kept"] for r in rows)  # the threshold keeps neurons: the compaction has work
