"""benchmarks/decode/step_variants.py (same-process A/B of decode-step code variants on the GPU) runs its
code path on CPU, every variant patches an attribute that exists, and patches are undone after the block."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "decode" / "step_variants.py"


def _module():
    spec = importlib.util.spec_from_file_location("step_variants", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_variant_patches_an_existing_attribute_and_is_undone():
    sv = _module()
    for name, changes in sv.variants().items():
        for obj, attr, _ in changes:
            assert hasattr(obj, attr), f"variant {name}: {obj.__name__}.{attr} does not exist (stale variant)"
    box = types.SimpleNamespace(a=1, b=2)
    with pytest.raises(RuntimeError):
        with sv.patched((box, "a", 10), (box, "b", 20)):
            assert (box.a, box.b) == (10, 20)
            raise RuntimeError("a failing variant")
    assert (box.a, box.b) == (1, 2)


def test_every_replacement_function_takes_the_parameters_of_the_one_it_replaces():
    """A tiling rule that gained a parameter (`rows`) leaves variants written before it failing on the GPU only,
    with an unexpected keyword, after the machine's start-up has been paid for."""
    import inspect

    sv = _module()
    for name, changes in sv.variants().items():
        for obj, attr, new in changes:
            old = getattr(obj, attr)
            if not (inspect.isfunction(old) and callable(new)):
                continue
            params = list(inspect.signature(new).parameters.values())
            if [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
                continue  # a pass-through wrapper
            assert [p.name for p in params] == list(inspect.signature(old).parameters), f"variant {name}: {attr}"


def test_tiny_run_times_every_variant(tmp_path):
    out = tmp_path / "v.json"
    codes = ["base", "old_qkv", "q_only", "no_fuse_routers", "head_topk_xla", "overlap"]  # tilings: no GEMV kernel on CPU
    cmd = [sys.executable, str(SCRIPT), "--points", "tiny-opt:1:32:dense,both", "--code", *codes, "--rank", "16",
           "--steps", "2", "--repeats", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["date"] and report["command"].startswith("python benchmarks/decode/step_variants.py")
    rows = {(r["selector"], r["code"]): r for r in report["rows"]}
    assert set(rows) == {(s, c) for s in ("dense", "both") for c in codes}
    for (sel, code), r in rows.items():
        assert len(r["times_ms"]) == 2 and r["step_ms"] > 0
        assert r["pallas_launches"] == {}  # on CPU every kernel is XLA's (the GPU run counts the Pallas ones)
        if code == "base":
            assert r["ratio_to_first"] == 1.0
        # on CPU no GEMV kernel runs, so every code variant computes the same logits (the routers' fused
        # product sums the same terms: equal selections)
        assert r["max_logit_diff_vs_first"] <= (1e-4 if code == "no_fuse_routers" else 0.0)


def test_a_combined_code_applies_the_changes_of_each_part():
    sv = _module()
    table = sv.code_table(["base", "first_gemv+down_direct"])
    assert table["first_gemv+down_direct"] == table["first_gemv"] + table["down_direct"]
    with pytest.raises(SystemExit, match="no_such"):
        sv.code_table(["first_gemv+no_such"])


def test_tiling_variants_change_only_their_batch_range():
    from pallas_kernels import selective_gemm_triton as sg
    from pallas_kernels import unit_gemv_triton as ug

    sv = _module()
    up = sv._mid_up(block_a=16)
    assert up(32, 4096, 9216).block_a == 16 and up(32, 4096, 9216, True).block_a == 16
    assert up(1, 4096, 2048) == sg.choose_up_config(1, 4096, 2048) and up(128, 4096, 9216) == sg.choose_up_config(128, 4096, 9216)
    down = sv._mid_down(block_d=64, num_warps=4, num_stages=4)
    d = down(32, 4096, 9216)
    assert (d.block_d, d.num_warps) == (64, 4) and d.split_j == sg.down_split(32, 4096, 9216, d.block_m, d.block_j, 64)
    assert down(8, 4096, 4352) == sg.choose_down_config(8, 4096, 4352)
    direct = sv._mid_down(block_d=32, split_j=1)  # a split given in the fields is kept, not recomputed
    assert direct(32, 4096, 9216).split_j == 1 and direct(8, 4096, 4352) == sg.choose_down_config(8, 4096, 4352)
    assert sv._multi(32, 6)(4096, 12288) == ug.choose_multi_config(4096, 12288).__class__(
        32, ug.choose_multi_config(4096, 12288).block_k, 1, 4, 6)


def test_the_issue10_gpu_run_names_variants_and_shapes_that_exist():
    """benchmarks/decode/issue10_gpu_run.sh is what the next device call runs: a stale variant or shape name
    would only fail there, after the machine's start-up has been paid for."""
    from polar_jax.bench.shapes import SHAPES

    script = REPO / "benchmarks" / "decode" / "issue10_gpu_run.sh"
    text = script.read_text().replace("\\\n", " ")  # one line per command: its continued lines joined
    codes = {c for line in text.splitlines() if "--code" in line
             for c in line.split("--code", 1)[1].split("--")[0].replace("\\", " ").split()}
    parts = {part for c in codes for part in c.split("+")}  # a+b: both changes together
    assert {"base", "no_add_norm", "head_topk_xla"} <= codes and parts <= set(_module().variants())
    points = {p.split(":")[0] for line in text.splitlines() if "--points" in line
              for p in line.split("--points", 1)[1].split("--")[0].replace("\\", " ").split()}
    shapes = {s for line in text.splitlines() if "--shapes" in line for s in line.split("--shapes", 1)[1].split("--")[0].split()}
    assert points and shapes and (points | shapes) <= set(SHAPES)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"OUT": "/nonexistent", "PATH": "/usr/bin:/bin"})
    assert usage.returncode == 2 and "usage" in usage.stderr
    unset = subprocess.run(["bash", str(script), "variants"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert unset.returncode != 0 and "set OUT" in unset.stderr


def test_diagnose_step_runs_its_sparse_steps_on_cpu(tmp_path):
    """benchmarks/decode/diagnose_step.py (the first diagnosis of the step; its selectors come from the
    benchmark's synthetic bundles): the tiny run times the dense step and the three sparse variants."""
    script = REPO / "benchmarks" / "decode" / "diagnose_step.py"
    cmd = [sys.executable, str(script), "--tiny", "--parts", "steps", "--batches", "1", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    steps = json.loads((tmp_path / "diag.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["tiny-opt dense", "tiny-opt heads.3+mlp r1024 f32", "tiny-opt mlp r1024 f32",
                                         "tiny-opt heads.3"]
    assert all(s["step_ms"] > 0 and len(s["step_ms_all"]) == 2 for s in steps)
