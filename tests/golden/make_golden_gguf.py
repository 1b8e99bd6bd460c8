"""Hugging Face reference outputs for GGUF checkpoints (the sibling of make_golden.py; same protocol).

HF transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantized to float32,
eager attention) and its tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`). Run from the
repository root in an environment with torch, transformers, gguf and accelerate (never the project's):

    python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 transformers==5.24.0 accelerate gguf==0.19.0
    .venv/bin/python tests/golden/make_golden_gguf.py              # goldens, a few minutes on CPU
    .venv/bin/python tests/golden/make_golden_gguf.py --ppl-full   # whole WikiText-2 test, ~1 h, resumable

Writes (overwriting):
- tests/golden/smollm2-gguf.npz: prompts from WikiText-2 test, prefill logits, 16 cached decode steps,
  32 greedy tokens (keys as documented in tests/golden/README.md);
- tests/golden/gguf_tokenizer_smollm2.json: HF's token ids and decoded text for a set of texts, and the
  structure of HF's tokenizer (everything but the vocabulary and merges);
- tests/golden/ppl_smollm2-gguf.json: perplexity of the first PPL_PREFIX_TOKENS test tokens (one window of
  PREFIX_SEQ_LEN), the CI check of the perplexity protocol (the full-file run below uses windows of 2048);
- tests/fixtures/gguf/tiny-{qwen2,llama3}.gguf (written by tests/gguf_factory.py, seeded) and
  tests/golden/tiny-{qwen2,llama3}-gguf.json: HF's logits of one prompt, 8 greedy tokens and token ids
  (Qwen2 architecture with q/k/v biases and the qwen2 pre-tokenizer; LLaMA GQA, untied head, mixed
  quantization types including K-quants, the llama-bpe pre-tokenizer and add_bos_token);
- with --ppl-full: benchmarks/results/ppl_smollm2_hf_full.json, the whole test file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "golden"))

import make_golden as mg  # noqa: E402  (shared protocol helpers: prompts, greedy loop, checks)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_factory import write_gguf  # noqa: E402
from smollm2 import sha256_file, smollm2_gguf  # noqa: E402

NAME = "smollm2-gguf"
PPL_SEQ_LEN = 2048  # the whole-file run (--ppl-full), as the accuracy report scores SmolLM2
# The CI golden: one window of 1024 tokens checks the same protocol at a third of the CPU test time of a
# 2048-token window (77 s in the suite until 2026-12-07)
PREFIX_SEQ_LEN = 1024
PPL_PREFIX_TOKENS = 1024
TOKENIZER_TEXTS = [
    "The history of the city",
    " = Valkyria Chronicles III = \n",
    "Hello world, the  cat 12345 sat.\n\n  Indented\tTabbed",
    "It's 3.14159 — naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading and trailing spaces   ",
    "<|endoftext|>ABC<repo_name>don't I'll we've",
]


def load_hf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def write_decode_golden(model, tok, path: Path) -> dict:
    prompts, texts = mg.wikitext_prompts(tok.backend_tokenizer)
    arrays, meta_prompts = {}, []
    for i, p in enumerate(prompts):
        g = mg.greedy_golden(model, p)
        if g["min_top2_gap"] < mg.MIN_GAP:
            raise RuntimeError(f"prompt_{i}: near-tie (gap {g['min_top2_gap']:.2e})")
        diff = mg.check_against_full_forward(model, p, g)
        if diff > 1e-4:
            raise RuntimeError(f"prompt_{i}: cached decode != full forward (max diff {diff:.2e})")
        arrays.update({f"prompt_{i}": p.astype(np.int32), f"prefill_logits_{i}": g["prefill_logits"],
                       f"greedy_{i}": g["greedy"], f"decode_logits_{i}": g["decode_logits"],
                       f"min_top2_gap_{i}": np.asarray(g["min_top2_gap"], np.float64)})
        meta_prompts.append({"len": int(len(p)), "text": texts[i], "min_top2_gap": g["min_top2_gap"],
                             "max_abs_diff_cached_vs_full_forward": diff})
        print(f"  prompt_{i}: greedy {g['greedy'][:8].tolist()}... gap {g['min_top2_gap']:.3f}, cache-vs-full {diff:.1e}")
    meta = {"model": NAME, "gguf": path.name, "gguf_sha256": sha256_file(path), "architecture": model.config.architectures,
            "vocab_size": int(model.config.vocab_size), "n_greedy": mg.N_GREEDY, "n_decode_logits": mg.N_DECODE_LOGITS,
            "attn_implementation": "eager", "dtype": "float32", "prompts": meta_prompts,
            "prompt_source": str(mg.WIKITEXT), "hf_config": model.config.to_dict(), "date": mg._date(),
            **mg._versions()}
    rotary = model.model.rotary_emb
    arrays["rope_inv_freq"] = rotary.inv_freq.detach().float().numpy()
    arrays["meta_json"] = np.asarray(json.dumps(meta, sort_keys=True, default=str))
    np.savez_compressed(mg.GOLDEN_DIR / f"{NAME}.npz", **arrays)
    mg.verify(NAME, model.config.vocab_size)
    return meta


def write_tokenizer_golden(tok) -> None:
    structure = json.loads(tok.backend_tokenizer.to_str())
    vocab_size = len(structure["model"].pop("vocab"))
    n_merges = len(structure["model"].pop("merges"))
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "ids_default_call": tok(text)["input_ids"],
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    text = mg.WIKITEXT.read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    out = {"model": NAME, "cases": cases, "structure": structure, "vocab_entries": vocab_size, "merges": n_merges,
           "wikitext_test_tokens": len(ids),
           "wikitext_test_ids_sha256": hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest(),
           "special": {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "unk": tok.unk_token},
           "date": mg._date(), **mg._versions()}
    (mg.GOLDEN_DIR / "gguf_tokenizer_smollm2.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"  tokenizer: {len(cases)} texts, WikiText-2 test = {len(ids)} tokens")


@torch.no_grad()
def window_perplexity(model, ids: np.ndarray, seq_len: int, log_every: int = 0, resume: Path | None = None) -> dict:
    """Non-overlapping windows (stride = seq_len), each scored on its own, no BOS; float64 NLL sum. With
    `resume`, each window's NLL sum is appended to that JSON-lines file and windows already there are skipped."""
    n = len(ids) // seq_len
    windows = torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)
    done = {}
    if resume is not None and resume.is_file():
        done = {r["window"]: r["nll_sum"] for r in map(json.loads, resume.read_text().splitlines())}
    t0 = time.time()
    for w in range(n):
        if w not in done:
            x = windows[w : w + 1]
            logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float()[:, :-1], dim=-1)
            done[w] = float(-logp.gather(-1, x[:, 1:, None]).double().sum())
            if resume is not None:
                with open(resume, "a") as f:
                    f.write(json.dumps({"window": w, "nll_sum": done[w]}) + "\n")
        if log_every and (w + 1) % log_every == 0:
            running = sum(done[i] for i in range(w + 1)) / ((w + 1) * (seq_len - 1))
            print(f"  window {w + 1}/{n}: running ppl {math.exp(running):.4f} ({time.time() - t0:.0f}s)", flush=True)
    total, count = sum(done[i] for i in range(n)), n * (seq_len - 1)
    return {"ppl": math.exp(total / count), "mean_nll": total / count, "n_predictions": count, "n_windows": n,
            "seq_len": seq_len, "stride": seq_len, "n_tokens": n * seq_len}


def write_ppl(model, tok, n_tokens: int | None, out: Path, threads: int, resume: Path | None = None,
              full: bool = False, seq_len: int = PPL_SEQ_LEN) -> None:
    torch.set_num_threads(threads)
    text = mg.WIKITEXT.read_text(encoding="utf-8")
    all_ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
    ids = all_ids if n_tokens is None else all_ids[:n_tokens]
    t0 = time.time()
    res = window_perplexity(model, ids, seq_len, log_every=8 if full else 0, resume=resume)
    res.update({
        "model": NAME, "text": "wikitext-2/test.txt (whole file, UTF-8)", "n_tokens_in_text": int(len(all_ids)),
        "token_ids_sha256": hashlib.sha256(ids[: res["n_tokens"]].astype("<i4").tobytes()).hexdigest(),
        "protocol": "ids = HF GGUF tokenizer .encode(text, add_special_tokens=False); non-overlapping windows of "
                    "seq_len (stride seq_len), each scored independently, no BOS; ppl = exp(mean NLL of tokens "
                    "1..seq_len-1 of each window); float32 model, float64 sum",
        "device": "cpu", "torch_threads": threads, "seconds": round(time.time() - t0), "date": mg._date(),
        "command": "python " + " ".join(["tests/golden/make_golden_gguf.py", *sys.argv[1:]]),
        **mg._versions(),
    })
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"  ppl {res['ppl']:.4f} over {res['n_tokens']} tokens -> {out}")


TINY = {
    "tiny-qwen2": dict(arch="qwen2", d=64, heads=4, kv=2, ffn=128, default_type=Q.Q8_0, pre="qwen2", seed=11),
    "tiny-llama3": dict(arch="llama", d=256, heads=4, kv=2, ffn=256, tied=False, pre="llama-bpe", add_bos=True,
                        seed=12, rope_theta=500000.0,
                        types={"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "attn_q.weight": Q.Q4_K,
                               "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q5_0, "attn_output.weight": Q.Q5_1,
                               "ffn_gate.weight": Q.Q4_0, "ffn_up.weight": Q.Q5_K, "ffn_down.weight": Q.BF16}),
}


@torch.no_grad()
def write_tiny_fixtures() -> None:
    folder = REPO / "tests" / "fixtures" / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    for name, kw in TINY.items():
        path = folder / f"{name}.gguf"
        kw = dict(kw)
        write_gguf(path, kw.pop("arch"), **kw)
        model, tok = load_hf(path)
        prompt = np.random.RandomState(0).randint(0, 256, size=12)
        ids = torch.from_numpy(prompt.astype(np.int64))[None]
        logits = model(input_ids=ids).logits[0].float().numpy()
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
        texts = [t for t in TOKENIZER_TEXTS] + ["<|fim_middle|>the cat<think> sat 1234 in 12 rooms"]
        out = {"model": name, "gguf_sha256": sha256_file(path), "prompt": prompt.tolist(), "prefill_logits": logits.tolist(),
               "greedy": greedy, "hf_config": model.config.to_dict(),
               "tokens": [{"text": t, "ids": tok.encode(t, add_special_tokens=False), "ids_default_call": tok(t)["input_ids"],
                           "decoded_skip_special": tok.decode(tok.encode(t, add_special_tokens=False),
                                                              skip_special_tokens=True)} for t in texts],
               "date": mg._date(), **mg._versions()}
        (mg.GOLDEN_DIR / f"{name}-gguf.json").write_text(json.dumps(out, default=str) + "\n")
        print(f"  {name}: {path.stat().st_size / 1024:.0f} KiB, greedy {greedy}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ppl-full", action="store_true", help="only the whole-file WikiText-2 test perplexity")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the perplexity runs")
    p.add_argument("--log", default="/tmp/smollm2_hf_ppl_windows.jsonl",
                   help="--ppl-full: per-window NLL log; an interrupted run resumes from it")
    p.add_argument("--max-windows", type=int, default=None, help="--ppl-full: only the first N windows")
    p.add_argument("--ppl-prefix", action="store_true", help="only the prefix perplexity golden")
    args = p.parse_args()
    path = smollm2_gguf()
    model, tok = load_hf(path)
    if args.ppl_full:
        n = None if args.max_windows is None else args.max_windows * PPL_SEQ_LEN
        write_ppl(model, tok, n, REPO / "benchmarks" / "results" / "ppl_smollm2_hf_full.json", args.threads,
                  Path(args.log), full=True)
        return 0
    mg._deterministic_torch()
    if args.ppl_prefix:
        write_ppl(model, tok, PPL_PREFIX_TOKENS, mg.GOLDEN_DIR / f"ppl_{NAME}.json", args.threads,
                  seq_len=PREFIX_SEQ_LEN)
        return 0
    print(f"{NAME}: decode goldens")
    write_decode_golden(model, tok, path)
    write_tokenizer_golden(tok)
    print("tiny GGUF fixtures")
    write_tiny_fixtures()
    print("prefix perplexity")
    write_ppl(model, tok, PPL_PREFIX_TOKENS, mg.GOLDEN_DIR / f"ppl_{NAME}.json", args.threads, seq_len=PREFIX_SEQ_LEN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
