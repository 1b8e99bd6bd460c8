"""Make the Hugging Face reference ("golden") outputs that the JAX tests compare against.

This script is the ONLY place where torch is used.  Tests never import it: they read the
files it writes (tests/golden/*.npz, tests/golden/ppl_*.json, tests/fixtures/hf/<name>/).

How to run (from the repository root), in a separate environment so that the project's own
venv never gets torch:

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy tokenizers
    #   (or: pip install .[reference] -- it pins torch==2.13.0, the CPU wheel; an unpinned
    #    torch would pull the CUDA build, gigabytes that are not needed here)
    /work/refvenv/bin/python tests/golden/make_golden.py

It runs on CPU in a few minutes, is seeded (torch.manual_seed per model, numpy RandomState
per prompt) and overwrites every output.  The only field that changes between runs is the
"date" in the metadata (set GOLDEN_DATE=YYYY-MM-DD to pin it).  Protocol, file contents and
versions are documented in tests/golden/README.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden"
FIXTURE_DIR = REPO / "tests" / "fixtures" / "hf"
MODELS_DIR = Path(os.environ.get("POLAR_SHARED_MODELS", "/work/shared/models"))
WIKITEXT = Path(os.environ.get("POLAR_WIKITEXT", "/work/shared/data/wikitext-2/test.txt"))

PROMPT_LENS = (13, 6)  # prompt_0, prompt_1
N_GREEDY = 32  # greedy tokens stored
N_DECODE_LOGITS = 16  # decode-step logits stored (after feeding token_0 .. token_15)
MIN_GAP = 1e-3  # a top-2 gap below this would make the greedy path flaky across float orders

PPL_SEQ_LEN = 256
# 32 windows: enough to compare with HF to 0.5 %, and a quarter of the 32768 tokens the goldens had until
# 2026-12-07, whose three tests took 75 s of the CPU suite
PPL_N_TOKENS = 8192
PPL_BATCH = 16  # windows per forward; windows are independent, batching does not change them

REAL_MODELS = ("tiny-llama", "tiny-opt", "polar-tiny-opt")
RANDOM_MODELS = ("llama2-mha", "llama31-gqa", "mistral-swa", "qwen2-bias", "llama-linear-rope")

# Random-init scales.  Weight std 0.2 (instead of HF's 0.02) spreads the logits so greedy
# argmax is never a near-tie; norm weights and biases are randomized too so that a JAX port
# that ignores (or mis-loads) them is caught.
WEIGHT_STD = 0.2
NORM_STD = 0.1
BIAS_STD = 0.1


def _random_configs() -> dict:
    """name -> (seed, config class kwargs, model class, save kwargs)."""
    common = dict(
        vocab_size=512,
        num_hidden_layers=2,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=WEIGHT_STD,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        use_cache=True,
    )
    return {
        # Plain LLaMA-2 style MHA, untied head; saved sharded to exercise the index.json loader.
        "llama2-mha": (
            1001,
            LlamaConfig(
                **common,
                hidden_size=64,
                intermediate_size=176,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False,
                attention_bias=False,
                mlp_bias=False,
            ),
            LlamaForCausalLM,
            # Every tensor above this limit gets its own shard; 200KB gives 5+ shards here.
            dict(max_shard_size="200KB"),
        ),
        # LLaMA-3.1 style: GQA 4:1, explicit head_dim, llama3 rope scaling.  A small
        # original_max_position_embeddings puts the scaling on frequencies that matter at these
        # lengths.  With theta 5e5 and head_dim 16 the 8 wavelengths are 6.3, 32.4, 167, 862, ...
        # positions; 64 (not 32) is chosen so that all three llama3 branches are used:
        # 6.3 < 64/4 kept, 16 <= 32.4 <= 64 smoothed, > 64 divided by 8.  (With 32, the 32.4
        # wavelength lands just above the low-freq limit and the smoothing branch is never hit.)
        "llama31-gqa": (
            1002,
            LlamaConfig(
                **common,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=8,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=512,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                tie_word_embeddings=True,
                attention_bias=False,
                mlp_bias=False,
            ),
            LlamaForCausalLM,
            {},
        ),
        # Mistral with a sliding window (8) shorter than prompt_0 + 32 generated tokens (45).
        "mistral-swa": (
            1003,
            MistralConfig(
                **common,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=8,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False,
            ),
            MistralForCausalLM,
            {},
        ),
        # Linear RoPE scaling (position interpolation): every inverse frequency divided by the factor.
        # Factor 4 changes every rotation angle, so a port that multiplies instead of dividing (or
        # ignores the scaling) gets different logits from the first position on.
        "llama-linear-rope": (
            1005,
            LlamaConfig(
                **common,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                tie_word_embeddings=False,
                attention_bias=False,
                mlp_bias=False,
            ),
            LlamaForCausalLM,
            {},
        ),
        # Qwen2: q/k/v projections carry a bias; no sliding window; tied head.
        "qwen2-bias": (
            1004,
            Qwen2Config(
                **common,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                use_sliding_window=False,
                tie_word_embeddings=True,
            ),
            Qwen2ForCausalLM,
            {},
        ),
    }


def _versions() -> dict:
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _date() -> str:
    return os.environ.get("GOLDEN_DATE") or datetime.date.today().isoformat()


def _deterministic_torch() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one thread: reductions in a fixed order, bit-stable reruns


# --------------------------------------------------------------------------- fixtures


@torch.no_grad()
def make_random_fixture(name: str, seed: int, config, model_cls, save_kwargs) -> Path:
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    # Overwrite every parameter ourselves (not HF's _init_weights) so the values depend only
    # on the seed and the parameter order, not on the transformers init code.  Tied weights
    # appear once in named_parameters(), so the head stays tied.
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in pname:
            p.copy_(1.0 + NORM_STD * noise)
        elif pname.endswith(".bias"):
            p.copy_(BIAS_STD * noise)
        else:
            p.copy_(WEIGHT_STD * noise)
    out = FIXTURE_DIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # transformers v5 always writes safetensors (the v4 safe_serialization flag is gone).
    model.save_pretrained(out, **save_kwargs)
    # generation_config.json is not needed by the loader; keep only config + weights.
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return out


# --------------------------------------------------------------------------- prompts


def wikitext_prompts(tok: Tokenizer) -> tuple[list[np.ndarray], list[str]]:
    """Token ids of two different real lines of WikiText-2 test.

    Rule: walk the lines of test.txt (split on '\\n', trailing newline dropped, the rest of the
    line kept verbatim, including its leading space); skip blank lines and ' = Heading = '
    lines; a line qualifies for prompt i if it encodes (add_special_tokens=False) to at least
    PROMPT_LENS[i] ids; prompt_0 takes the first qualifying line, prompt_1 the next one.  The
    chosen texts are stored in the npz, so tests never need to re-implement this rule.
    """
    lines = WIKITEXT.read_text(encoding="utf-8").split("\n")
    prompts, texts = [], []
    for line in lines:
        if len(prompts) == len(PROMPT_LENS):
            break
        s = line.strip()
        if not s or s.startswith("="):
            continue
        ids = tok.encode(line, add_special_tokens=False).ids
        need = PROMPT_LENS[len(prompts)]
        if len(ids) >= need:
            prompts.append(np.asarray(ids[:need], dtype=np.int32))
            texts.append(line)
    return prompts, texts


def random_prompts(vocab: int, seed: int) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    # ids in [1, vocab): 0 is avoided so that no prompt starts with a pad/bos-like id.
    return [rs.randint(1, vocab, size=n).astype(np.int32) for n in PROMPT_LENS]


# --------------------------------------------------------------------------- golden decode


def load_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.double(), 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def greedy_golden(model, prompt: np.ndarray) -> dict:
    """Prefill + hand-written greedy loop with the KV cache (batch 1, no padding)."""
    ids = torch.from_numpy(prompt.astype(np.int64))[None, :]
    out = model(input_ids=ids, use_cache=True)
    prefill = out.logits[0].float()  # [T, V]
    cache = out.past_key_values
    next_logits = prefill[-1]
    tokens, decode_logits, gaps = [], [], []
    for s in range(N_GREEDY):
        gaps.append(_top2_gap(next_logits))
        tok = int(torch.argmax(next_logits))
        tokens.append(tok)
        if s == N_GREEDY - 1:
            break  # token_31 is the last one stored; no need to feed it
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_logits = out.logits[0, -1].float()
        if s < N_DECODE_LOGITS:
            decode_logits.append(next_logits.clone())
    return {
        "prefill_logits": prefill.numpy().astype(np.float32),
        "greedy": np.asarray(tokens, dtype=np.int32),
        "decode_logits": torch.stack(decode_logits).numpy().astype(np.float32),
        "min_top2_gap": float(min(gaps)),
    }


@torch.no_grad()
def check_against_full_forward(model, prompt: np.ndarray, g: dict) -> float:
    """Cached decode must equal a cache-free forward over prompt + generated tokens.

    For mistral-swa this is the sliding-window check: the full forward applies the window
    through its mask only, the cached decode through the cache's rolling layers + the mask.
    Returns the max abs difference over all checked logits.
    """
    T = len(prompt)
    seq = np.concatenate([prompt, g["greedy"][: N_GREEDY - 1]]).astype(np.int64)
    full = model(input_ids=torch.from_numpy(seq)[None], use_cache=False).logits[0].float()
    diff_prefill = (full[:T] - torch.from_numpy(g["prefill_logits"])).abs().max()
    diff_decode = (full[T : T + N_DECODE_LOGITS] - torch.from_numpy(g["decode_logits"])).abs().max()
    # the whole greedy path must be reproduced by the cache-free forward as well
    full_greedy = torch.argmax(full[T - 1 :], dim=-1).numpy()
    assert np.array_equal(full_greedy, g["greedy"]), "cache-free greedy path differs"
    return float(max(diff_prefill, diff_decode))


def write_golden(name: str, model_dir: Path, prompts, texts, extra_meta: dict) -> dict:
    model = load_model(model_dir)
    arrays, meta_prompts = {}, []
    for i, p in enumerate(prompts):
        g = greedy_golden(model, p)
        if g["min_top2_gap"] < MIN_GAP:
            raise RuntimeError(f"{name} prompt_{i}: near-tie (gap {g['min_top2_gap']:.2e}); change seed/prompt")
        diff = check_against_full_forward(model, p, g)
        if diff > 1e-4:
            raise RuntimeError(f"{name} prompt_{i}: cached decode != full forward (max diff {diff:.2e})")
        arrays[f"prompt_{i}"] = p.astype(np.int32)
        arrays[f"prefill_logits_{i}"] = g["prefill_logits"]
        arrays[f"greedy_{i}"] = g["greedy"]
        arrays[f"decode_logits_{i}"] = g["decode_logits"]
        arrays[f"min_top2_gap_{i}"] = np.asarray(g["min_top2_gap"], dtype=np.float64)
        meta_prompts.append(
            {"len": int(len(p)), "text": texts[i] if texts else None, "min_top2_gap": g["min_top2_gap"],
             "max_abs_diff_cached_vs_full_forward": diff}
        )
        print(f"  {name} prompt_{i}: greedy {g['greedy'][:8].tolist()}... min gap {g['min_top2_gap']:.3f}, "
              f"cache-vs-full {diff:.1e}")
    meta = {
        "model": name,
        "model_dir": str(model_dir),
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "vocab_size": int(model.config.vocab_size),
        "n_greedy": N_GREEDY,
        "n_decode_logits": N_DECODE_LOGITS,
        "attn_implementation": "eager",
        "dtype": "float32",
        "prompts": meta_prompts,
        "date": _date(),
        **_versions(),
        **extra_meta,
    }
    # RoPE inverse frequencies as HF computes them (after any scaling): lets a port check its
    # rope tables directly instead of only through the logits.
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        arrays["rope_inv_freq"] = rotary.inv_freq.detach().float().numpy()
        meta["rope_attention_scaling"] = float(getattr(rotary, "attention_scaling", 1.0))
    # metadata as a 0-d unicode array: np.load reads it without allow_pickle
    arrays["meta_json"] = np.asarray(json.dumps(meta, sort_keys=True))
    np.savez_compressed(GOLDEN_DIR / f"{name}.npz", **arrays)
    return meta


# --------------------------------------------------------------------------- mistral window


@torch.no_grad()
def mistral_window_report(model_dir: Path, prompt: np.ndarray, greedy: np.ndarray) -> dict:
    """Show the window really matters: the same sequence without the window gives other logits,
    and an explicit reference (full causal attention restricted to the last W keys, i.e. key j
    visible from query i iff i - W < j <= i) gives the same logits as HF."""
    model = load_model(model_dir)
    seq = torch.from_numpy(np.concatenate([prompt, greedy[:-1]]).astype(np.int64))[None]
    with_window = model(input_ids=seq, use_cache=False).logits[0]
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    no_window = model(input_ids=seq, use_cache=False).logits[0]
    W = 8
    n = seq.shape[1]
    # explicit mask with the window rule, given to the window-less model as a 4D additive mask
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= i) & (j > i - W)
    mask4d = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    explicit = model(input_ids=seq, attention_mask=mask4d, use_cache=False).logits[0]
    first_diff = None
    for pos in range(n):
        if (with_window[pos] - no_window[pos]).abs().max() > 1e-5:
            first_diff = pos
            break
    return {
        "sliding_window": W,
        "seq_len_checked": int(n),
        "first_position_where_window_changes_logits": first_diff,
        "max_abs_diff_window_vs_no_window": float((with_window - no_window).abs().max()),
        "max_abs_diff_hf_vs_explicit_mask_i-W<j<=i": float((with_window - explicit).abs().max()),
    }


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(name: str, model_dir: Path) -> dict:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = WIKITEXT.read_text(encoding="utf-8")
    ids_all = tok.encode(text, add_special_tokens=False).ids
    if len(ids_all) < PPL_N_TOKENS:
        raise RuntimeError(f"only {len(ids_all)} tokens in {WIKITEXT}")
    ids = np.asarray(ids_all[:PPL_N_TOKENS], dtype=np.int32)
    sha = hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()
    windows = torch.from_numpy(ids.astype(np.int64)).view(-1, PPL_SEQ_LEN)  # [32, 256]
    model = load_model(model_dir)
    total = 0.0  # float64 accumulation
    count = 0
    for b in range(0, windows.shape[0], PPL_BATCH):
        x = windows[b : b + PPL_BATCH]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [B, 256, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # predictions for tokens 1..255
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]  # [B, 255] float32
        total += float(nll.double().sum())
        count += nll.numel()
    mean_nll = total / count
    res = {
        "model": name,
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "n_predictions": count,
        "n_windows": int(windows.shape[0]),
        "seq_len": PPL_SEQ_LEN,
        "n_tokens": PPL_N_TOKENS,
        "n_tokens_in_text": len(ids_all),
        "token_ids_sha256": sha,
        "token_ids_sha256_of": "int32 little-endian bytes of the first n_tokens ids",
        "first_ids": ids[:16].tolist(),
        "protocol": (
            "text = whole test.txt read as UTF-8; ids = Tokenizer.from_file(tokenizer.json)"
            ".encode(text, add_special_tokens=False).ids[:n_tokens]; non-overlapping windows of "
            "seq_len, each scored independently, no BOS; NLL of window tokens 1..seq_len-1; "
            "ppl = exp(mean NLL); float32 model and log_softmax, float64 sum"
        ),
        "date": _date(),
        **_versions(),
    }
    (GOLDEN_DIR / f"ppl_{name}.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"  ppl {name}: {res['ppl']:.4f} (mean nll {mean_nll:.6f}, {count} predictions)")
    return res


# --------------------------------------------------------------------------- verify


def verify(name: str, vocab: int) -> None:
    with np.load(GOLDEN_DIR / f"{name}.npz") as z:
        for i, T in enumerate(PROMPT_LENS):
            assert z[f"prompt_{i}"].dtype == np.int32 and z[f"prompt_{i}"].shape == (T,)
            assert z[f"prefill_logits_{i}"].dtype == np.float32 and z[f"prefill_logits_{i}"].shape == (T, vocab)
            assert z[f"greedy_{i}"].dtype == np.int32 and z[f"greedy_{i}"].shape == (N_GREEDY,)
            dl = z[f"decode_logits_{i}"]
            assert dl.dtype == np.float32 and dl.shape == (N_DECODE_LOGITS, vocab)
            gr = z[f"greedy_{i}"]
            assert gr[0] == np.argmax(z[f"prefill_logits_{i}"][-1])
            for s in range(N_DECODE_LOGITS):
                assert gr[s + 1] == np.argmax(dl[s]), (name, i, s)
            assert float(z[f"min_top2_gap_{i}"]) >= MIN_GAP
            assert np.isfinite(dl).all() and np.isfinite(z[f"prefill_logits_{i}"]).all()
        meta = json.loads(str(z["meta_json"]))
        assert meta["model"] == name


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write the golden files (all by default)")
    ap.add_argument("--only", nargs="+", default=None, metavar="MODEL",
                    help="regenerate only these models' npz (and fixtures); skips perplexity unless named")
    only = ap.parse_args(argv).only
    if only and not set(only) <= set(RANDOM_MODELS) | set(REAL_MODELS):
        ap.error(f"unknown model(s) {sorted(set(only) - set(RANDOM_MODELS) - set(REAL_MODELS))}")
    wanted = set(only or RANDOM_MODELS + REAL_MODELS)
    _deterministic_torch()
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    summary = {"versions": _versions(), "models": {}}

    print("random fixtures")
    for name, (seed, config, cls, save_kwargs) in _random_configs().items():
        if name not in wanted:
            continue
        path = make_random_fixture(name, seed, config, cls, save_kwargs)
        prompts = random_prompts(config.vocab_size, seed)
        meta = write_golden(name, path, prompts, None, {"seed": seed, "fixture": str(path.relative_to(REPO))})
        verify(name, config.vocab_size)
        summary["models"][name] = meta
        if name == "mistral-swa":
            with np.load(GOLDEN_DIR / f"{name}.npz") as z:
                rep = mistral_window_report(path, z["prompt_0"], z["greedy_0"])
            print(f"  mistral window: {rep}")
            summary["mistral_window"] = rep

    print("real checkpoints")
    for name in REAL_MODELS:
        if name not in wanted:
            continue
        model_dir = MODELS_DIR / name
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        prompts, texts = wikitext_prompts(tok)
        meta = write_golden(name, model_dir, prompts, texts, {"prompt_source": str(WIKITEXT)})
        verify(name, meta["vocab_size"])
        summary["models"][name] = meta

    print("perplexity")
    summary["ppl"] = {name: perplexity(name, MODELS_DIR / name) for name in REAL_MODELS if name in wanted}

    for name in RANDOM_MODELS:
        if name not in wanted:
            continue
        d = FIXTURE_DIR / name
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"  fixture {name}: {size / 1024:.0f} KiB, files {sorted(f.name for f in d.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
