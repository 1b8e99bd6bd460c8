"""Where a decode step's GPU time goes: CUPTI kernel records mapped to the step's parts.

The model code runs each part of a layer under a named scope (`polar_jax.models.base.SCOPES`), so the
optimised HLO of the step names the scope of every fusion and library call in its op metadata. A
kernel record (name, duration) is mapped back to its HLO instruction by name, then to a part:
attention projections, attention (cache append + the attention kernel), MLP, router + selection, or
other (embedding, norms, residual adds, LM head, sampling). Pallas kernels are named by their op.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable

import jax

from polar_jax.models.base import SCOPE_PARTS, SCOPES

PARTS = ("attn_proj", "attention", "mlp", "router", "other")
_SCOPE_PART = {SCOPES[key]: part for key, part in SCOPE_PARTS.items()}
# Pallas kernels are named by their op, not by an HLO instruction. The dense GEMVs serve the attention projections,
# the MLP and the routers' first product, so each is named after the part it belongs to (gemv_<layout>_<part>:
# `models.base.part_scope` for the model's projections, the router's own label for its product); an unlabelled
# gemv_kn / gemv_nk (files written before 2026-12-08, where all of them sit in "other") stays "other".
# `unit_top_k` is the heads' selection (the decode step uses it for nothing else), and `kv_append` the cache
# update, which the attention part's scope holds wherever XLA does it. With the MLP selection in attention's launches
# (`select_decode_mask`, `select_decode_finish_compact`: sparsify.OVERLAP_MLP_SELECTION) one kernel does both parts'
# work and is counted as attention; likewise `gemv_multi_router` (the routers' first product in the Q/K/V launch:
# sparsify.FIRST_PRODUCT_IN_QKV) is counted as attention projections. What the router then adds is the step's
# difference in a same-process A/B.
_GEMV_LABEL = re.compile(r"gemv_(?:kn|nk)_(\w+)")
_KERNEL_PART = (("union_", "router"), ("unit_top_k", "router"), ("select_decode", "attention"),
                ("kv_append", "attention"), ("gather_", "mlp"), ("gemv_multi", "attn_proj"), ("gemv_rows", "attn_proj"))
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}')
_FIELD = re.compile(r'(\w+)="([^"]*)"')


class Cupti:
    """Kernel records (name, ms) of everything launched inside the block. Unlike
    `profiler.measure`, it does not call the function again, so donated buffers are fine."""

    def __enter__(self) -> "Cupti":
        self.records: list[tuple[str, float]] = []
        self.ext = None
        if jax.devices()[0].platform == "gpu":
            from jax.experimental.mosaic.gpu import profiler

            self.ext = profiler.mosaic_gpu_lib._mosaic_gpu_ext
            self.ext._cupti_init()
        return self

    def __exit__(self, *exc) -> bool:
        if self.ext is not None:
            self.records = [(str(k), float(ms)) for k, ms in self.ext._cupti_get_timings(True)]
        return False


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name (and deduplicated name) -> its op_name metadata."""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        fields = dict(_FIELD.findall(m.group(2)))
        op = fields.get("op_name", "")
        out.setdefault(m.group(1), op)
        for key in ("deduplicated_name", "scheduling_name"):
            if key in fields:
                out.setdefault(fields[key], op)
    return out


def _candidates(kernel: str) -> Iterable[str]:
    """HLO names a kernel name may come from: XLA names kernels after instructions with '.' -> '_'."""
    yield kernel
    parts = kernel.split("_")
    for j in range(len(parts) - 1, 0, -1):
        if not parts[j].isdigit():
            break
        yield "_".join(parts[:j]) + "." + ".".join(parts[j:])
    base = re.sub(r"(__\d+)+$", "", kernel)
    if base != kernel:
        yield from _candidates(base)


def part_of(kernel: str, scopes: dict[str, str]) -> str:
    for prefix, part in _KERNEL_PART:
        if kernel.startswith(prefix):
            return part
    labelled = _GEMV_LABEL.fullmatch(kernel)
    if labelled and labelled.group(1) in PARTS:
        return labelled.group(1)
    for name in _candidates(kernel):
        op = scopes.get(name)
        if op is None:
            continue
        for scope, part in _SCOPE_PART.items():
            if scope in op:
                return part
        return "other"
    return "other"


def _parts(records: list[tuple[str, float]], scopes: dict[str, str]) -> list[str]:
    """The part of every record, in launch order."""
    parts, prev_name, prev_part = [], "", "other"
    for name, _ in records:
        part = part_of(name, scopes)
        if part == "other" and prev_name.startswith(("gemm_fusion", "cublas", "nvjet")) and prev_part != "other":
            # XLA's split-K GEMMs sum their partials in a separate reduction kernel whose HLO op carries no
            # scope (its metadata is the bare reduce): it belongs to the GEMM launched just before it
            part = prev_part
        parts.append(part)
        prev_name, prev_part = name, part
    return parts


def breakdown(records: list[tuple[str, float]], scopes: dict[str, str], steps: int) -> dict[str, float]:
    """Milliseconds per step of each part (and `total`, `kernels` per step)."""
    out = collections.Counter({p: 0.0 for p in PARTS})
    for (_, ms), part in zip(records, _parts(records, scopes)):
        out[part] += ms
    res = {p: out[p] / steps for p in PARTS}
    res["total"] = sum(res[p] for p in PARTS)
    res["kernels"] = len(records) / steps
    return res


def kernel_stem(name: str) -> str:
    """A kernel's name without XLA's instance numbers (`loop_add_fusion_64__2` -> `loop_add_fusion`), so the
    same fusion in every layer counts as one kind."""
    return re.sub(r"(_\d+)+$", "", re.sub(r"(__\d+)+$", "", name)) or name


def kernel_table(records: list[tuple[str, float]], scopes: dict[str, str], steps: int,
                 top: int = 40) -> list[dict]:
    """The kinds of kernel a step launches, most time first: stem, part, launches and ms per step (the
    per-kernel view that says which small kernels to fuse away)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for (name, ms), part in zip(records, _parts(records, scopes)):
        a = acc.setdefault((kernel_stem(name), part), [0, 0.0])
        a[0] += 1
        a[1] += ms
    rows = [{"kernel": k, "part": p, "per_step": n / steps, "ms_per_step": t / steps} for (k, p), (n, t) in acc.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


def part_ms(kernels: list[dict], part: str) -> float:
    """Milliseconds per step of one part from a `kernel_table`, with each Pallas kernel's part re-derived
    from its name, so files written before a name was mapped (`unit_top_k` sat in "other") read the same
    as new ones."""
    total = 0.0
    for k in kernels:
        named = part_of(k["kernel"], {})
        total += k["ms_per_step"] if (k["part"] if named == "other" else named) == part else 0.0
    return total
