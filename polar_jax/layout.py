"""What a converted polar-jax checkpoint folder holds: file names, the format marker, and every parameter's
name and shape (shared by the loader, polar_jax/checkpoint.py, and the converter, convert/)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from polar_jax.config import ModelConfig
from polar_jax.errors import CheckpointError
from polar_jax.models import abstract_model
from polar_jax.outputs import OutputKind
from polar_jax.tokenizer import TOKENIZER_FILES

FORMAT = "polar-jax"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
META_FILE = "polar_jax.json"
CONFIG_FILE = "config.json"

CHECKPOINT_OUTPUT = OutputKind(
    what="polar-jax checkpoint", marker=META_FILE, format=FORMAT,
    owns=lambda name: name in (PARAMS_FILE, META_FILE, CONFIG_FILE, *TOKENIZER_FILES), error=CheckpointError,
)


def path_name(path: tuple) -> str:
    """The dotted name of a parameter's path in the module tree ("layers.0.attn.q")."""
    return ".".join(str(p) for p in path)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape in checkpoint order, from the module structure (nothing allocated)."""
    _, state = nnx.split(abstract_model(cfg))
    return {path_name(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


def hash_tensor(digest, name: str, arr: np.ndarray) -> None:
    """Adds one stored tensor to a checkpoint's `weights_sha256`: its name, then its bytes as stored, tensors
    in file order (the converter writes the hash this way and the loader checks it this way)."""
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
