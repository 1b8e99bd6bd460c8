"""A GGUF file as a checkpoint source: the same interface as `convert.hf.HFReader` (config, hf_config,
shapes, get, close, tokenizer, write_tokenizer), so `convert_checkpoint` and `load_hf` take either.

Everything is checked before any tensor is read: architecture, tensor types, tokenizer, that every
parameter has its tensor with the shape the metadata implies, and that no unknown tensor is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.gguf_mapping import IGNORED_TENSORS, hf_config, parameter_sources, polar_shape, to_polar
from convert.gguf_reader import GGUFFile
from convert.gguf_tokenizer import build_tokenizer, tokenizer_files
from polar_jax.layout import param_shapes
from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError
from polar_jax.tokenizer import Tokenizer


class GGUFSource:
    """Reads a GGUF checkpoint tensor by tensor, dequantized (float32), in polar-jax names and layouts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        try:
            self._check()
        except BaseException:
            self.file.close()
            raise

    def _check(self) -> None:
        f = self.file
        gguf_shapes = {n: f.shape(n) for n in f.tensor_names()}
        self.hf_config = hf_config(f.metadata, gguf_shapes, lambda: f.tensor("rope_freqs.weight"))
        self.config = ModelConfig.from_hf(self.hf_config)
        f.check_types()
        self._backend = build_tokenizer(f.metadata)
        if self._backend.get_vocab_size() > self.config.vocab_size:
            raise CheckpointError(
                f"{self.path}: the tokenizer has {self._backend.get_vocab_size()} tokens but the embedding only "
                f"{self.config.vocab_size} rows"
            )
        self.sources = parameter_sources(self.config)
        self.shapes = param_shapes(self.config)
        missing = [s.gguf_name for s in self.sources.values() if s.gguf_name not in f]
        if missing:
            raise CheckpointError(f"{self.path} lacks tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        used = {s.gguf_name for s in self.sources.values()}
        unknown = sorted(set(f.tensor_names()) - used - set(IGNORED_TENSORS))
        if unknown:
            raise CheckpointError(
                f"{self.path} has tensors this {self.config.model_type} mapping does not know: {unknown[:5]} "
                "(an unsupported variant of the architecture)"
            )
        for name, src in self.sources.items():
            got = polar_shape(src, gguf_shapes[src.gguf_name])
            if got != self.shapes[name]:
                raise CheckpointError(
                    f"shape mismatch for {src.gguf_name}: file has {gguf_shapes[src.gguf_name]}, "
                    f"the metadata implies {polar_shape(src, self.shapes[name])}"
                )

    def get(self, name: str) -> np.ndarray:
        src = self.sources[name]
        return to_polar(src, self.file.tensor(src.gguf_name))

    def tokenizer(self) -> Tokenizer:
        cfg = self.config
        return Tokenizer(self._backend, cfg.eos_token_ids[0] if cfg.eos_token_ids else None, cfg.pad_token_id)

    def write_tokenizer(self, dest: Path) -> None:
        for name, text in tokenizer_files(self.file.metadata).items():
            (Path(dest) / name).write_text(text)

    def close(self) -> None:
        self.file.close()
