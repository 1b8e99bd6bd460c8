"""Hugging Face safetensors (or a GGUF file) -> polar-jax checkpoint, without torch.

`HFReader` yields each polar-jax parameter from an HF folder (single file or sharded with an index), with
shapes checked against the config (`convert.gguf_source.GGUFSource` does the same for a .gguf file;
`open_reader` picks one); `convert_checkpoint` streams them into a polar-jax checkpoint folder.
The output goes through polar_jax.outputs (never over the input, never over a folder that is not a
converted checkpoint, written beside the target and renamed at the end, so an interrupted run leaves the
old output or nothing under the requested name).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert.gguf_reader import is_gguf_file
from convert.gguf_source import GGUFSource
from convert.mapping import parameter_sources
from convert.safetensors_io import WeightSource, write_streaming
from polar_jax.config import ModelConfig
from polar_jax.dtypes import DTYPES, dtype_name
from polar_jax.errors import CheckpointError
from polar_jax.files import read_json
from polar_jax.layout import CHECKPOINT_OUTPUT, FORMAT, FORMAT_VERSION, META_FILE, PARAMS_FILE, hash_tensor, param_shapes
from polar_jax.outputs import atomic_folder
from polar_jax.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class HFReader:
    """Reads an HF checkpoint folder tensor by tensor, in polar-jax names and layouts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise CheckpointError(f"checkpoint path {self.folder} does not exist")
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is neither a folder nor a GGUF file (expected an HF checkpoint folder, "
                                  "a converted checkpoint folder or a .gguf file)")
        if (self.folder / META_FILE).is_file():
            raise CheckpointError(f"{self.folder} is already a polar-jax checkpoint (it has {META_FILE}): load it "
                                  "with polar_jax.load or use it as --model directly; there is nothing to convert")
        if not (self.folder / "config.json").exists():
            raise CheckpointError(f"{self.folder} is not a model folder: it has no config.json (expected an HF "
                                  "checkpoint folder, a converted checkpoint folder or a .gguf file)")
        self.hf_config = read_json(self.folder / "config.json")
        self.config = ModelConfig.from_hf(self.hf_config)
        self.weights = WeightSource(self.folder)
        try:
            self.sources = parameter_sources(self.config)
            self.shapes = param_shapes(self.config)
            self._check_tensors()
        except BaseException:
            self.weights.close()
            raise

    def _check_tensors(self) -> None:
        """Shapes of the tensors present first (a wrong config value shows up as a shape mismatch that names
        the config), then missing tensors, then layers the config does not have."""
        for name, src in self.sources.items():
            hf_name = self._resolve(src.hf_name)
            if hf_name is None:
                continue
            hf_shape = self.weights.shape(hf_name)
            got = hf_shape[::-1] if src.transpose else hf_shape
            if tuple(got) != self.shapes[name]:
                want = self.shapes[name][::-1] if src.transpose else self.shapes[name]
                raise CheckpointError(
                    f"shape mismatch for {src.hf_name}: checkpoint has {tuple(hf_shape)}, config.json implies "
                    f"{tuple(want)} (check hidden_size, intermediate_size / ffn_dim, heads and vocab_size)"
                )
        missing = [s.hf_name for s in self.sources.values() if self._resolve(s.hf_name) is None]
        if missing:
            raise CheckpointError(f"checkpoint {self.folder} lacks tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        layers = {int(m.group(1)) for k in self.weights.keys() if (m := _LAYER_RE.search(k))}
        if layers and max(layers) >= self.config.num_layers:
            raise CheckpointError(f"checkpoint {self.folder} has {max(layers) + 1} layers, config.json says "
                                  f"num_hidden_layers={self.config.num_layers}")

    def _resolve(self, hf_name: str) -> str | None:
        # Some OPT exports drop the leading "model." prefix.
        for cand in (hf_name, hf_name.removeprefix("model.")):
            if cand in self.weights:
                return cand
        return None

    def get(self, name: str) -> np.ndarray:
        src = self.sources[name]
        arr = self.weights.get(self._resolve(src.hf_name))
        return arr.T if src.transpose else arr

    def tokenizer(self) -> Tokenizer | None:
        return load_tokenizer(self.folder)

    def write_tokenizer(self, dest: Path) -> None:
        for f in TOKENIZER_FILES:
            if (self.folder / f).is_file():
                shutil.copyfile(self.folder / f, dest / f)

    def close(self) -> None:
        self.weights.close()


def open_reader(path: str | Path) -> HFReader | GGUFSource:
    """The reader for a checkpoint: a GGUF file, or an HF folder."""
    return GGUFSource(path) if is_gguf_file(path) else HFReader(path)


def convert_checkpoint(
    hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False, progress: bool = True
) -> Path:
    """Converts an HF folder (or a GGUF file, dequantized) into a polar-jax checkpoint folder; returns the
    output path. `overwrite` replaces only an earlier converted checkpoint, never the input or another folder."""
    reader = open_reader(hf_dir)
    try:
        dtype = dtype_name(dtype or reader.config.dtype)
        np_dtype = DTYPES[dtype]
        specs = [(n, reader.shapes[n], np_dtype) for n in reader.shapes]
        digest = hashlib.sha256()

        def produce(name: str) -> np.ndarray:
            arr = reader.get(name)
            # Through float32 so fp16 <-> bf16 conversions round once from the exact value.
            out = np.ascontiguousarray(arr if arr.dtype == np_dtype else arr.astype(np.float32).astype(np_dtype))
            hash_tensor(digest, name, out)
            return out

        with atomic_folder(out_dir, CHECKPOINT_OUTPUT, inputs=[hf_dir], overwrite=overwrite) as tmp:
            bar = tqdm(total=len(specs), desc="convert", unit="tensor", disable=not progress)
            write_streaming(tmp / PARAMS_FILE, specs, produce, metadata={"format": FORMAT}, on_tensor=lambda _: bar.update())
            bar.close()
            hf_cfg = dict(reader.hf_config)
            hf_cfg.pop("torch_dtype", None)
            hf_cfg["dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "dtype": dtype,
                "source": str(Path(hf_dir).name),
                "weights_sha256": digest.hexdigest(),
                "num_params": int(sum(int(np.prod(s)) for _, s, _ in specs)),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            reader.write_tokenizer(tmp)
    finally:
        reader.close()
    return Path(out_dir)
