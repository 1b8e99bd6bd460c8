"""Import structure (issue 12): no import cycles hidden behind function-local imports, and the layering
ARCHITECTURE.md describes (kernels import nothing of the model package).

A function-local import of a first-party module is allowed only where the imported module needs an optional
dependency (listed here with the reason); everything else is imported at module level, where a cycle would
fail at import time instead of at the first call."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("polar_jax", "pallas_kernels", "convert")
# module that imports lazily -> first-party module it imports lazily, and why
OPTIONAL = {
    ("polar_jax/eval/lm_eval_cli.py", "polar_jax.eval.lm_eval_adapter"): "needs lm_eval (extra 'eval')",
}


def _local_first_party_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                mods = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            out += [(node.lineno, m) for m in mods if m.startswith(".") or m.split(".")[0] in PACKAGES]
    return out


def test_no_function_local_first_party_imports():
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}:{line} imports {mod}" for line, mod in _local_first_party_imports(path)
                      if (rel, mod) not in OPTIONAL]
    assert not found, "function-local first-party imports (import at module level):\n" + "\n".join(found)


def test_the_allowed_lazy_imports_still_exist():
    for (rel, mod), why in OPTIONAL.items():
        assert any(m == mod for _, m in _local_first_party_imports(ROOT / rel)), f"{rel} -> {mod} ({why}) is gone"


def test_kernels_do_not_import_the_model_package():
    for path in sorted((ROOT / "pallas_kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.split(".")[0] in ("polar_jax", "convert") for n in names), path


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh interpreter state would hit a cycle; importing all of them in
    package order here at least fails on any module-level cycle or missing name."""
    skip = {"polar_jax.eval.lm_eval_adapter"}  # needs lm_eval; imported by its own tests
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if info.name not in skip:
                importlib.import_module(info.name)
