"""Which GPU class this host is, what `impl="auto"` runs there, and the crossover table per class, with
the compute capability faked (CPU CI has no GPU): a T4 (7.5) decodes through XLA, an A100 / L4 get their
own tilings and, until measured, the conservative crossover."""
from __future__ import annotations

import importlib
import importlib.util
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import polar_jax
from pallas_kernels import backends, selective_attention, selective_gemm
from pallas_kernels.crossover import PATH as CROSSOVER_PATH
from pallas_kernels.crossover import density_threshold, load_crossover, thresholds_for
from pallas_kernels.devices import (GENERIC, REFERENCE, SM80, SM89, SM90, class_for_capability,
                                    class_of_device_kind, current_device_class)
from pallas_kernels.selective_gemm_triton import choose_up_config
from polar_jax.cache import KVCache
from polar_jax.decode import prefill, split_model
from polar_jax.graph import merge as merge_graph
from polar_jax.routers.sparsify import router_selector

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)
REPO = Path(__file__).resolve().parents[1]
union_select = importlib.import_module("pallas_kernels.union_select")  # the package exports a function of that name
row_norm = importlib.import_module("pallas_kernels.row_norm")
kv_append = importlib.import_module("pallas_kernels.kv_append")


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu((major, minor)) makes this host report a CUDA GPU of that compute capability."""
    def set_cc(cc):
        monkeypatch.setattr(backends, "cuda_capability", lambda: cc)
    return set_cc


class TritonCalled(Exception):
    pass


@pytest.fixture
def no_triton(monkeypatch):
    """Every op's Triton implementation raises TritonCalled (the dispatch tables are looked up per call)."""
    def boom(*a, **k):
        raise TritonCalled
    for table in (selective_gemm._UP, selective_gemm._GATED, selective_gemm._DOWN, selective_attention._IMPLS,
                  union_select._IMPLS, row_norm._IMPLS, kv_append._IMPLS):
        monkeypatch.setitem(table, "triton", boom)


@pytest.mark.parametrize("cc,want", [(None, "xla"), ((7, 5), "xla"), ((7, 0), "xla"), ((8, 0), "triton"),
                                     ((8, 6), "triton"), ((8, 9), "triton"), ((9, 0), "triton")])
def test_auto_backend_by_compute_capability(fake_gpu, cc, want):
    fake_gpu(cc)
    assert pk.resolve_impl("auto") == want
    assert backends.use_interpret() == (want == "xla")


@pytest.mark.parametrize("cc,cls", [(None, REFERENCE), ((7, 5), REFERENCE), ((8, 0), SM80), ((8, 9), SM89),
                                    ((9, 0), SM90), ((8, 6), GENERIC), ((12, 0), GENERIC)])
def test_device_class_by_compute_capability(fake_gpu, cc, cls):
    fake_gpu(cc)
    got = current_device_class()
    assert class_for_capability(cc) is cls
    assert got.name == cls.name and got.smem_per_block == cls.smem_per_block
    # the tilings follow the class without being told
    assert choose_up_config(256, 4096, 8192) == choose_up_config(256, 4096, 8192, device=got)


def test_t4_decodes_sparse_through_xla(fake_gpu, no_triton):
    """On a T4 (7.5) a sparse decode step with impl="auto" everywhere never reaches a Triton kernel; the
    same step on a faked A100 does (so the check can fail)."""
    model, tok = polar_jax.load("default")
    selector = router_selector(polar_jax.load_sparsity("default", model), attn_density=0.5, mlp_recall=0.99,
                               select_impl="auto")
    prompts = [tok.encode("The history of the city"), tok.encode("KING RICHARD : I")]
    t = min(len(p) for p in prompts)
    tokens = jnp.asarray([p[:t] for p in prompts], jnp.int32)
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, 2, 32, model.dtype)
    _, cache = prefill(graphdef, state, tokens[:, :-1], jnp.full((2,), t - 1, jnp.int32), cache)

    def step():  # a fresh trace per call: the backend is resolved while tracing
        fn = jax.jit(lambda s, t, c: merge_graph(graphdef, s).decode(t, c, selector))
        return fn(state, tokens[:, -1], cache)[0]

    fake_gpu((7, 5))
    assert np.all(np.isfinite(np.asarray(step())))
    fake_gpu((8, 0))
    with pytest.raises(TritonCalled):
        step()


def test_crossover_per_class(fake_gpu):
    """The H100 uses its measured table; an A100 / L4 / unknown GPU (nothing measured) the conservative
    one, which goes dense at lower densities."""
    data = load_crossover()
    measured = data["classes"]["sm90"]["thresholds"]
    fake_gpu((9, 0))
    assert density_threshold(64) == measured[64]
    for cc in ((8, 0), (8, 9), (8, 6)):
        fake_gpu(cc)
        table = thresholds_for()
        assert set(table) == set(measured)
        assert all(table[m] <= measured[m] for m in table) and any(table[m] < measured[m] for m in table)
        N = 1000
        n = int(0.5 * N)  # half the neurons at M=64: selective on the H100, dense here
        assert pk.mlp_prefers_dense(64, n, N) is True
        fake_gpu((9, 0))
        assert pk.mlp_prefers_dense(64, n, N) is False


def test_unmeasured_class_takes_the_smallest_conservative_threshold():
    data = {"classes": {
        "sm90": {"thresholds": {1: 0.75, 256: 0.25}, "conservative": {1: 0.5, 256: 0.25}},
        "sm80": {"thresholds": {1: 0.6, 256: 0.5}, "conservative": {1: 0.25, 64: 0.5, 256: 0.5}}}}
    assert thresholds_for(SM80, data) == {1: 0.6, 256: 0.5}
    assert thresholds_for(SM89, data) == {1: 0.25, 64: 0.25, 256: 0.25}  # 64 from sm90's table: 0.25


def _report_module():
    spec = importlib.util.spec_from_file_location("kernels_report", REPO / "benchmarks" / "kernels" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_crossover_file_is_computed_from_the_committed_sweep(tmp_path):
    """crossover.json's tables are what report.py derives from the sweep files it names (nothing typed by
    hand), and report.py writes a run into its device class's entry, keeping the others."""
    report = _report_module()
    data = json.loads(CROSSOVER_PATH.read_text())
    entry = data["classes"]["sm90"]
    assert class_of_device_kind(entry["device"]) is SM90
    merged = report.merge([str(REPO / p) for p in entry["sources"]])
    assert merged["meta"]["device"] == entry["device"]
    as_json = lambda t: {str(m): v for m, v in t.items()}  # noqa: E731
    assert as_json(report.crossover(merged["gemm"])) == entry["thresholds"]
    assert as_json(report.crossover(merged["gemm"], 2.0)) == entry["conservative"]
    out = tmp_path / "crossover.json"
    out.write_text(json.dumps({"classes": {"sm80": {"thresholds": {"1": 0.5}, "conservative": {"1": 0.2}}}}))
    report.write_crossover(str(out), merged, "2026-01-01", ["x.json"], report.crossover(merged["gemm"]))
    written = json.loads(out.read_text())
    assert set(written["classes"]) == {"sm80", "sm90"}
    assert written["classes"]["sm90"]["thresholds"] == entry["thresholds"]
    assert written["classes"]["sm80"]["thresholds"] == {"1": 0.5}


def test_device_kinds_map_to_classes():
    assert class_of_device_kind("NVIDIA H100 80GB HBM3") is SM90
    assert class_of_device_kind("NVIDIA H200") is SM90
    assert class_of_device_kind("NVIDIA A100-SXM4-40GB") is SM80
    assert class_of_device_kind("NVIDIA L4") is SM89
    assert class_of_device_kind("Tesla T4") is None
    assert class_of_device_kind("NVIDIA L40S") is None  # another sm89 part: not the L4's SM count
