"""Named mutations: hand-written bugs that a test must catch, each applied to a copy of the repository.

Every entry is a bug someone could plausibly write (most were found surviving the suite in issue 13).
`python tests/mutation/named.py` copies the checkout to a temporary folder once per mutation, applies the
one textual edit, runs the listed tests there and reports which test failed; a mutation no test catches
is a survivor and the script exits 1. `--only ID ...` runs a subset; `--json FILE` writes the evidence.

This complements the tool-generated mutants of `tests/mutation/run.py` (cosmic-ray): those are many and
mechanical, these are few and chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    path: str  # file to edit, relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files expected to catch it
    why: str


EOS_TESTS = ("tests/test_generate.py::test_eos_stops_each_row_and_pads_it",
             "tests/test_generate.py::test_several_eos_ids_stop_the_loop_once_all_rows_are_done")

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("temperature-multiplies", "polar_jax/decode.py",
             "logits.astype(jnp.float32) / temperature", "logits.astype(jnp.float32) * temperature",
             ("tests/test_sampling.py",), "sample_tokens multiplies logits by the temperature"),
    Mutation("top-p-drops-crossing-token", "polar_jax/decode.py",
             "keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p", "keep = jnp.cumsum(probs, axis=-1) < top_p",
             ("tests/test_sampling.py",), "the token whose mass crosses top_p is left out of the nucleus"),
    Mutation("generate-swaps-temperature-top-p", "polar_jax/decode.py",
             "jnp.float32(req.temperature), jnp.float32(req.top_p), jnp.asarray(req.eos)",
             "jnp.float32(req.top_p), jnp.float32(req.temperature), jnp.asarray(req.eos)",
             ("tests/test_sampling.py",), "generate passes top_p where the temperature goes"),
    Mutation("stop-when-any-row-done", "polar_jax/decode.py",
             "return jnp.all(done) if parallel is None else", "return jnp.any(done) if parallel is None else",
             EOS_TESTS, "the on-device loop stops when the first row emits EOS"),
    Mutation("no-early-stop", "polar_jax/decode.py",
             "return (i < max_new_tokens) & ~finished", "return i < max_new_tokens",
             EOS_TESTS, "the loop keeps decoding after every row is done"),
    Mutation("no-pad-after-eos", "polar_jax/decode.py",
             "new = jnp.where(done, pad_id, new)", "new = new",
             EOS_TESTS, "a finished row keeps emitting tokens"),
    Mutation("stream-stops-on-any-row", "polar_jax/decode.py",
             "if done.all():", "if done.any():",
             EOS_TESTS, "generate_stream stops when the first row is done"),
    Mutation("finished-row-stays-live", "polar_jax/decode.py",
             "model.decode(tok, cache.with_live(~done),", "model.decode(tok, cache,",
             EOS_TESTS, "a finished row keeps decoding in generate (reads KV, counts in the MLP union)"),
    Mutation("stream-finished-row-stays-live", "polar_jax/decode.py",
             "decode_step(graphdef, state, cache.with_live(~done),", "decode_step(graphdef, state, cache,",
             EOS_TESTS, "a finished row keeps decoding in generate_stream"),
    Mutation("linear-rope-multiplies", "polar_jax/models/layers.py",
             "return inv / rope.factor", "return inv * rope.factor",
             ("tests/test_parity.py",), "linear RoPE scaling multiplies the frequencies by the factor"),
    Mutation("union-without-relu", "polar_jax/selection.py",
             "r = jax.nn.relu(logits)", "r = logits",
             ("tests/test_routers_core.py",), "batch union sums raw router logits (negative rows cancel)"),
    Mutation("sparse-attention-batch-max-length", "polar_jax/models/base.py",
             "select_decode(q, kv.k, kv.v, step.lengths, sel.groups,",
             "select_decode(q, kv.k, kv.v, jnp.broadcast_to(jnp.max(step.lengths), step.lengths.shape), sel.groups,",
             ("tests/test_sparse_decode.py",), "sparse attention reads every row up to the longest row's length"),
    Mutation("bundle-ignores-weights", "polar_jax/checkpoint.py",
             "    return all(\n        np.allclose(", "    return True or all(\n        np.allclose(",
             ("tests/test_routers_bundle.py",), "a bundle is accepted for any model of the same architecture"),
    Mutation("attn-set-farthest", "polar_jax/routers/config.py",
             "    return min(range(len(train_densities)),", "    return max(range(len(train_densities)),",
             ("tests/test_router_sets.py",), "a multi-density bundle serves a density with the set trained farthest from it"),
    Mutation("attn-set-always-first", "polar_jax/routers/sparsify.py",
             "    bundle = bundle.for_density(attn_density)  #", "    bundle = bundle.attention_set(0)  #",
             ("tests/test_router_sets.py",), "the sparsifier and selector use a multi-density bundle's first set at every density"),
)


def copy_checkout(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files (what a commit would hold), plus nothing else."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    shared = REPO.parent / "shared"  # tests find the shared models beside the checkout
    if not (dst.parent / "shared").exists() and shared.exists():
        (dst.parent / "shared").symlink_to(shared.resolve())


def apply(root: Path, m: Mutation) -> None:
    p = root / m.path
    text = p.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"{m.id}: expected the original text once in {m.path}, found it {n} times")
    p.write_text(text.replace(m.old, m.new))


def run_one(m: Mutation, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="named-mutation-") as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        copy_checkout(root)
        apply(root, m)
        env = dict(os.environ, PYTHONPATH=str(root), POLAR_SHARED=str(REPO.parent / "shared"))
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider",
                                *m.tests], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            out, code = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired:
            out, code = "timeout", -1
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    return {"id": m.id, "file": m.path, "why": m.why, "killed": code != 0, "exit": code,
            "killed_by": failed, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutation ids to run (default: all)")
    ap.add_argument("--json", default=None, help="write the evidence here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    results = []
    for m in chosen:
        r = run_one(m, args.timeout)
        results.append(r)
        verdict = "killed by " + ", ".join(r["killed_by"] or ["(error exit)"]) if r["killed"] else "SURVIVED"
        print(f"{m.id}: {verdict} ({r['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["killed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
