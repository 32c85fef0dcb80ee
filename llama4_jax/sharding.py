"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (`abstract_params(config, boxed=True)`):
vocab, embed, q_heads, kv_heads, head_dim, mlp, expert, expert_mlp, router, norm,
layers. Activations and the KV cache use batch, length and cache_seq. A `Rules` table
maps each logical name to zero or more mesh axes; changing the table (and the mesh)
changes how the model runs, never the model code:

    mesh = make_mesh("data=2,expert=2,tensor=2")
    rules = default_rules(mesh)               # or fsdp_rules(mesh), or your own
    shardings = param_shardings(config, mesh, rules)
    logits = forward(config, jax.device_put(params, shardings), ids, mesh=mesh, rules=rules)

Mesh axis names are data, fsdp, expert, tensor and seq:
  * data: batch split, weights replicated;
  * fsdp: batch split, weights split along their `embed` dimension and gathered per
    layer when used (ZeRO-3 style);
  * expert: routed experts split (the `ep` MoE dispatches tokens with all-to-all);
    outside the MoE the batch is split over it too (data-parallel attention);
  * tensor: attention heads, KV heads, MLP and expert FFN widths, vocabulary;
  * seq: sequence (context) parallelism for activations and the KV cache.

Resolution rules (`Rules.spec`): a mesh axis may appear at most once in one array's
spec (a collision is an error naming both logical axes); a dimension that the mapped
mesh axes do not divide keeps only the axes that do (greedily, in rule order), and for
a parameter of at least `WARN_REPLICATED_BYTES` that fallback is reported with a
warning, so large weights are never replicated silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import warnings
from typing import Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "AXIS_NAMES", "LOGICAL_AXES", "Rules", "ShardingError", "parse_mesh_spec", "make_mesh", "abstract_mesh",
    "default_rules", "fsdp_rules", "param_specs", "param_shardings", "shard_params", "cache_shardings",
    "activate", "active", "splits", "constrain", "batch_sharding", "splits_experts", "call_on_mesh", "OutAxes", "CACHE_AXES",
    "WARN_REPLICATED_BYTES", "SlotShards", "slot_shards", "slot_axes", "slot_parallel",
]

AXIS_NAMES = ("data", "fsdp", "expert", "tensor", "seq")
# Parameter axes (from the model) and activation / cache axes (used by `constrain`).
# The vision tower's patch/position tables and the adapter (~0.03B parameters in
# Scout) have axes the default rules leave replicated: adapter fc1 already splits its
# input (vision_mlp) over tensor, so its output cannot use tensor too.
PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "expert", "expert_mlp", "router",
              "norm", "layers", "vision_embed", "vision_heads", "vision_mlp", "vision_patch", "vision_pos",
              "adapter", "adapter_out")
ACTIVATION_AXES = ("batch", "length", "cache_seq")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
# KV-cache leaves (see llama4_jax.cache): k [G, B, K, d, S], v [G, B, K, S, d], pos [G, B, S].
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "pos": ("layers", "batch", "cache_seq"),
    "k_scale": ("layers", "batch", "kv_heads", "cache_seq"),  # int8 cache
    "v_scale": ("layers", "batch", "kv_heads", "cache_seq"),
}
# A parameter this large whose rule cannot be applied (a dimension the mesh axes do not
# divide) triggers a warning: 1 MiB is far above every norm/router and far below any
# weight whose replication matters.
WARN_REPLICATED_BYTES = 1 << 20


class ShardingError(ValueError):
    """A mesh spec or rules table that cannot be used as asked."""


# --------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str | Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """"data=2,expert=4" (or a dict) -> (("data", 2), ("expert", 4)), validated.

    Axis names must be among `AXIS_NAMES`, each at most once, sizes positive integers.
    """
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            name, eq, size = part.partition("=")
            if not eq:
                raise ShardingError(f"mesh spec {spec!r}: expected 'axis=size' entries, found {part!r}")
            items.append((name, size))
    if not items:
        raise ShardingError(f"mesh spec {spec!r} names no axes; expected e.g. 'data=2,expert=4'")
    out, seen = [], set()
    for name, size in items:
        if name not in AXIS_NAMES:
            raise ShardingError(f"mesh spec {spec!r}: unknown axis {name!r}; axis names are {AXIS_NAMES}")
        if name in seen:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except (TypeError, ValueError):
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} must be an integer, found {size!r}") from None
        if n < 1:
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} must be >= 1, found {n}")
        seen.add(name)
        out.append((name, n))
    return tuple(out)


def make_mesh(spec: str | Mapping[str, int], *, devices: Sequence | None = None, explicit: bool = False) -> Mesh:
    """A device mesh from a spec like "data=2,expert=2,tensor=2".

    The product of the sizes must equal the number of `devices` (default: all of
    `jax.devices()`). Axes are Auto (sharding propagated by the compiler) unless
    `explicit=True`; `forward` accepts both kinds.
    """
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(s for _, s in axes)
    if n != len(devices):
        hint = f"; pass devices=jax.devices()[:{n}] to use a subset" if n < len(devices) else ""
        raise ShardingError(f"mesh spec {spec!r} needs {n} devices, found {len(devices)}{hint}")
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(tuple(s for _, s in axes), tuple(a for a, _ in axes), axis_types=(kind,) * len(axes),
                         devices=devices)


def abstract_mesh(spec: str | Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh of the given shape, for planning (`NamedSharding.shard_shape`)."""
    axes = parse_mesh_spec(spec)
    return AbstractMesh(tuple(s for _, s in axes), tuple(a for a, _ in axes))


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------

def _as_axes(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axes, as data (frozen and hashable: a static jit arg).

    `table` is a tuple of (logical name, tuple of mesh axes); names not in the table
    are replicated. Build one with `Rules.of({...})`, `default_rules(mesh)` or
    `fsdp_rules(mesh)`, and adjust it with `rules.replace(name=axes, ...)`.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        seen = set()
        for name, axes in self.table:
            if name in seen:
                raise ShardingError(f"rules: logical axis {name!r} appears twice")
            seen.add(name)
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rules: logical axis {name!r} maps to a mesh axis twice: {axes}")

    @classmethod
    def of(cls, mapping: Mapping[str, str | Iterable[str] | None]) -> "Rules":
        return cls(tuple((k, _as_axes(v)) for k, v in mapping.items()))

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def replace(self, **overrides) -> "Rules":
        d = self.as_dict()
        d.update({k: _as_axes(v) for k, v in overrides.items()})
        return Rules(tuple(d.items()))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        return self.as_dict().get(name, ()) if name is not None else ()

    def check(self, mesh) -> None:
        """Every mesh axis named by the rules must exist in `mesh`."""
        names = set(mesh.axis_names)
        for logical, axes in self.table:
            missing = [a for a in axes if a not in names]
            if missing:
                raise ShardingError(f"rules map {logical!r} to mesh axes {missing} that the mesh "
                                    f"{dict(_axis_sizes(mesh))} does not have")

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None, *,
             what: str = "array") -> tuple[P, tuple[str, ...]]:
        """PartitionSpec for an array with these logical axes.

        With `shape` and `mesh`, mesh axes that do not divide their dimension are dropped.
        Returns (spec, dropped) where `dropped` describes each fallback ("dim 2 (kv_heads=8)
        not divisible by tensor=16"). Mesh axes of size 1 are left out of the spec. Raises
        `ShardingError` when one mesh axis would shard two dimensions.
        """
        sizes = _axis_sizes(mesh) if mesh is not None else None
        used: dict[str, str] = {}
        parts, dropped = [], []
        for i, name in enumerate(logical):
            axes = self.mesh_axes(name)
            for a in axes:
                if a in used:
                    raise ShardingError(f"{what}: mesh axis {a!r} is mapped from both logical axes "
                                        f"{used[a]!r} and {name!r} (axes {tuple(logical)}); fix the rules")
                used[a] = name
            if sizes is not None:
                axes = tuple(a for a in axes if sizes.get(a, 1) > 1)  # size-1 axes shard nothing
            if shape is not None and sizes is not None:
                kept, prod = [], 1
                for a in axes:
                    if shape[i] % (prod * sizes[a]) == 0:
                        kept.append(a)
                        prod *= sizes[a]
                    else:
                        dropped.append(f"dim {i} ({name}={shape[i]}) not divisible by {a}={sizes[a]}")
                axes = tuple(kept)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while parts and parts[-1] is None:
            parts.pop()
        return P(*parts), tuple(dropped)


def _present(mesh_or_names, *axes: str) -> tuple[str, ...]:
    names = mesh_or_names.axis_names if hasattr(mesh_or_names, "axis_names") else tuple(mesh_or_names)
    return tuple(a for a in axes if a in names)


def default_rules(mesh) -> Rules:
    """Sensible rules for a mesh named with `AXIS_NAMES` (only the axes it has are used).

    batch over data, fsdp and expert; weights' `embed` over fsdp; experts over expert;
    heads, KV heads, MLP and expert widths, the vocabulary and the vision tower's heads
    and MLP over tensor; sequence and KV-cache length over seq.
    """
    ax = lambda *a: _present(mesh, *a)  # noqa: E731
    return Rules.of({
        "batch": ax("data", "fsdp", "expert"),
        "length": ax("seq"),
        "cache_seq": ax("seq"),
        "vocab": ax("tensor"),
        "embed": ax("fsdp"),
        "vision_embed": ax("fsdp"),
        "q_heads": ax("tensor"),
        "kv_heads": ax("tensor"),
        "mlp": ax("tensor"),
        "expert": ax("expert"),
        "expert_mlp": ax("tensor"),
        "vision_heads": ax("tensor"),
        "vision_mlp": ax("tensor"),
    })


def fsdp_rules(mesh) -> Rules:
    """Fully sharded data parallel: every weight split along `embed` over all non-seq axes.

    Batch is split the same way and each layer's weights are all-gathered when used;
    meant for large-batch prefill, where moving weights costs less than moving
    activations. No tensor or expert parallelism (use `moe_impl='ragged'`).
    """
    every = _present(mesh, "data", "fsdp", "expert", "tensor")
    return Rules.of({"batch": every, "embed": every, "vision_embed": every, "length": _present(mesh, "seq"),
                     "cache_seq": _present(mesh, "seq")})


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

def _is_boxed(x) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.Partitioned)


def param_specs(config, mesh, rules: Rules | None = None, *, dtype="bfloat16", warn: bool = True, quantize=None,
                group_size: int | None = None):
    """PartitionSpec tree (same structure as the params) from the params' logical axes.

    quantize / group_size: the tree of `abstract_params(..., quantize=)`; a quantized
    weight's q, scale and offset leaves each get a spec from their own axis names
    (`llama4_jax.quant`: scales follow their weight's output axes, int4 groups its K).
    """
    from .model.text import abstract_params

    rules = default_rules(mesh) if rules is None else rules
    rules.check(mesh)
    boxed = abstract_params(config, dtype=dtype, boxed=True, quantize=quantize, group_size=group_size)

    def one(path, box):
        name = jax.tree_util.keystr(path)
        value = box.value
        spec, dropped = rules.spec(box.names, value.shape, mesh, what=f"parameter {name}")
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        if dropped and warn and nbytes >= WARN_REPLICATED_BYTES:
            warnings.warn(f"parameter {name} {tuple(value.shape)} ({nbytes / 2**20:.1f} MiB) is not split as the "
                          f"rules ask: {'; '.join(dropped)}", stacklevel=3)
        return spec

    return jax.tree_util.tree_map_with_path(one, boxed, is_leaf=_is_boxed)


def param_shardings(config, mesh, rules: Rules | None = None, *, dtype="bfloat16", quantize=None,
                    group_size: int | None = None):
    """NamedSharding tree for the parameters of `config` on `mesh` (default rules if None).

    Works for concrete meshes (to place arrays) and `AbstractMesh`es (for planning);
    quantize / group_size as for `param_specs`.
    """
    specs = param_specs(config, mesh, rules, dtype=dtype, quantize=quantize, group_size=group_size)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, shardings):
    """Place a host (or single-device) parameter tree onto its shardings."""
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def params_mesh(params):
    """The mesh the parameters are sharded over (from their `NamedSharding`s), or None
    when they live on one device or on the host."""
    for leaf in jax.tree_util.tree_leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def resolve_mesh(params, mesh, what: str):
    """The mesh a call runs on: `mesh`, or the parameters' own when `mesh` is None.

    Raises ValueError when `mesh` spans other devices than the parameters (e.g. params
    from a plain `load(path)` with a multi-device mesh): the parameters are not moved
    silently on every call; load them onto the mesh instead.
    """
    own = params_mesh(params)
    if mesh is None:
        return own
    want = set(mesh.devices.flat)
    if own is not None:
        have = set(own.devices.flat)
    else:  # committed arrays (device_put, load) stay where they are; uncommitted ones jit may
        # move, and inside a jit the parameters are tracers, placed by that jit's arguments
        have = {d for leaf in jax.tree_util.tree_leaves(params)[:1]
                if not isinstance(leaf, jax.core.Tracer) and getattr(leaf, "committed", False) for d in leaf.devices()}
    if have and have != want:
        raise ValueError(
            f"{what}: mesh= spans {len(want)} device(s) but the parameters live on {len(have)} other or fewer "
            f"device(s); load them onto the mesh with llama4_jax.load(path, mesh=mesh) (or place them with "
            f"llama4_jax.sharding.shard_params(params, llama4_jax.sharding.param_shardings(config, mesh)))")
    return mesh


def auto_mesh(mesh):
    """`mesh` with every axis Auto (same devices, names and sizes)."""
    if not _explicit_axes(mesh):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def cache_shardings(cache, mesh, rules: Rules | None = None):
    """NamedSharding tree for a KV cache pytree whose leaves are named k, v or pos.

    `cache` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    """
    rules = default_rules(mesh) if rules is None else rules

    def one(path, leaf):
        key = getattr(path[-1], "key", None)
        if key not in CACHE_AXES:
            raise ShardingError(f"cache leaf {jax.tree_util.keystr(path)}: expected a leaf named one of "
                                f"{sorted(CACHE_AXES)}, found {key!r}")
        spec, _ = rules.spec(CACHE_AXES[key], leaf.shape, mesh, what=f"cache {jax.tree_util.keystr(path)}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, cache)


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("llama4_jax_sharding", default=None)


@contextlib.contextmanager
def activate(mesh, rules: Rules | None = None):
    """Make (mesh, rules) the ones `constrain` and the `ep` MoE use while tracing.

    `forward` does this itself; wrap your own `jax.jit`-traced calls of the model
    (e.g. a decode step) in it when running on a mesh.
    """
    rules = default_rules(mesh) if rules is None else rules
    rules.check(mesh)
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh, rules
    finally:
        _ACTIVE.reset(token)


def active():
    """The (mesh, rules) set by `activate`, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def suspended():
    """No active (mesh, rules) inside: for single-device code traced inside `shard_map`."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class SlotShards(NamedTuple):
    """The mesh axes a decode step's cache slots are split over (inside `shard_map`,
    `engine.decode`'s slot_parallel), and how many shards they make."""

    axes: tuple[str, ...]
    count: int


_SLOTS: contextvars.ContextVar = contextvars.ContextVar("llama4_jax_slot_shards", default=None)


@contextlib.contextmanager
def slot_shards(shards: SlotShards):
    """Trace code inside `shard_map` whose cache entries hold this device's share of
    the slots (`slot_axes`): `attention.write_cache` writes only the slots it holds and
    `cached_attention` combines the shards' partial softmaxes."""
    token = _SLOTS.set(shards)
    try:
        yield
    finally:
        _SLOTS.reset(token)


def slot_axes() -> SlotShards | None:
    """The `slot_shards` being traced, or None."""
    return _SLOTS.get()


def slot_parallel(mesh, rules: Rules | None, params) -> SlotShards | None:
    """The slot shards of a run on `mesh` that splits only the KV cache's slots, else None.

    That is (`_splits_only`): `mesh` has more than one device, every axis of more than
    one device is one that `cache_seq` maps to and no other logical axis but `length`
    does (a prompt's tokens; a decode step has one), and every parameter is replicated
    over the mesh's devices. Each device can then run a decode step as single-device
    code over its share of every layer's cache slots (`engine.decode`'s slot_parallel)."""
    rules = default_rules(mesh) if rules is None else rules
    if not _splits_only(mesh, rules, params, "cache_seq", "length"):
        return None
    sizes = _axis_sizes(mesh)
    axes = tuple(a for a in rules.mesh_axes("cache_seq") if sizes.get(a, 1) > 1)
    return SlotShards(axes, math.prod(sizes[a] for a in axes))


def _splits_only(mesh, rules: Rules, params, logical: str, *shared: str) -> bool:
    """`mesh` has more than one device, every axis of more than one device is one that
    `logical` maps to and no other logical axis does (but those in `shared`), and every
    parameter is replicated over the mesh's devices."""
    split = {a for a, n in _axis_sizes(mesh).items() if n > 1}
    others = {a for name in rules.as_dict() if name not in (logical, *shared) for a in rules.mesh_axes(name)}
    devices = set(mesh.devices.flat)
    return (bool(split) and split <= set(rules.mesh_axes(logical)) and not split & others
            and all(getattr(x, "sharding", None) is not None and x.sharding.is_fully_replicated
                    and x.sharding.device_set == devices for x in jax.tree_util.tree_leaves(params)))


def data_parallel(mesh, rules: Rules | None, params) -> bool:
    """Whether a run on `mesh` splits only the batch: `mesh` has more than one device,
    every axis of more than one device is one that `batch` maps to and no other logical
    axis does, and every parameter is replicated over the mesh's devices. Each device
    can then run its own rows as single-device code (`engine.decode`'s `data_parallel`)."""
    return _splits_only(mesh, default_rules(mesh) if rules is None else rules, params, "batch")


def splits(logical: str) -> bool:
    """Whether the active rules (`activate`) split the logical axis over more than one device."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return False
    mesh, rules = ctx
    rules = default_rules(mesh) if rules is None else rules
    sizes = _axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in rules.mesh_axes(logical)) > 1


def constrain(x, logical: Sequence[str | None]):
    """`with_sharding_constraint` of x by logical axes under the active rules (else x).

    Dimensions named None are left to the compiler (unconstrained), so a constraint
    only pins what it names.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec, _ = rules.spec(logical, x.shape, mesh, what="activation")
    parts = [P.UNCONSTRAINED if name is None else (spec[i] if i < len(spec) else None)
             for i, name in enumerate(logical)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(_tracing_mesh(mesh), P(*parts)))


def _tracing_mesh(mesh):
    """The mesh to name in constraints: the context's abstract mesh when one is set
    (inside `auto_axes` of an explicit mesh its axes are Auto), else `mesh`."""
    am = jax.sharding.get_abstract_mesh()
    if am is not None and not am.empty and tuple(am.axis_names) == tuple(mesh.axis_names):
        return am
    return mesh


def batch_sharding(mesh, rules: Rules | None, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a [B, T, ...] input (token ids, masks): batch and length rules."""
    rules = default_rules(mesh) if rules is None else rules
    spec, _ = rules.spec(("batch", "length") + (None,) * (len(shape) - 2), shape, mesh, what="input")
    return NamedSharding(mesh, spec)


def splits_experts(mesh, rules: Rules | None, text_config) -> bool:
    """Whether `rules` split the routed experts of `text_config` evenly over `mesh`
    (then `forward` picks the expert-parallel MoE by default)."""
    rules = default_rules(mesh) if rules is None else rules
    sizes = _axis_sizes(mesh)
    n = math.prod(sizes.get(a, 1) for a in rules.mesh_axes("expert"))
    return bool(text_config.moe_layers) and n > 1 and text_config.num_local_experts % n == 0


def _explicit_axes(mesh) -> tuple[str, ...]:
    types = getattr(mesh, "axis_types", None) or ()
    return tuple(a for a, t in zip(mesh.axis_names, types) if t == jax.sharding.AxisType.Explicit)


class OutAxes(NamedTuple):
    """An output of `call_on_mesh`: its logical axes and shape."""

    axes: tuple
    shape: tuple


def call_on_mesh(fn, mesh, rules: Rules | None, out_axes, *args, **kwargs):
    """Trace fn(*args, **kwargs) with (mesh, rules) active (call it inside `jax.jit`).

    On a mesh with Explicit axes (`jax.make_mesh`'s default in recent jax) the call runs
    inside `jax.sharding.auto_axes`, so the model's ops see Auto axes and the compiler
    propagates shardings as on an Auto mesh; the outputs come back with explicit
    shardings. `out_axes` describes the outputs for that: a pytree whose leaves are
    `OutAxes(logical axes, shape)`, or None for outputs that are None.
    """
    rules = default_rules(mesh) if rules is None else rules
    explicit = _explicit_axes(mesh)
    with activate(mesh, rules):
        if not explicit:
            return fn(*args, **kwargs)

        def out_sharding(leaf):
            if leaf is None:
                return None
            axes, shape = leaf
            return NamedSharding(mesh, rules.spec(axes, shape, mesh, what="output")[0])

        is_leaf = lambda x: x is None or isinstance(x, OutAxes)  # noqa: E731
        shardings = jax.tree_util.tree_map(out_sharding, out_axes, is_leaf=is_leaf)
        return jax.sharding.auto_axes(lambda *a: fn(*a, **kwargs), axes=explicit, out_sharding=shardings)(*args)
