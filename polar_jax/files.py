"""Reading the files a user points polar-jax at, with one clear error for each way they can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polar_jax.errors import CheckpointError, InputError, PolarError


def read_json(path: str | Path, error: type[PolarError] = CheckpointError) -> dict[str, Any]:
    """The JSON object stored in `path`; `error` if it is missing, unreadable, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing" if not path.exists() else f"{path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def read_text(path: str | Path) -> str:
    """The contents of a UTF-8 text file; InputError for a missing path, a folder, binary data or another
    encoding (scoring binary data as text would give a meaningless number)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"text file {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"text file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read text file {path}: {e}") from None
    if b"\x00" in data:
        raise InputError(f"{path} is not a text file (it contains NUL bytes: binary data?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None
