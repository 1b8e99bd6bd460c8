"""Shared fixtures. Real checkpoints and text live in ../shared beside the checkout (CI clones the
repository with shared/ next to it); POLAR_SHARED overrides. A missing fixture is a failure, not a skip."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLAR_SHARED", REPO.parent / "shared"))
FIXTURES = REPO / "tests" / "fixtures"
GOLDEN = REPO / "tests" / "golden"

REAL_MODELS = ("tiny-llama", "tiny-opt", "polar-tiny-opt")
RANDOM_MODELS = ("llama2-mha", "llama31-gqa", "mistral-swa", "qwen2-bias", "llama-linear-rope")

warnings.filterwarnings("ignore", category=DeprecationWarning)

# One persistent XLA compilation cache for a test run, shared by the xdist workers and by every process a test
# starts (the CLI, notebooks and multi-process tests inherit the variable): they compile the same model graphs
# many times over (the default model's generate: 5.3 s cold, 2.2 s from the cache on the 2-core CI machine).
# A hit needs the same HLO and compile options, so it is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
# Cache every program, not only those that took >= 1 s to compile (jax's default): the suite compiles thousands
# of small programs, many again in another worker or a CLI subprocess (cold cache, 2 cores: test_generate +
# test_cli_routers 137 -> 120 s, test_sparse_selection + test_lm_eval_adapter 186 -> 179 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests run tiny models, so most of XLA:CPU's time goes to compiling, not running: LLVM's -O0 code
# generation compiles faster (cold suite on 2 cores: 24.4 -> 21.0 min). It changes no result beyond
# rounding (no fast-math either way; the suite's exact token checks hold). Compute-bound tests run slower
# (the perplexity goldens 29 -> 45 s); tests/test_notebooks.py gives the router-training notebook -O2.
O0_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {O0_FLAG}".strip()


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing test fixture {path} (see tests/conftest.py)")
    return path


def model_dir(name: str) -> Path:
    if name in REAL_MODELS:
        return require(SHARED / "models" / name)
    return require(FIXTURES / "hf" / name)


@pytest.fixture(scope="session")
def shared() -> Path:
    return require(SHARED)


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return require(SHARED / "data" / "wikitext-2" / "test.txt")


_MODEL_CACHE: dict = {}


def load_cached(name: str, dtype: str = "float32"):
    """Loads an HF model once per session (fp32, as the golden files were made)."""
    import polar_jax

    key = (name, dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = polar_jax.load_hf(model_dir(name), dtype=dtype)
    return _MODEL_CACHE[key]


def bundle_for_rows(cfg, rows: int, rng):
    """(bundle, inputs): random routers of rank 16 whose MLP tables are calibrated for `rows` rows on random router
    inputs [L, rows, d] drawn from `rng` (the decode benchmark's way: the default bundle runs a dense MLP at 17-32
    rows), and those inputs."""
    import jax.numpy as jnp
    import numpy as np

    from polar_jax.bench.synthetic import calibrate_union, random_bundle

    inputs = rng.standard_normal((cfg.num_layers, rows, cfg.hidden_size)).astype(np.float32)
    return calibrate_union(random_bundle(cfg, 16, jnp.float32), inputs, rows, 0.3), inputs


# ---- the property-based tests' case counts (tests/test_fuzz_cli.py), in the terminal summary ----------
_FUZZ_CASES: list[str] = []


def pytest_runtest_logreport(report) -> None:
    # runs in the controller for the reports of xdist workers too (user_properties travel with them)
    if report.when == "call":
        _FUZZ_CASES.extend(str(v) for k, v in report.user_properties if k == "fuzz_cases")


def pytest_terminal_summary(terminalreporter) -> None:
    if _FUZZ_CASES:
        terminalreporter.section("property-based tests (cases run)")
        for line in _FUZZ_CASES:
            terminalreporter.write_line(line)
