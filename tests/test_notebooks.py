"""Notebooks run top to bottom on CPU with the embedded model (their cells assert what they show)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import O0_FLAG

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


# Notebooks whose time is computing, not compiling: their kernel gets XLA's default code generation back
# (conftest sets -O0 for the suite). 02 trains routers and evaluates perplexity: 122 s at -O0, 84 s at -O2.
COMPUTE_BOUND = ("02_routers.ipynb",)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    if path.name in COMPUTE_BOUND:
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(O0_FLAG, "").strip())
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
