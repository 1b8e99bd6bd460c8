"""How much the KV-group oracle depends on how a group's importance is scored (SmolLM2-135M, same tokens and
windows as smollm2_accuracy.py). polar-jax's oracle (and its router labels) score a group by the L2 norm of
its query heads' concatenated outputs; the alternatives here score it by the sum of the heads' norms (L1 over
heads) or by the largest head norm. Results: benchmarks/results/accuracy_smollm2_oracle_variants.json.

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_oracle_variants.py
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from smollm2 import smollm2_gguf  # noqa: E402

import polar_jax  # noqa: E402
from polar_jax.eval.perplexity import perplexity  # noqa: E402
from polar_jax.models.base import head_output_norms  # noqa: E402
from polar_jax.selection import topk_mask  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "accuracy_smollm2_oracle_variants.json"
SCORES = {"l2": lambda g: jnp.sqrt(jnp.sum(jnp.square(g), -1)), "sum": lambda g: jnp.sum(g, -1),
          "max": lambda g: jnp.max(g, -1)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["k", "groups", "score"])
@dataclasses.dataclass(frozen=True)
class GroupOracle:
    k: int
    groups: int
    score: str

    def heads_mask(self, layer, router_input, head_out):
        if layer == 0:
            return None
        norms = head_output_norms(head_out)
        grouped = norms.reshape(*norms.shape[:-1], self.groups, norms.shape[-1] // self.groups)
        return topk_mask(SCORES[self.score](grouped), self.k)

    def neurons_mask(self, layer, router_input, act):
        return None


def main() -> None:
    model, tok = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
    shared = Path(os.environ.get("POLAR_SHARED", REPO.parent / "shared"))
    text = (shared / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    ids = np.asarray(tok.encode(text), np.int32)
    res = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    done = {(r["score"], r["k"]) for r in res["runs"]}
    for k, score in ((1, "sum"), (1, "max"), (2, "sum"), (1, "l2"), (2, "max"), (2, "l2")):
        if (score, k) in done:
            continue
        if True:
            r = perplexity(model, ids, 2048, 1, max_tokens=16384, sparsifier=GroupOracle(k, 3, score), progress=False)
            res["runs"].append({"score": score, "k": k, "units": 3, "ppl": r.ppl, "tokens": r.tokens})
            res["env"] = {"device": f"{jax.default_backend()} (2 shared cores)", "jax": jax.__version__,
                          "date": datetime.date.today().isoformat(),
                          "command": "PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_oracle_variants.py"}
            OUT.write_text(json.dumps(res, indent=1) + "\n")
            print(f"group oracle k={k}/3 score={score}: ppl {r.ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
