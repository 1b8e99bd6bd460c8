"""Checks of user-given numbers and token ids, in one place for the CLI and the API.

Each numeric setting has one `Limit` in `LIMITS`; the API calls `check(name, value)` and the CLI uses
`arg_type(name)` as the argparse type of the flag, so both refuse the same values with the same words.

Token ids: `check_model_input` is what `model(ids)` runs first. Shapes and dtypes are always checked, and
OPT's position limit too (the sequence length is static). The ids' *values* are checked only when they are
concrete: under `jax.jit` they are not known while tracing, so an id outside the vocabulary gives NaN
logits there instead of an error (check them before the jitted call, as `generate` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import jax
import numpy as np

from polar_jax.config import ModelConfig
from polar_jax.errors import InputError

_TRACER = getattr(jax.core, "Tracer", ())


@dataclasses.dataclass(frozen=True)
class Limit:
    """An integer or a finite number in a range (bounds inclusive unless `*_open`)."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return f"a finite {'integer' if self.kind is int else 'number'}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)):
            return False
        if self.kind is int and not isinstance(value, (int, np.integer)):
            return False
        if self.kind is float and not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Limit(int, 1)
FRACTION = Limit(float, 0.0, 1.0, low_open=True)  # a share of units kept, a recall target

LIMITS: dict[str, Limit] = {
    "batch_size": POSITIVE,
    "seq_len": Limit(int, 2),
    "max_tokens": POSITIVE,
    "max_new_tokens": POSITIVE,
    "chunk_tokens": POSITIVE,
    "temperature": Limit(float, 0.0),
    "top_p": FRACTION,
    "attn_density": FRACTION,
    "mlp_recall": FRACTION,
    "recall": FRACTION,
    "dense_threshold": FRACTION,
    "attn_train_density": FRACTION,
    "val_fraction": Limit(float, 0.0, 1.0, low_open=True, high_open=True),
    "lr": Limit(float, 0.0, low_open=True),
    "weight_decay": Limit(float, 0.0),
    "max_val_tokens": POSITIVE,
    "epochs": POSITIVE,
    "patience": POSITIVE,
    "rank": POSITIVE,
    "attn_hidden": Limit(int, 0),  # hidden width of the attention routers; 0 = linear
    "tile": POSITIVE,
    "batches": POSITIVE,
    "prompts": POSITIVE,
    "prompt_len": POSITIVE,
    "new_tokens": POSITIVE,
    "max_train_tokens": POSITIVE,
    "seed": Limit(int, 0, 2**32 - 1),  # numpy and jax seeds
    "cache_size": POSITIVE,
    "tensor": POSITIVE,  # tensor- and data-parallel degrees (polar_jax.sharding.make_mesh)
    "data": POSITIVE,
    # the decode benchmark (polar-jax bench decode)
    "context": POSITIVE,
    "mlp_density": FRACTION,
    "steps": POSITIVE,
    "repeats": POSITIVE,
    "processes": POSITIVE,
    "bw_bytes": Limit(int, 1024),  # the bandwidth probe: at least one float32 per kB
}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """`value` if it is within `LIMITS[name]`, else InputError naming the setting (`label`, default `name`)."""
    limit = LIMITS[name]
    if not limit.accepts(value):
        raise InputError(f"{label or name} must be {limit.describe()}, got {value!r}")
    return int(value) if limit.kind is int else float(value)


def check_optional(name: str, value: Any, label: str | None = None) -> Any:
    return None if value is None else check(name, value, label)


def arg_type(name: str):
    """An argparse `type` for a flag whose value has `LIMITS[name]` (argparse reports the flag's name)."""
    limit = LIMITS[name]

    def parse(text: str):
        # the message names the API argument too: the same limit applies there
        message = f"{name} must be {limit.describe()}, got {text!r}"
        try:
            value = limit.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(message) from None
        if not limit.accepts(value):
            raise argparse.ArgumentTypeError(message)
        return value

    parse.__name__ = limit.describe()  # argparse names the type in some messages
    return parse


# ---- token ids and positions -------------------------------------------------------------------------
def token_id(value: Any) -> int:
    """One token id: an integer (Python, NumPy, or a 0-d integer array); a float such as 1.5 is refused,
    not truncated."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"token ids must be integers, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer):
        return int(value)
    raise InputError(f"token ids must be integers, got {value!r}")


def position_limit(cfg: ModelConfig) -> int | None:
    """The most positions the model can embed: OPT's learned position table is a hard limit; rotary
    models have none (they extrapolate, as in Hugging Face transformers)."""
    return cfg.max_position_embeddings if cfg.family == "opt" else None


def check_positions(cfg: ModelConfig, needed: int, what: str) -> None:
    """InputError when `needed` positions exceed the model's limit; `what` names the request."""
    limit = position_limit(cfg)
    if limit is not None and needed > limit:
        raise InputError(f"{what} exceeds the model's {limit} positions")


def check_model_input(cfg: ModelConfig, tokens: Any) -> None:
    """What `model(ids)` accepts: integer ids [batch, tokens], no more tokens than the model has positions,
    and (when the values are concrete, i.e. not under jit) every id inside the vocabulary."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or dtype is None or len(shape) != 2:
        raise InputError(f"token ids must be an integer array [batch, tokens], got {type(tokens).__name__} "
                         f"of shape {shape}")
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise InputError(f"token ids must be integers, got dtype {dtype}")
    check_positions(cfg, int(shape[1]), f"a sequence of {shape[1]} tokens")
    if isinstance(tokens, _TRACER):
        return  # under jit the values are not known yet (documented above)
    ids = np.asarray(tokens)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        raise InputError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5].tolist()}")
