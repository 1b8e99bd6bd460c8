"""The README's end-to-end sparse-decoding table is generated from its results file, never typed."""

import json

from conftest import REPO
from polar_jax.bench.report import README_END, README_START, readme_block

SOURCE = "benchmarks/results/decode_sparse_2026-11-28.md"


def test_readme_decode_table_matches_its_results_file():
    readme = (REPO / "README.md").read_text()
    assert README_START in readme and README_END in readme
    got = readme[readme.index(README_START): readme.index(README_END) + len(README_END)]
    merged = json.loads((REPO / SOURCE.replace(".md", ".json")).read_text())
    assert got == readme_block(merged, SOURCE), "regenerate with polar_jax.bench.report.readme_block"
