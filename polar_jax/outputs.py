"""Safe output folders: what `convert`, `collect`, `train-routers` and `calibrate` write never costs data.

Rules, in one place for every writer:
- the output may not be an input or contain one (paths resolved, symlinks followed, also the targets of the
  symlinked files inside an input folder);
- an existing non-empty folder is replaced only with `overwrite`, and only if it is itself an output of the
  same kind (its marker file says so): any other folder is refused. Files a user added to an output (notes,
  plots) are not the output's: they are moved into the new output, not deleted;
- everything is written to a temporary folder beside the target and renamed over it at the end, so an
  interrupted run leaves the old output (or nothing) under the target's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from polar_jax.errors import InputError, PolarError


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of folder polar-jax writes, recognised by its marker file."""

    what: str  # for messages: "polar-jax checkpoint", "sparsity bundle", ...
    marker: str  # file name of the marker (a JSON object)
    format: str  # its "format" value
    owns: Callable[[str], bool]  # True for the names of the entries this kind writes
    error: type[PolarError] = InputError  # what a refused output raises

    def is_output(self, folder: Path) -> bool:
        try:
            meta = json.loads((folder / self.marker).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("format") == self.format


def _resolved_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Each input resolved, plus the resolved targets of the entries of an input folder (an HF cache
    snapshot holds symlinks to blobs elsewhere)."""
    out = []
    for p in inputs:
        p = Path(p)
        if not p.exists():
            continue
        out.append(p.resolve())
        if p.is_dir():
            out.extend(child.resolve() for child in p.iterdir())
    return out


def check_target(out: str | Path, kind: OutputKind, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """The resolved output path, or `kind.error` when writing there could lose data."""
    target = Path(out).resolve()
    for inp in _resolved_inputs(inputs):
        if inp == target:
            raise kind.error(f"output {out} is the input {inp}: choose another output folder")
        if inp.is_relative_to(target):
            raise kind.error(f"output {out} contains the input {inp}: choose another output folder")
    if not target.exists():
        return target
    if not target.is_dir():
        raise kind.error(f"output {out} exists and is not a folder")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    if not overwrite:
        raise kind.error(f"output {out} already exists: pass --overwrite (API: overwrite=True) to replace it")
    if not kind.is_output(target):
        raise kind.error(f"output {out} is not empty and is not a {kind.what} (no {kind.marker} marker): "
                         "refusing to replace it")
    return target


def replace_folder(tmp: Path, target: Path, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Moves the finished `tmp` to `target`, replacing the old output only once the new one is complete; the
    old output's entries for which `keep(name)` is true are moved into the new one. If this is interrupted
    after the swap, whatever was not moved yet stays in a hidden `.NAME.old-*` folder beside the target."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old = old_root / target.name
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the old output back
        raise
    for entry in old.iterdir():
        if keep(entry.name) and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)
    if not any(keep(e.name) for e in old.iterdir()):
        shutil.rmtree(old_root)


@contextlib.contextmanager
def atomic_folder(out: str | Path, kind: OutputKind, inputs: Iterable[str | Path] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `out` to write into; on success it replaces `out` (checked with
    `check_target`, again at the end), on any exception it is removed and `out` is left as it was."""
    inputs = list(inputs)
    target = check_target(out, kind, inputs, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an output is readable like any folder
        check_target(out, kind, inputs, overwrite)  # the target may have changed while we wrote
        replace_folder(tmp, target, keep=lambda name: not kind.owns(name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
