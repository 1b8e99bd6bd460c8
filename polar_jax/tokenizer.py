"""Tokenizer loading from a checkpoint folder (the `tokenizers` library reads tokenizer.json directly;
transformers' AutoTokenizer is the fallback for folders without one)."""

from __future__ import annotations

from pathlib import Path

from polar_jax.errors import CheckpointError
from polar_jax.files import read_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class Tokenizer:
    """encode/decode plus the special ids generation needs."""

    def __init__(self, backend, eos_token_id: int | None, pad_token_id: int | None):
        self._backend = backend
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)


class _HFBackend:
    """Adapts a transformers tokenizer to the `tokenizers` interface used above."""

    def __init__(self, tok):
        self.tok = tok

    def get_vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text, add_special_tokens=False):
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return type("Enc", (), {"ids": ids})()

    def encode_batch(self, texts, add_special_tokens=False):
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _special_id(folder: Path, backend, key: str) -> int | None:
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            v = read_json(p).get(f"{key}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                if type(v) is not int:
                    raise CheckpointError(f"{p}: {key}_token_id must be an integer token id, got {v!r}")
                return v
    p = folder / "tokenizer_config.json"
    if p.is_file():
        tok = read_json(p).get(f"{key}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and hasattr(backend, "token_to_id"):
            return backend.token_to_id(tok)
    return None


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None if the folder has no tokenizer files."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as _Fast

        try:
            backend = _Fast.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception types for a malformed file
            raise CheckpointError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
    elif any((folder / f).is_file() for f in ("tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        try:
            backend = _HFBackend(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        except Exception as e:  # transformers raises many types (OSError, ValueError, its own) for bad files
            raise CheckpointError(f"cannot read the tokenizer files in {folder}: {e}") from None
    else:
        return None
    return Tokenizer(backend, _special_id(folder, backend, "eos"), _special_id(folder, backend, "pad"))
