"""The floating-point dtypes a checkpoint can be stored or computed in: the one table the config reader, the
loader and the converter share."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from polar_jax.errors import CheckpointError, PolarError

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DTYPE_NAMES = tuple(DTYPES)


def dtype_name(value: object, what: str = "dtype", error: type[PolarError] = CheckpointError) -> str:
    """The canonical name of a supported dtype ("torch.float16" and "float16" are the same); else `error`."""
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise error(f"unsupported {what} {value!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return name
