"""How many Pallas kernels a function launches, by name, from its jaxpr (no GPU needed).

A lowered module shows a jitted kernel wrapper once however many layers call it, and XLA's own kernels are
only known after compilation; the jaxpr, walked into every nested jit, loop and branch where it is called,
counts each Pallas launch of the traced code. Two calls that XLA later merges (the same product traced by
both routers, removed by common-subexpression elimination) count twice here.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def pallas_launches(fn: Callable[..., Any], *args: Any) -> collections.Counter:
    """Counter of kernel name -> Pallas calls in `fn(*args)`'s jaxpr, each nested body counted per call."""
    return launches_in(jax.make_jaxpr(fn)(*args))


def launches_in(closed: Any) -> collections.Counter:
    """The same for a jaxpr already traced (e.g. `jax.jit(f).trace(...).jaxpr`); a loop body counts once."""
    found: collections.Counter = collections.Counter()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                info = eqn.params.get("name_and_src_info")
                found[getattr(info, "name", None) or eqn.params.get("name") or "pallas_call"] += 1
                continue
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr if hasattr(closed, "jaxpr") else closed)
    return found
