"""`polar-jax bench decode --tensor/--data` (issue 15): the benchmark's decode steps on a ("data", "tensor")
mesh of 4 fake CPU devices (a subprocess, so the suite keeps one device), and its refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cli_helpers import assert_refused
from test_tensor_parallel import fake_devices_env


def test_bench_decode_runs_on_a_mesh(tmp_path):
    cmd = [sys.executable, "-m", "polar_jax.cli", "bench", "decode", "--tiny", "--tensor", "2", "--data", "2",
           "--batches", "4", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=fake_devices_env(4), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert "mesh data=2 x tensor=2" in res.stdout
    (report,) = tmp_path.glob("decode_sparse_*.json")
    merged = json.loads(report.read_text())
    assert merged["mesh"] == {"data": 2, "tensor": 2}
    got = {(r["shape"], r["variant"]) for r in merged["rows"]}
    # every variant that runs on a mesh, MLP ones for the ReLU model only; no policy or GEMV variants
    assert got == {("tiny-opt", v) for v in ("dense", "heads", "mlp", "both")} | {("tiny-llama", v) for v in ("dense", "heads")}
    for r in merged["rows"]:
        assert (r["tensor"], r["data"], r["batch"]) == (2, 2, 4)
        hkv = {"tiny-opt": 4, "tiny-llama": 2}[r["shape"]]
        assert r["kv_shard"][0] == 2 and r["kv_shard"][2] == hkv // 2  # the stepped cache: rows over data, KV heads over tensor
        assert r["step_s"] > 0 and 0 < r["roofline_fraction"] < 1
        if r["variant"] == "dense":
            continue
        diff = r["logits_rel_diff_vs_dense"]
        assert math.isfinite(diff)
        if r["shape"] == "tiny-llama":
            # 2 KV groups over 2 shards: ceil(1 / 2) = 1 group per shard keeps both. The row must say its
            # attention is dense (it once claimed 0.5 of the groups) and its logits are the dense step's
            assert r["attn_fraction"] == 1.0 and diff < 1e-5, (r["attn_fraction"], diff)
        else:  # tiny-opt: 4 heads, 1 of 2 kept per shard
            assert r["attn_fraction"] == (0.5 if r["variant"] in ("heads", "both") else 1.0)
            assert diff > 1e-2  # really sparse
    assert "B=4 L=32 heads: the head budget keeps every one of the 2 attention units" in res.stdout


@pytest.mark.parametrize("flags, words", [
    (["--tensor", "2", "--variants", "dense", "auto"], "do not run on a mesh"),
    (["--data", "2", "--variants", "dense-xla"], "do not run on a mesh"),
    (["--tensor", "2", "--breakdown"], "single-device only"),
    (["--tensor", "2", "--sizes"], "single-device only"),
    (["--data", "2", "--batches", "4", "3"], "do not split over --data 2"),
    (["--tensor", "0"], "--tensor"),
    (["--head-topk", "best"], "--head-topk"),
])
def test_bench_decode_mesh_flags_are_checked(capsys, flags, words):
    assert_refused(capsys, ["bench", "decode", "--tiny", *flags], words)
