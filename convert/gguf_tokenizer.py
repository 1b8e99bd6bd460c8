"""The tokenizer a GGUF file describes, built with the `tokenizers` library (no transformers, no torch).

A GGUF has no tokenizer.json: it stores the vocabulary, the BPE merges, per-token types and the special
ids as `tokenizer.ggml.*` metadata. This rebuilds the tokenizer Hugging Face transformers builds when it
loads the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so token ids and decoded text
are the same (checked against HF in tests/test_gguf_parity.py):

- byte-level BPE (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, LLaMA-3, Qwen2 files): vocabulary
  spelled in the GPT-2 byte alphabet (a token stored in plain UTF-8 is re-spelled byte by byte), the
  file's merges, no unknown token;
- pre-tokenization by `tokenizer.ggml.pre`: the LLaMA-3 and Qwen2 split patterns where the file names
  them, GPT-2's own byte-level pattern otherwise (as transformers does; e.g. SmolLM's "smollm");
- tokens typed CONTROL become special tokens (skipped when decoding with skip_special_tokens), tokens
  typed USER_DEFINED plain added tokens; both are matched whole in the input text.

Sentencepiece vocabularies (`tokenizer.ggml.model == "llama"`, LLaMA-2/Mistral files) are not built yet:
they raise a clear error.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from polar_jax.errors import CheckpointError, UnsupportedModelError

_CONTROL, _USER_DEFINED = 3, 4

# Split patterns (the standard published pre-tokenizer regexes of these vocabularies).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}
# Pre-tokenizer names for which transformers uses a split pattern not implemented here: refused rather
# than silently tokenized another way.
_UNSUPPORTED_PRE = ("tekken", "gpt-4o", "llama4", "qwen35", "kanana2", "talkie", "minimax-m2", "pixtral",
                    "midm-2.0", "lfm2", "falcon-h1", "jina-v5-nano", "kormo", "f2llmv2")

_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _require_tokenizer(meta: dict[str, Any]) -> tuple[str, list[str]]:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise CheckpointError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if model != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported yet (supported: 'gpt2', byte-level BPE)"
        )
    return model, list(tokens)


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` for the file's tokenizer metadata."""
    _, tokens = _require_tokenizer(meta)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError("the GGUF byte-level tokenizer has no merges (tokenizer.ggml.merges)")
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _UNSUPPORTED_PRE:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # Tokens written in plain UTF-8 (some files store special tokens that way) get the byte spelling.
        key = tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[key] = i
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise CheckpointError(f"GGUF merges must be 'left right' pairs, got {bad[:3]}")
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= spelled]
    for name, key in _SPECIAL_IDS.items():  # special ids the file names are special even if typed otherwise
        idx = meta.get(f"tokenizer.ggml.{key}")
        if idx is not None and 0 <= int(idx) < len(tokens) and tokens[int(idx)] not in control:
            if set(tokens[int(idx)]) <= spelled:
                control.append(tokens[int(idx)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_tok = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_tok}:0 $A:0", pair=f"{bos_tok}:0 $A:0 {bos_tok}:1 $B:1", special_tokens=[(bos_tok, int(bos))]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """`tokenizer_config.json` for a converted checkpoint: special tokens, BOS/EOS flags, chat template."""
    _, tokens = _require_tokenizer(meta)
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, key in _SPECIAL_IDS.items():
        idx = meta.get(f"tokenizer.ggml.{key}")
        out[name] = tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None
    out["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    out["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def tokenizer_files(meta: dict[str, Any]) -> dict[str, str]:
    """File name -> text of the tokenizer files a converted checkpoint carries."""
    return {"tokenizer.json": build_tokenizer(meta).to_str(),
            "tokenizer_config.json": json.dumps(tokenizer_config(meta), indent=2)}
