"""Loaders and scoring for the local lm-eval tasks (referenced from the YAML files with `!function`).

The data are JSONL files beside this file (written by build_tasks.py), read without any download.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> dict[str, datasets.Dataset]:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def next_sentence(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _jsonl("next_sentence.jsonl")


def wikitext_paragraphs(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _jsonl("wikitext_paragraphs.jsonl")


def perplexity_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-document log-likelihood with the word and byte counts the perplexity aggregations divide by."""
    (loglikelihood,) = results
    text = doc["text"]
    words = len(re.split(r"\s+", text.strip()))
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
