"""Tiny GGUF files written with the gguf package's writer, the way llama.cpp lays them out, for tests (bad
input, mapping, every tensor type) and for the HF reference fixtures of tests/golden/make_golden_gguf.py.

`write_gguf` returns what a correct reader must give back for each tensor: the dequantized values in HF
layout, computed *before* llama.cpp's q/k row permutation is applied to the file's bytes. Quantization
works on rows, so permuting rows of the quantized blocks equals permuting rows of the dequantized matrix:
a reader that undoes the permutation must land exactly on these arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

_BYTE_KEEP = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġa", "n"), ("o", "n"),
          ("Ġ", "s"), ("r", "e"), ("Ġ", "w"), ("a", "t"), ("Ġ", "c"), ("e", "n"), ("Ġ", "o"), ("1", "2")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_middle|>"]  # pad, bos, eos, plain control
USER_DEFINED = ["<think>"]
# K-quant blocks are written as random bytes with their fp16 scale fields set to these (sane magnitudes).
_K_SCALE_FIELDS = {Q.Q4_K: [(0, 2e-4), (2, 1e-4)], Q.Q5_K: [(0, 2e-4), (2, 1e-4)], Q.Q6_K: [(208, 2e-4)],
                   Q.Q2_K: [(80, 2e-4), (82, 1e-4)]}


def byte_alphabet() -> list[str]:
    extra, out = 0, []
    for b in range(256):
        if b in _BYTE_KEEP:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_tokenizer() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE vocabulary with control and user tokens."""
    tokens = byte_alphabet() + ["".join(m) for m in MERGES] + SPECIALS + USER_DEFINED
    types = [1] * (len(tokens) - len(SPECIALS) - len(USER_DEFINED)) + [3] * len(SPECIALS) + [4] * len(USER_DEFINED)
    return tokens, types, [" ".join(m) for m in MERGES]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF half-split -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The stored form of w ([rows, cols], HF layout) in qtype: raw bytes for block types, else the array."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in _K_SCALE_FIELDS:  # no quantizer in gguf-py: random blocks with set scales
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for off, val in _K_SCALE_FIELDS[qtype]:
            raw[..., off : off + 2] = np.frombuffer(np.float16(val).tobytes(), np.uint8)
        return raw.reshape(w.shape[0], -1)
    return quantize(w.astype(np.float32), qtype)


def write_gguf(path: Path, arch: str = "llama", *, layers: int = 2, d: int = 64, heads: int = 4, kv: int = 2,
               ffn: int = 128, tied: bool = True, types: dict[str, Q] | None = None, default_type: Q = Q.F32,
               tokenizer: bool = True, pre: str = "llama-bpe", add_bos: bool = False, qkv_bias: bool | None = None,
               seed: int = 0, name: str = "tiny", skip: tuple[str, ...] = (), extra_meta: dict[str, Any] | None = None,
               rope_theta: float = 10000.0) -> dict[str, np.ndarray]:
    """Writes a tiny model; returns GGUF tensor name -> expected float32 values (HF layout, un-permuted).
    `types` maps a tensor-name suffix ('attn_q.weight', 'token_embd.weight', ...) to its stored type."""
    rng = np.random.default_rng(seed)
    types = types or {}
    qkv_bias = (arch == "qwen2") if qkv_bias is None else qkv_bias
    tokens, token_types, merges = tiny_tokenizer()
    vocab = len(tokens)
    hd = d // heads
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    for key, val in (extra_meta or {}).items():
        getattr(w, key)(val)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index(SPECIALS[1]))
        w.add_eos_token_id(tokens.index(SPECIALS[2]))
        w.add_pad_token_id(tokens.index(SPECIALS[0]))
        w.add_add_bos_token(add_bos)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not tied:
        shapes["output.weight"] = (vocab, d)
    for i in range(layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_q.weight": (heads * hd, d),
                       b + "attn_k.weight": (kv * hd, d), b + "attn_v.weight": (kv * hd, d),
                       b + "attn_output.weight": (d, heads * hd), b + "ffn_gate.weight": (ffn, d),
                       b + "ffn_up.weight": (ffn, d), b + "ffn_down.weight": (d, ffn)})
        if qkv_bias:
            shapes.update({b + "attn_q.bias": (heads * hd,), b + "attn_k.bias": (kv * hd,), b + "attn_v.bias": (kv * hd,)})
    expected: dict[str, np.ndarray] = {}
    for tname, shape in shapes.items():
        if tname in skip:
            continue
        suffix = tname.split(".", 2)[-1] if tname.startswith("blk.") else tname
        if "norm" in tname:
            vals = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            vals = (0.1 if tname.endswith("bias") else 0.2) * rng.standard_normal(shape)
        vals = vals.astype(np.float32)
        qtype = types.get(suffix, default_type) if len(shape) == 2 else Q.F32
        stored = _encode(vals if len(shape) == 2 else vals, qtype, rng)
        expected[tname] = dequantize(stored, qtype).reshape(shape).astype(np.float32) if qtype not in (Q.F32, Q.F16) \
            else stored.astype(np.float32)
        n_rot = heads if "attn_q" in tname else kv if "attn_k" in tname else 0
        if arch == "llama" and n_rot:
            stored = _permute(stored, n_rot)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(tname, stored)
        else:
            w.add_tensor(tname, stored, raw_shape=stored.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
