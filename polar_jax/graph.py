"""A model's NNX graph as a jit static argument that hashes once.

The jitted steps take the graph (`nnx.split(model)[0]`) as a static argument, so every call hashes it for
jit's cache lookup, and nnx hashes the whole graph in Python each time: ~4 ms for a 32-layer model on a CPU
core, paid per token by a decode loop driven from Python (`generate_stream`, `decode_step` in a user's
loop) and per timed call by the benchmarks. `Graph` computes the hash once and compares by identity first.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    graphdef: Any
    _hash: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash(self.graphdef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, Graph) and self._hash == other._hash and self.graphdef == other.graphdef


def split(model: Any) -> tuple[Graph, Any]:
    """(graph, state) of an NNX module, the graph wrapped for cheap static hashing."""
    graphdef, state = nnx.split(model)
    return Graph(graphdef), state


def merge(graph: Graph | Any, state: Any) -> Any:
    """The module back from `split` (a plain nnx GraphDef is accepted too)."""
    return nnx.merge(graph.graphdef if isinstance(graph, Graph) else graph, state)
