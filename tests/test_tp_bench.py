"""benchmarks/decode/tp_bench.py (the GPU tensor-parallel benchmark) runs its code path on CPU: --tiny on 4
fake devices, TP 1 and 4, every variant; the sharded step's logits equal one device's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_tensor_parallel import fake_devices_env

REPO = Path(__file__).resolve().parents[1]


def test_tp_bench_tiny_runs_and_reports(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "decode" / "tp_bench.py"), "--tiny", "--shapes", "tiny-opt-tp",
           "--tp", "1", "4"]
    env = fake_devices_env(4)
    env["OUT"] = str(tmp_path)  # where the device machine collects results
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    report = json.loads((tmp_path / "tp_bench.json").read_text())
    rows = {(r["tp"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(n, v) for n in (1, 4) for v in ("dense", "sparse-global", "sparse-balanced")}
    for (n, v), r in rows.items():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["roofline_fraction"]
        if n == 4:
            assert r["allreduce"]["bytes"] == 4 * 64 * 4  # [B=4, d=64] float32
            assert r["allreduce"]["chain_s"] > 0
            if v != "sparse-balanced":  # the TP step computes what one device computes
                assert r["logits_rel_diff_vs_tp1"] < 1e-5, r
        if v != "dense":
            assert r["speedup_vs_dense"] > 0 and r["amdahl_bound"] > 1
    # 8 heads, density 0.3 -> k = 2; balanced over 4 shards keeps 1 per shard
    assert rows[(4, "sparse-global")]["units_kept"] == 2 and rows[(4, "sparse-balanced")]["units_kept"] == 4
    assert "| tiny-opt-tp | 4 | 4 | 32 | sparse-balanced |" in res.stdout
    assert (tmp_path / "tp_bench.md").read_text().count("| tiny-opt-tp |") == 6
