"""Small building blocks: RMSNorm, RoPE, the SwiGLU MLP, parameter helpers.

Dimension letters used throughout the model: B batch, T new tokens (queries),
S keys, D model width, H query heads, K key/value heads, G = H/K query heads per
KV head, d head dim, E experts, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import quant

INIT = nn.initializers.normal(stddev=0.02)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertList:
    """A stacked expert weight [E, ...] held as E separate arrays (or quantized weights).

    The decode parameters on CPU (`views.unstack_layers(split_experts=True)`) take this
    form so a matmul reads a chosen expert's buffer where it lies: slicing w[e] out of
    a stacked array is a copy on XLA:CPU, which cost more than the matmul itself (96 MB
    copied per step at batch 8 in the benchmark model). `moe.rowwise_moe` (decode)
    consumes it; `moe.blocked_moe` takes it too (`generate` prefills from the stacked
    experts, which measured faster).
    """

    parts: tuple

    @classmethod
    def split(cls, w) -> "ExpertList":
        """A stacked [E, ...] weight (array or quantized weight) as its E experts
        (views of its buffers on CPU, `leading_slices`)."""
        E = w.shape[0]
        leaves, treedef = jax.tree_util.tree_flatten(w)
        per_leaf = [leading_slices(x, [(e,) for e in range(E)]) for x in leaves]
        return cls(tuple(treedef.unflatten([s[e] for s in per_leaf]) for e in range(E)))

    @property
    def shape(self) -> tuple:
        return (len(self.parts),) + tuple(self.parts[0].shape)


def viewable(x, k: int) -> bool:
    """Whether x is a concrete array on CPU devices whose first k axes are whole on every device."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    s = x.sharding
    if any(d.platform != "cpu" for d in s.device_set):
        return False
    if isinstance(s, jax.sharding.SingleDeviceSharding):
        return True
    return isinstance(s, jax.sharding.NamedSharding) and all(a is None for a in tuple(s.spec)[:k])


def leading_slices(x, indices: list[tuple[int, ...]]) -> list:
    """[x[i] for i in indices], each i a tuple of k leading indices (the same k for all).

    On CPU these are views of x's buffers: each device's buffer seen as a numpy array,
    its slices handed back to the device in one `device_put`, which XLA:CPU takes
    without copying (an aligned host buffer is aliased). So the CPU decode parameters
    (per-group layers, per-expert weights: `views.unstack_layers`) take no memory of their
    own: the benchmark model's, replicated on 2 CPU devices, take 11 ms (36 ms with
    per-expert arrays: ~30 us per array made) where the copy took 46 ms per `generate`
    call and held a second copy of the layer weights (peak RSS of the mixed benchmark
    2368 -> 1856 MiB).
    Elsewhere (other devices, tracers, a leading axis split over devices) they are
    slices, i.e. copies. Views keep x's buffers alive, not the array x itself (so a
    finalizer on x still runs when x is dropped); x must not be donated while they
    live (parameters never are by `generate`).
    """
    k = len(indices[0]) if indices else 0
    if not indices or not viewable(x, k):
        return [x[i] for i in indices]
    shards = x.addressable_shards
    # Views of the device buffers, through a new array per buffer (a single-device
    # array is its own shard: viewed directly, the views would hold x).
    hosts = [np.asarray(jax.make_array_from_single_device_arrays(s.data.shape, s.data.sharding, [s.data]))
             for s in shards]
    flat = jax.device_put([h[i] for i in indices for h in hosts], [s.device for _ in indices for s in shards])
    if isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
        return flat
    sub = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec(*tuple(x.sharding.spec)[k:]),
                                     memory_kind=x.sharding.memory_kind)
    n = len(shards)
    return [jax.make_array_from_single_device_arrays(x.shape[k:], sub, flat[j * n:(j + 1) * n])
            for j in range(len(indices))]


def param(module: nn.Module, name: str, shape, axes, dtype, init=INIT):
    """A parameter annotated with logical axis names (one name per dimension).

    A stored `quant.QuantizedWeight` or `ExpertList` is returned as it is (the matmuls
    take it in place of the array) once its logical shape is checked: flax's own check
    compares the leaves, and an int4 weight's packed leaf has another shape than the
    float one.
    """
    assert len(shape) == len(axes), (name, shape, axes)
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if quant.is_quantized(value) or isinstance(value, ExpertList):
            if tuple(value.shape) != tuple(shape):
                raise quant.QuantError(f"parameter {'/'.join(module.path)}/{name} ({type(value).__name__}) has "
                                       f"shape {tuple(value.shape)}, the model expects {tuple(shape)}")
            return value
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def rms_norm(x, weight, eps: float):
    """Llama RMSNorm: normalise in fp32, cast back to the input dtype, THEN scale.

    The cast before the weight multiply matches transformers and Meta; scaling in
    fp32 first differs by a bf16 rounding of the product.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype)
    return y if weight is None else y * weight.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        w = param(self, "scale", (x.shape[-1],), ("norm",), self.dtype, nn.initializers.ones)
        return rms_norm(x, w, self.eps)


def rope_angles(positions, inv_freq):
    """cos, sin of the RoPE angles [B, T, d/2] in fp32 from integer positions [B, T].

    Positions are converted to fp32 before the product (as transformers does); fp32
    represents every integer position below 2^24 exactly.
    """
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """Interleaved (GPT-J / complex) rotary embedding of x [B, T, N, d] in fp32.

    Pairs (x[2j], x[2j+1]) rotate by angle j, matching `torch.view_as_complex` in
    transformers' Llama 4; weights are used as stored (no rotate-half permutation).
    """
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    y = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return y.reshape(x.shape).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); used dense and as the shared expert."""

    hidden: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        gate, up = gate_up_params(self, (D, self.hidden), ("embed", "mlp"), self.dtype)
        down = param(self, "down", (self.hidden, D), ("mlp", "embed"), self.dtype)
        return swiglu(x, gate, up, down)


def swiglu(x, gate, up, down):
    """down(silu(x @ gate) * (x @ up)) for x [..., D] and float or quantized [D, F] / [F, D]
    weights (`quant.matmul`).

    up None: gate is `fuse_gate_up(gate, up)` [D, 2F], both products in one."""
    mm = quant.matmul
    if up is None:
        g, u = jnp.split(mm(x, gate), 2, axis=-1)
    else:
        g, u = mm(x, gate), mm(x, up)
    return mm(jax.nn.silu(g) * u, down)


def fuse_gate_up(gate, up):
    """gate and up [..., D, F] side by side along the output axis: [..., D, 2F] (a new
    array; a quantized weight's leaves all end in its output axis, so they concatenate
    the same way).

    The CPU decode parameters hold the SwiGLU weights this way (`views.layer_views`):
    XLA:CPU runs a product of a few rows by a 512 KiB matrix at well under the memory
    bandwidth, and one by 1 MiB faster (one row: 11.6 against 18.2 GB/s; four rows:
    9.4 against 10.2; 2 cores, 128 MiB of distinct matrices in turn). The benchmark
    model's decode step, fused against not (one process, the two alternated, medians
    of 6 `generate` calls): batch 8 on one device 8.78 against 10.40 ms; on two (4
    rows each) 6.51 / 6.61 against 6.86 / 7.13 in two runs, 6.84 against 6.82 in a
    third; batch 1 after 100 tokens 2.27 against 2.49 ms. At prefill sizes (16-128
    rows) the fused product measured no faster, so prefill keeps gate and up."""
    return jax.tree_util.tree_map(lambda g, u: jnp.concatenate([g, u], axis=-1), gate, up)


def gate_up_params(module: nn.Module, shape, axes, dtype):
    """A SwiGLU's (gate, up) parameters of logical shape `shape` [..., D, F]; or
    (gate_up, None) where the parameters hold the two fused instead (`fuse_gate_up`,
    the CPU decode parameters), for `swiglu`."""
    if not module.has_variable("params", "gate_up"):
        return param(module, "gate", shape, axes, dtype), param(module, "up", shape, axes, dtype)
    w = module.get_variable("params", "gate_up")
    want = tuple(shape[:-1]) + (2 * shape[-1],)
    if tuple(w.shape) != want:
        raise quant.QuantError(f"parameter {'/'.join(module.path)}/gate_up ({type(w).__name__}) has shape "
                               f"{tuple(w.shape)}, the model expects {want} (gate and up fused)")
    return w, None
