"""Several processes (hosts) as one JAX program: `jax.distributed` set up from command-line flags.

`polar-jax generate/bench ... --coordinator HOST:PORT --num-processes N --process-id I` runs the same
command in N processes (one per host, or several on one host with fake CPU devices); process I calls
`jax.distributed.initialize` before JAX touches a device, after which `jax.devices()` lists the devices
of every process and a mesh (`polar_jax.sharding.make_mesh`) can span them. Collectives between processes
are XLA's (NCCL on GPUs, Gloo on CPUs): nothing here moves data. Every process loads only the weight slices
of its own devices and ends with the whole result (`decode._host_array`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from polar_jax.errors import InputError

FLAGS = ("--coordinator", "--num-processes", "--process-id")


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator; set with --num-processes and --process-id")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes run this command")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes-1")


def config_from_args(args: argparse.Namespace) -> DistributedConfig | None:
    """The flags checked together (all three or none); None when none is given."""
    given = [getattr(args, n, None) for n in ("coordinator", "num_processes", "process_id")]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise InputError(f"{', '.join(FLAGS)} go together: give all three or none")
    coordinator, n, i = given
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if n < 1:
        raise InputError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise InputError(f"--process-id must be in 0 .. {n - 1}, got {i}")
    return DistributedConfig(str(coordinator), int(n), int(i))


def initialize(cfg: DistributedConfig | None) -> bool:
    """Starts (or joins) the distributed runtime; must run before any JAX computation. Returns whether it
    did (False without a config)."""
    if cfg is None:
        return False
    import jax

    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
    return True


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the distributed flags with their values, everything else): for sub-commands that own their flags
    (`bench decode`)."""
    ours, rest = [], []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in FLAGS:
            ours.append(a)
            if "=" not in a and i + 1 < len(argv):
                ours.append(argv[i + 1])
                next(it, None)
        else:
            rest.append(a)
    return ours, rest
