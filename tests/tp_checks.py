"""Tensor-parallel checks, run by tests/test_tensor_parallel.py in a subprocess with 4 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax starts, so the other tests
keep their single device). `python tests/tp_checks.py CHECK [ARGS]`; exits non-zero on a failed check.

Each model's check loads it twice (plain, and straight onto a (1, 4) mesh), checks the sharded loader, then
compares greedy tokens on meshes (1, 4), (2, 2), (4, 1) with one device's: dense, sparse with global top-k
heads, sparse with balanced top-k. The model loaded onto the mesh runs the (1, 4) comparisons, so its
placement is checked by the tokens it generates and no program is compiled twice."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import polar_jax
from polar_jax import tensor_parallel as tp
from polar_jax.checkpoint import flat_params, model_from_tensors, resolve_dtype
from polar_jax.models.collect import forward_with_stats
from polar_jax.selection import MLPSelection
from polar_jax.sharding import TENSOR, device_bytes, make_mesh, mesh_shape, param_placer, param_spec
from polar_jax.sparse_decode import sparse_selector

MESHES = ((1, 4), (2, 2), (4, 1))  # (data, tensor)
NEW = 6
PROMPTS = ("The meaning of life is", "KING RICHARD :", "The album was released")  # 3 rows: "data" = 2 or 4 pads the batch


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        raise AssertionError(f"{what}: sharded tokens differ from one device\n{got}\n{want}")
    print(f"ok {what}", flush=True)


def _differs(a: np.ndarray, b: np.ndarray, what: str) -> None:
    # a comparison only proves something when the two rules compute different things
    if np.array_equal(a, b):
        raise AssertionError(f"{what}: the tokens are equal (the rule did not act)")


# ---- the loader ------------------------------------------------------------------------------------------
def check_placement(name: str, model: Any, mesh: Any) -> None:
    """Every device holds exactly its share of each parameter (tensors with a sharded axis split `tensor`
    ways, the rest replicated), never a whole sharded tensor."""
    tensor = mesh_shape(mesh)[1]
    params = flat_params(model)
    want = 0
    n_split = 0
    for pname, arr in params.items():
        split = any(a is not None for a in param_spec(pname, arr.ndim))
        n_split += split
        share = arr.nbytes // tensor if split else arr.nbytes
        for s in arr.addressable_shards:
            if s.data.nbytes != share:
                raise AssertionError(f"{name} {pname}: device {s.device} holds {s.data.nbytes} bytes, "
                                     f"its share is {share}")
        want += share
    per_device = device_bytes(params)
    total = sum(a.nbytes for a in params.values())
    if set(per_device) != set(mesh.devices.flat) or set(per_device.values()) != {want}:
        raise AssertionError(f"{name}: per-device bytes {per_device}, expected {want} on each device")
    if n_split < 6 * model.config.num_layers or not want < 0.6 * total:
        raise AssertionError(f"{name}: {want} bytes per device of {total} ({n_split} split tensors): "
                             "the weights are not split")
    print(f"ok loader {name}: {want} of {total} bytes on each device", flush=True)


class _Recording:
    """A checkpoint tensor that records which parts of it are read (indexing is how the placer reads)."""

    def __init__(self, name: str, arr: np.ndarray, log: dict[str, list]):
        self.name, self._arr, self._log = name, arr, log
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        part = np.asarray(self._arr[index])
        self._log.setdefault(self.name, []).append(part.size)
        return part

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self._log.setdefault(self.name, []).append(-1)  # a whole read
        return np.asarray(self._arr, dtype)


def check_slice_reads(name: str, cfg: Any, get: Callable[[str], np.ndarray], mesh: Any) -> None:
    """Streaming onto the mesh reads each sharded tensor slice by slice: every read of it is 1/tensor of it
    (one per device), never the whole tensor."""
    tensor = mesh_shape(mesh)[1]
    log: dict[str, list] = {}
    model_from_tensors(cfg, lambda n: _Recording(n, get(n), log), resolve_dtype("float32", cfg), param_placer(mesh))
    split = 0
    for pname, sizes in log.items():
        full = int(np.prod(get(pname).shape))
        if any(param_spec(pname, get(pname).ndim)):
            split += 1
            if sizes != [full // tensor] * mesh.size:
                raise AssertionError(f"{name} {pname}: reads of {sizes} elements, expected {mesh.size} of "
                                     f"{full // tensor} (its size {full} / {tensor})")
        elif -1 in sizes:
            raise AssertionError(f"{name} {pname}: read whole through __array__, not by slices")
    if split < 6 * cfg.num_layers:
        raise AssertionError(f"{name}: only {split} tensors were read as shards")
    print(f"ok slice reads {name}: {split} sharded tensors read 1/{tensor} per device", flush=True)


# ---- tokens --------------------------------------------------------------------------------------------------
def check_tokens(model: Any, on_mesh: Any, prompts: list, sparse_kw: dict, name: str,
                 selector_for: Callable[[int], Any], meshes: tuple = MESHES) -> None:
    """Greedy tokens on each mesh equal one device's: dense, sparse with global top-k heads, and sparse
    with balanced top-k (whose one-device reference runs the balanced rule with the same shard count).
    `on_mesh`: the model loaded straight onto the (1, 4) mesh, which runs that mesh's comparisons."""
    dense = polar_jax.generate(model, prompts, NEW)
    sparse = polar_jax.generate(model, prompts, NEW, head_topk="global", **sparse_kw)
    _differs(sparse, dense, f"{name} sparse vs dense")
    balanced_ref: dict[int, np.ndarray] = {}
    for data, tensor in meshes:
        mesh = make_mesh(tensor=tensor, data=data)
        m = on_mesh if (data, tensor) == (1, 4) else model
        label = f"mesh ({data},{tensor})"
        _same(polar_jax.generate(m, prompts, NEW, mesh=mesh), dense, f"{name} dense {label}")
        _same(polar_jax.generate(m, prompts, NEW, mesh=mesh, head_topk="global", **sparse_kw), sparse,
              f"{name} sparse global top-k {label}")
        if tensor > 1:
            if tensor not in balanced_ref:
                balanced_ref[tensor] = polar_jax.generate(model, prompts, NEW, selector=selector_for(tensor))
                _differs(balanced_ref[tensor], sparse, f"{name} balanced ({tensor} shards) vs global top-k")
            _same(polar_jax.generate(m, prompts, NEW, mesh=mesh, head_topk="balanced", **sparse_kw),
                  balanced_ref[tensor], f"{name} sparse balanced top-k {label}")


def _shard_unions(selector: Any, mesh: Any, cfg: Any, layer: int, x: jax.Array, live: jax.Array,
                  programs: dict) -> list:
    """Each shard's MLP union (neuron ids of the whole layer), computed inside the shard_map. `programs`
    keeps one compiled program per layer (an eager shard_map runs op by op: slow)."""
    tensor = mesh_shape(mesh)[1]
    per = cfg.intermediate_size // tensor

    def run(sel, x, live):
        got = tp.for_shard(sel, mesh, cfg).mlp(layer, x, live)
        if got.idx.shape[0] > per:  # the shard's slots are at most its own neurons
            raise AssertionError(f"a shard returned {got.idx.shape[0]} slots for {per} neurons")
        return jnp.pad(got.idx, (0, per - got.idx.shape[0]))[None], got.n_active[None]

    specs = tp.selector_specs(selector)
    if layer not in programs:
        programs[layer] = jax.jit(tp.on_mesh(run, mesh, (specs, P("data"), P("data")), (P(TENSOR), P(TENSOR))))
    idx, n = programs[layer](selector, x, live)
    return [np.asarray(idx[s])[: int(n[s])] + s * per for s in range(tensor)]


def check_mlp_union_per_shard(model: Any, selector: Any, mesh: Any, router_inputs: jax.Array) -> None:
    """The MLP union under tensor parallelism is computed per shard on that shard's router columns, and is
    the one-device union cut to the shard's neurons (`router_inputs` [L, b, d]: real hidden states, whose
    unions fit the calibrated capacity). When a union overflows the capacity (random inputs), the shards
    keep a superset of what one device keeps. Rows that only pad the batch to a multiple of "data" are
    dropped before the union (the selector sees the real batch size)."""
    data, tensor = mesh_shape(mesh)
    cfg = model.config
    per = cfg.intermediate_size // tensor
    if not tp.shards_own_union(selector, tensor):
        raise AssertionError("the threshold-rule router selector does not compute its union per shard")
    specs = tp.selector_specs(selector)
    layers = [i for i, b in enumerate(selector.mlp_b) if b is not None]
    by_neuron = P(None, TENSOR) if selector.mlp_b_layout == "rn" else P(TENSOR, None)
    if not layers or any(specs.mlp_b[i] != by_neuron for i in layers):
        raise AssertionError(f"the MLP router's second matrix is not split by neurons: {specs.mlp_b}")
    b = router_inputs.shape[1]
    live = jnp.asarray(np.arange(b) != 1)
    noise = jnp.asarray(np.random.default_rng(1).normal(size=(b, cfg.hidden_size)), jnp.float32)
    overflowed, programs = 0, {}
    for layer in layers:
        want = selector.mlp(layer, router_inputs[layer], live)
        ids = np.asarray(want.idx)[: int(want.n_active)]
        if not 0 < ids.size < want.idx.shape[0]:
            raise AssertionError(f"layer {layer}: a union of {ids.size} of {want.idx.shape[0]} slots tests nothing")
        for s, got in enumerate(_shard_unions(selector, mesh, cfg, layer, router_inputs[layer], live, programs)):
            mine = np.sort(ids[(ids >= s * per) & (ids < (s + 1) * per)])
            if not np.array_equal(got, mine):
                raise AssertionError(f"layer {layer} shard {s}: union {got}, expected {mine}")
        full = selector.mlp(layer, noise, live)
        one = set(np.asarray(full.idx)[: int(full.n_active)].tolist())
        sharded = set(np.concatenate(_shard_unions(selector, mesh, cfg, layer, noise, live, programs)).tolist())
        overflowed += len(sharded) > len(one)
        if not one <= sharded:
            raise AssertionError(f"layer {layer}: an overflowing union kept {sorted(one - sharded)} on one "
                                 "device and not on the shards")
    if not overflowed:
        raise AssertionError("no union overflowed its capacity: the superset property was not exercised")
    print(f"ok MLP union per shard on {tensor} shards ({len(layers)} layers, {overflowed} overflowing)", flush=True)

    class Probe:  # says how many rows it was given (a "dense" answer, passed through uncut)
        def mlp(self, layer, x, live):
            return MLPSelection(jnp.zeros((1,), jnp.int32), jnp.int32(x.shape[0]), dense=True)

    def seen(x, live):
        return tp.for_shard(Probe(), mesh, cfg, rows=b - 1).mlp(1, x, live).n_active[None]

    got = tp.on_mesh(seen, mesh, (P("data"), P("data")), P(TENSOR))(noise, live)
    if set(np.asarray(got).tolist()) != {b - 1}:
        raise AssertionError(f"the selector saw {np.asarray(got)} rows, the real batch is {b - 1}")
    print("ok padding rows dropped from the MLP union", flush=True)


# ---- the checks ------------------------------------------------------------------------------------------------
def check_default() -> None:
    from convert.safetensors_io import SafetensorsFile
    from polar_jax.checkpoint import DEFAULT_MODEL_DIR, PARAMS_FILE

    mesh = make_mesh(tensor=4)
    model, tok = polar_jax.load("default")
    on_mesh, _ = polar_jax.load("default", mesh=mesh)
    check_placement("default", on_mesh, mesh)
    weights = SafetensorsFile(DEFAULT_MODEL_DIR / PARAMS_FILE)
    check_slice_reads("default", model.config, weights.get, mesh)
    prompts = [tok.encode(p) for p in PROMPTS]
    kw = dict(sparsity="default", policy="both", attn_density=0.5)

    def balanced(tensor: int) -> Any:
        return sparse_selector(model, "default", len(prompts), 64, attn_density=0.5, policy="both", balance=tensor)

    _, stats = forward_with_stats(model, jnp.asarray([prompts[0][:4], prompts[2][:4]]))
    router_inputs = stats["router_input"].reshape(model.config.num_layers, 8, -1)[:, 2:6]  # [L, 4, d]
    check_mlp_union_per_shard(model, balanced(1), make_mesh(tensor=2, data=2), router_inputs)
    check_tokens(model, on_mesh, prompts, kw, "default", balanced)
    # the step-by-step path (prefill + decode_step with the mesh) gives the same tokens
    want = polar_jax.generate(model, prompts, NEW, head_topk="global", **kw)
    got = np.stack(list(polar_jax.generate_stream(model, prompts, NEW, mesh=make_mesh(tensor=2, data=2),
                                                  head_topk="global", **kw)), 1)
    _same(got, want, "default generate_stream sparse (2,2)")


def check_llama(path: str, tests_dir: str) -> None:
    from convert.hf import HFReader

    sys.path.insert(0, tests_dir)
    from test_routers_bundle import random_bundle  # the random GQA bundle of the router tests

    mesh = make_mesh(tensor=4)
    model, _ = polar_jax.load_hf(path, dtype="float32")
    on_mesh, _ = polar_jax.load_hf(path, dtype="float32", mesh=mesh)
    check_placement("tiny-llama", on_mesh, mesh)
    reader = HFReader(path)
    check_slice_reads("tiny-llama", reader.config, reader.get, mesh)
    bundle = random_bundle(model)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, model.config.vocab_size, n)) for n in (5, 9, 3)]
    kw = dict(sparsity=bundle, policy="heads", attn_density=0.5)

    def balanced(tensor: int) -> Any:
        return sparse_selector(model, bundle, len(prompts), 64, attn_density=0.5, policy="heads", balance=tensor)

    # data parallelism alone, (4, 1), has nothing GQA-specific: the default model's check covers it
    check_tokens(model, on_mesh, prompts, kw, "tiny-llama", balanced, meshes=((1, 4), (2, 2)))


if __name__ == "__main__":
    if len(jax.devices()) != 4:
        sys.exit(f"needs 4 devices, got {jax.devices()}")
    check, *rest = sys.argv[1:]
    {"default": check_default, "llama": check_llama}[check](*rest)
    print("ALL OK", Path(__file__).name, check)
