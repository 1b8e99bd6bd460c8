"""Local lm-eval tasks shipped with polar-jax (YAML + JSONL in this folder; data built by build_tasks.py).

Pass `TASKS_DIR` as lm-eval's include path; `polar-jax eval lm-eval` does it for you."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
