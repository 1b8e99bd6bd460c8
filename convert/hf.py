"""Hugging Face safetensors (or a GGUF file) -> polar-jax checkpoint, without torch.

`HFReader` yields each polar-jax parameter from an HF folder (single file or sharded with an index), with
shapes checked against the config (`convert.gguf_source.GGUFSource` does the same for a .gguf file;
`open_reader` picks one); `convert_checkpoint` streams them into a polar-jax checkpoint folder.
The output is written to a temporary sibling folder and renamed at the end, so an interrupted run leaves
nothing half-written under the requested name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from convert.gguf_reader import is_gguf_file
from convert.gguf_source import GGUFSource
from convert.mapping import parameter_sources
from convert.safetensors_io import WeightSource, write_streaming
from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError
from polar_jax.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class HFReader:
    """Reads an HF checkpoint folder tensor by tensor, in polar-jax names and layouts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise CheckpointError(f"checkpoint path {self.folder} does not exist")
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder (expected an HF checkpoint folder)")
        self.config = ModelConfig.from_hf_file(self.folder / "config.json")
        self.hf_config = json.loads((self.folder / "config.json").read_text())
        self.weights = WeightSource(self.folder)
        self.sources = parameter_sources(self.config)
        from polar_jax.checkpoint import param_shapes

        self.shapes = param_shapes(self.config)
        missing = [s.hf_name for n, s in self.sources.items() if self._resolve(s.hf_name) is None]
        if missing:
            raise CheckpointError(f"checkpoint {self.folder} lacks tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        for name, src in self.sources.items():
            hf_shape = self.weights.shape(self._resolve(src.hf_name))
            got = hf_shape[::-1] if src.transpose else hf_shape
            if tuple(got) != self.shapes[name]:
                want = self.shapes[name][::-1] if src.transpose else self.shapes[name]
                raise CheckpointError(
                    f"shape mismatch for {src.hf_name}: checkpoint has {tuple(hf_shape)}, config.json implies {tuple(want)}"
                )

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
    output path."""
    from polar_jax.checkpoint import FORMAT, FORMAT_VERSION, META_FILE, PARAMS_FILE

    reader = open_reader(hf_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output {out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    dtype = dtype or reader.config.dtype
    if dtype not in _NP_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}: choose float32, bfloat16 or float16")
    np_dtype = _NP_DTYPES[dtype]
    names = list(reader.shapes)
    specs = [(n, reader.shapes[n], np_dtype) for n in names]
    digest = hashlib.sha256()

    def produce(name: str) -> np.ndarray:
        arr = reader.get(name)
        # Through float32 so fp16 <-> bf16 conversions round once from the exact value.
        out = np.ascontiguousarray(arr if arr.dtype == np_dtype else arr.astype(np.float32).astype(np_dtype))
        digest.update(name.encode())
        digest.update(out.reshape(-1).view(np.uint8).data)
        return out

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
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
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should be readable like any folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out_dir
