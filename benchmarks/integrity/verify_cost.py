"""What checking `weights_sha256` costs when loading a converted checkpoint, measured on a ~1.5 GB file and
extrapolated (linearly in bytes) to a 7B model.

Writes a converted checkpoint of random weights (LLaMA layout, float16, sized by --layers), then times, in
alternating order: the SHA-256 of the weights file alone (streamed in 16 MB blocks), `polar_jax.load` with
`verify=True` and with `verify=False`. The page cache is warm for every timed run (each run reads the file
once before timing starts), so the numbers are CPU cost, not disk speed; the extrapolation assumes the same.
The host's load average before and after is recorded: on a shared machine the numbers are upper bounds.

    python benchmarks/integrity/verify_cost.py --out benchmarks/results/verify_cost_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import polar_jax
from convert.safetensors_io import write_streaming
from polar_jax.config import ModelConfig
from polar_jax.dtypes import DTYPES
from polar_jax.layout import FORMAT, FORMAT_VERSION, META_FILE, PARAMS_FILE, hash_tensor, param_shapes

LLAMA2_7B_BYTES = 6_738_415_616 * 2  # LLaMA-2-7B parameters in float16


def write_checkpoint(folder: Path, layers: int) -> int:
    hf = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": layers, "num_attention_heads": 16, "max_position_embeddings": 2048,
          "dtype": "float16", "rms_norm_eps": 1e-5}
    cfg = ModelConfig.from_hf(hf)
    shapes = param_shapes(cfg)
    dtype = DTYPES["float16"]
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()

    def produce(name: str) -> np.ndarray:
        arr = (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(dtype)
        hash_tensor(digest, name, arr)
        return arr

    folder.mkdir(parents=True)
    write_streaming(folder / PARAMS_FILE, [(n, s, dtype) for n, s in shapes.items()], produce, metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "dtype": "float16",
                                                "weights_sha256": digest.hexdigest()}))
    return (folder / PARAMS_FILE).stat().st_size


def sha256_file(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)


def load(folder: Path, verify: bool) -> None:
    model, _ = polar_jax.load(folder, dtype="float16", verify=verify)
    jax.block_until_ready(jax.tree.leaves(polar_jax.decode.split_model(model)[1]))
    del model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="12 layers of d=2048 in float16: ~1.5 GB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="verify_cost-"))
    try:
        size = write_checkpoint(root / "ckpt", args.layers)
        params = root / "ckpt" / PARAMS_FILE
        runs: dict[str, list[float]] = {"sha256_only": [], "load_verify": [], "load_no_verify": []}
        jobs = {"sha256_only": lambda: sha256_file(params), "load_verify": lambda: load(root / "ckpt", True),
                "load_no_verify": lambda: load(root / "ckpt", False)}
        load_before = os.getloadavg()
        sha256_file(params)  # warm the page cache
        for _ in range(args.repeats):
            for name, job in jobs.items():
                t0 = time.perf_counter()
                job()
                runs[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in runs.items()}
        scale = LLAMA2_7B_BYTES / size
        result = {
            "what": "cost of weights_sha256 verification in polar_jax.load (warm page cache)",
            "device": f"{platform.processor() or platform.machine()}, CPU only ({jax.default_backend()})",
            "cpu_count": os.cpu_count(), "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
            "jax_version": jax.__version__,
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
            "file_bytes": size, "seconds": runs, "median_seconds": med,
            "sha256_GB_per_s": size / med["sha256_only"] / 1e9,
            "verify_overhead_seconds": med["load_verify"] - med["load_no_verify"],
            "verify_overhead_fraction": (med["load_verify"] - med["load_no_verify"]) / med["load_no_verify"],
            "extrapolated_7b_float16": {
                "note": "linear in bytes from the measured file (not measured on a 7B file)",
                "bytes": LLAMA2_7B_BYTES,
                "sha256_seconds": med["sha256_only"] * scale,
                "verify_overhead_seconds": (med["load_verify"] - med["load_no_verify"]) * scale,
                "load_no_verify_seconds": med["load_no_verify"] * scale,
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
