"""Quantized weights: int8, int4 and fp8 formats and the matmuls that consume them.

A quantized weight is a `QuantizedWeight`, a small pytree (a registered dataclass)
that sits in the parameter tree where the float array was, and every weight matmul of
the model accepts it in its place (`matmul`, `take`, `ragged_dot`), with the
dequantize folded into the matmul. A weight of logical shape [..., *in, *out] (leading
axes: the scanned `layers` axis, the `expert` axis) contracts its `in` axes; K is their
product and N the product of the `out` axes.

Formats (`QuantFormat`; `FORMATS`):

  * `int8`: symmetric, one fp32 scale per output channel: w ~= q * scale,
    q = round(w / scale) in [-127, 127], scale = max|w over K| / 127. The matmul runs on
    q converted to the activation dtype (exact: |q| <= 127) and scales its output,
    y = (x @ q) * scale, which equals x @ (q * scale) up to the rounding of the dot.
    Error bound: |w - deq| <= scale / 2 = max|w_channel| / 254 per element.
  * `int4`: groups of `group_size` (default 128) consecutive elements along K, each
    with an fp32 scale and offset (zero point), w ~= q * scale + offset,
    q in [0, 15], scale = (max - min) / 15, offset = min (all over the group). Stored
    packed two per byte along K in uint8 (element 2i in the low nibble, 2i+1 in the
    high one): XLA:CPU stores `jnp.int4` arrays one element per byte (measured: a
    4096 x 4096 int4 array occupies 16 MiB on device), so only explicit packing halves
    the bytes. A K that the group does not divide is padded to ceil(K / group) groups;
    the last group's range is taken over its real elements only and the padding is
    never read by the matmul. The matmul dequantizes the weight and multiplies
    (`x @ dequantize(w)`); XLA fuses the unpack/scale into the dot's operand on GPU, and
    on this CPU it measured faster than the per-group folded form (1 x 2048 x 5632:
    61 ms against 87 ms for the [T, K/group, N] partial-products form).
    Error bound: |w - deq| <= scale / 2 = (max - min of the group) / 30 per element.
    Zero points against symmetric: measured relative RMS error at group 128 on normal
    weights 0.101 (zero point) against 0.118 (symmetric, q in [-7, 7]) and 0.111
    (symmetric, q in [-8, 7]); on Laplace weights 0.130 against 0.160 / 0.151. Zero
    points use all 16 levels on skewed groups; they cost one fp32 per group (bytes:
    (group/2 + 8) / (2 * group) = 0.28x bf16 at group 128).
  * `fp8`: float8 e4m3 (`float8_e4m3fn`) with one fp32 scale per output channel,
    w ~= float(q) * scale, scale = max|w over K| / 448 (e4m3's largest finite value),
    the layout of FP8 checkpoints (compressed-tensors channel-wise, fbgemm): their
    stored weights and scales are kept as they are. The matmul is int8's.
    Error bound: e4m3 keeps 3 mantissa bits, so a normal value is off by at most
    2^-4 of itself; values below 2^-6 * scale (subnormal) by at most 2^-10 * scale:
    |w - deq| <= max(|w| / 16, scale / 1024).

Which weights: the attention projections (q, k, v, o), dense MLPs, the shared expert
and the routed experts of the decoder layers (`quantizable`). Embeddings, the LM head,
norms, the router and the vision tower stay in the compute dtype.

`quantize_params(params, fmt)` quantizes a float parameter tree (arrays, abstract
`jax.ShapeDtypeStruct`s, or the boxed tree with logical axis names, whose scale leaves
get axis names derived from their weight's, see `_leaf_names`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMATS", "QuantFormat", "QuantizedWeight", "as_format", "quantize", "dequantize", "matmul", "take",
    "ragged_dot", "expert_matmul", "is_quantized", "quantizable", "quantize_params", "partition_spec",
    "QuantError", "params_format", "parse_format",
]

FORMATS = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = jnp.float8_e4m3fn


class QuantError(ValueError):
    """A quantization format or quantized weight that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """A weight format: `name` in `FORMATS`; `group_size` (int4 only): elements of K per
    scale, a positive even integer (two 4-bit values share a byte)."""

    name: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.name not in FORMATS:
            raise QuantError(f"unknown quantization format {self.name!r}; choose from {list(FORMATS)}")
        g = self.group_size
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g <= 0:
            raise QuantError(f"int4 group size must be a positive integer, got {g!r}")
        if self.name == "int4" and g % 2:
            raise QuantError(f"int4 group size must be even (two 4-bit values are packed per byte), got {g}")
        if self.name != "int4":  # one canonical value, so equal formats compare (and hash) equal
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)


def as_format(quantize, group_size: int | None = None) -> QuantFormat | None:
    """None | "int8" | "int4" | "fp8" | QuantFormat (with an optional int4 group size) ->
    QuantFormat or None; a bad value raises QuantError naming it."""
    if quantize is None:
        if group_size is not None:
            raise QuantError("a group size needs quantize='int4'")
        return None
    if isinstance(quantize, QuantFormat):
        if group_size is not None and group_size != quantize.group_size:
            raise QuantError(f"group_size={group_size} contradicts {quantize}")
        return quantize
    if not isinstance(quantize, str):
        raise QuantError(f"quantize must be None or one of {list(FORMATS)}, got {quantize!r}")
    if group_size is not None and quantize != "int4":
        raise QuantError(f"a group size applies to int4 only, not {quantize!r}")
    return QuantFormat(quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size)


def parse_format(quantize: str | None, group_size: str | int | None = None) -> QuantFormat | None:
    """`as_format` for command-line values (`--quantize`, `--group-size`): a group size
    given as text must be an integer; every bad value raises a one-line QuantError."""
    if isinstance(group_size, str):
        try:
            group_size = int(group_size)
        except ValueError:
            raise QuantError(f"--group-size must be a positive integer, got {group_size!r}") from None
    return as_format(quantize, group_size)


# --------------------------------------------------------------------------------------
# The weight type
# --------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight of logical shape [*lead, *in_shape, *out] (see the module doc).

    q:      int8 / float8_e4m3fn [*lead, *in_shape, *out]; int4: uint8 [*lead, Kp / 2, *out]
            with Kp = ceil(K / group_size) * group_size, two values per byte along K.
    scale:  fp32; int8/fp8 [*lead, *out] per output channel; int4 [*lead, Kp / group, *out].
    offset: int4 only, fp32 like `scale` (w = q * scale + offset); None otherwise.

    The static fields describe the trailing axes only and every size is read from the
    leaves, so slicing the leading axes of every leaf (the layer scan, picking one
    expert) or holding a shard of them (inside `shard_map`) keeps the type valid:
    n_in / out_ndim count the contraction and output axes; int4 adds `pad` (the zero
    rows that complete the last group) and `in_tail` (the contraction axes after the
    first, which the packed K axis flattens).
    """

    q: Any
    scale: Any
    offset: Any
    fmt: str = dataclasses.field(metadata=dict(static=True))
    n_in: int = dataclasses.field(metadata=dict(static=True))
    out_ndim: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    pad: int = dataclasses.field(default=0, metadata=dict(static=True))
    in_tail: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def lead_ndim(self) -> int:
        return len(self.scale.shape) - self.out_ndim - (1 if self.fmt == "int4" else 0)

    @property
    def out_shape(self) -> tuple:
        return tuple(self.scale.shape[len(self.scale.shape) - self.out_ndim:])

    @property
    def in_shape(self) -> tuple:
        lead = self.lead_ndim
        if self.fmt != "int4":
            return tuple(self.q.shape[lead: lead + self.n_in])
        k = 2 * self.q.shape[lead] - self.pad
        return (k // max(1, math.prod(self.in_tail)),) + tuple(self.in_tail)

    @property
    def shape(self) -> tuple:
        """The logical (float) shape."""
        return tuple(self.scale.shape[: self.lead_ndim]) + self.in_shape + self.out_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def k(self) -> int:
        return math.prod(self.in_shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


def params_format(params) -> QuantFormat | None:
    """The format of the first quantized weight of a parameter tree (None: none is)."""
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            return QuantFormat(leaf.fmt, leaf.group_size or DEFAULT_GROUP_SIZE)
    return None


def _split(shape, n_in: int, n_out: int):
    lead = len(shape) - n_in - n_out
    if lead < 0:
        raise QuantError(f"weight of shape {tuple(shape)} has fewer than {n_in} + {n_out} axes")
    return tuple(shape[:lead]), tuple(shape[lead: lead + n_in]), tuple(shape[lead + n_in:])


def _pack4(q):
    """uint8 values in [0, 15], [..., Kp, *out] with Kp even -> [..., Kp / 2, *out] bytes."""
    return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def _unpack4(p):
    """Inverse of `_pack4` on the K axis (axis -2 after flattening out): [..., Kp / 2, N] -> [..., Kp, N]."""
    lo, hi = p & 0xF, p >> 4
    return jnp.stack([lo, hi], axis=-2).reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])


def quantize(w, fmt: QuantFormat | str, *, n_in: int = 1, n_out: int = 1) -> QuantizedWeight:
    """Quantize a float weight [*lead, *in (n_in axes), *out (n_out axes)] (see `FORMATS`).

    Statistics and rounding are computed in fp32. An all-zero channel or group gets
    scale 1 (so it dequantizes to exact zeros).
    """
    fmt = as_format(fmt)
    lead, ins, outs = _split(w.shape, n_in, n_out)
    K, N = math.prod(ins), math.prod(outs)
    w32 = jnp.asarray(w, jnp.float32).reshape(lead + (K, N))
    if fmt.name in ("int8", "fp8"):
        amax = jnp.max(jnp.abs(w32), axis=-2)
        top = 127.0 if fmt.name == "int8" else FP8_MAX
        scale = jnp.where(amax > 0, amax / top, 1.0)
        x = w32 / scale[..., None, :]
        if fmt.name == "int8":
            q = jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
        else:
            q = jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)  # round to nearest even
        return QuantizedWeight(q.reshape(w.shape), scale.reshape(lead + outs), None, fmt.name, n_in, n_out)
    g = fmt.group_size
    n = -(-K // g)
    pad = n * g - K
    wg = jnp.pad(w32, [(0, 0)] * len(lead) + [(0, pad), (0, 0)]).reshape(lead + (n, g, N))
    real = (jnp.arange(n * g) < K).reshape(n, g, 1)  # the padding is left out of the statistics
    lo = jnp.min(jnp.where(real, wg, jnp.inf), axis=-2)
    hi = jnp.max(jnp.where(real, wg, -jnp.inf), axis=-2)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((wg - lo[..., None, :]) / scale[..., None, :]), 0, 15).astype(jnp.uint8)
    q = _pack4(q.reshape(lead + (n * g, N))).reshape(lead + (n * g // 2,) + outs)
    return QuantizedWeight(q, scale.reshape(lead + (n,) + outs), lo.reshape(lead + (n,) + outs), "int4", n_in, n_out,
                           g, pad, ins[1:])


def dequantize(w, dtype=jnp.float32):
    """The float weight [*lead, *in, *out] in `dtype` (computed in fp32, rounded once)."""
    if not is_quantized(w):
        return jnp.asarray(w).astype(dtype)
    lead, ins, outs = tuple(w.shape[: w.lead_ndim]), w.in_shape, w.out_shape
    K, N = w.k, math.prod(outs)
    if w.fmt in ("int8", "fp8"):
        x = w.q.reshape(lead + (K, N)).astype(jnp.float32) * w.scale.reshape(lead + (1, N))
    else:
        q = _unpack4(w.q.reshape(lead + (w.q.shape[w.lead_ndim], N))).astype(jnp.float32)
        n, g = w.scale.shape[w.lead_ndim], w.group_size
        s = w.scale.reshape(lead + (n, 1, N))
        o = w.offset.reshape(lead + (n, 1, N))
        x = (q.reshape(lead + (n, g, N)) * s + o).reshape(lead + (n * g, N))[..., :K, :]
    return x.reshape(lead + ins + outs).astype(dtype)


# --------------------------------------------------------------------------------------
# Matmuls
# --------------------------------------------------------------------------------------

def matmul(x, w, *, n_in: int = 1):
    """x [..., K] @ w [*in, *out] -> [..., *out] in x's dtype; K = prod(in) (n_in axes).

    w is a float array or a `QuantizedWeight` without leading axes. The contraction is
    one [K, N] matmul (the reshapes of contiguous axes are free; contracting several
    axes at once made XLA transpose and copy the weight on every call).
    """
    if not is_quantized(w):
        K = math.prod(w.shape[:n_in])
        y = x @ w.reshape(K, -1)
        return y.reshape(x.shape[:-1] + tuple(w.shape[n_in:]))
    if w.lead_ndim:
        raise QuantError(f"matmul of a stacked quantized weight {w.shape}; index its leading axes first (take)")
    if w.n_in != n_in:
        raise QuantError(f"quantized weight contracts {len(w.in_shape)} axes {w.in_shape}, the matmul {n_in}")
    K, outs = w.k, w.out_shape
    if w.fmt == "int4":
        y = x @ dequantize(w, x.dtype).reshape(K, -1)
    else:
        # Output scaling: (x @ q) * s == x @ (q * s) for a per-output-channel s, and
        # scaling the [.., N] output costs less than scaling the [K, N] weight. q is
        # exact in the activation dtype (|int8| <= 127; every e4m3 value is a bf16).
        q = w.q.reshape(K, -1).astype(x.dtype)
        y = (jnp.matmul(x, q, preferred_element_type=jnp.float32) * w.scale.reshape(-1)).astype(x.dtype)
    return y.reshape(x.shape[:-1] + outs)


def take(w, i):
    """w[i] on the leading axis (a traced index) for a float array or a `QuantizedWeight`."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), w)


def expert_matmul(x_etd, w):
    """Per-expert matmul: x [E, T, K] and w [E, K, N] (float or quantized) -> [E, T, N]."""
    if not is_quantized(w):
        return jnp.einsum("etd,edf->etf", x_etd, w)
    return jax.vmap(matmul)(x_etd, w)


def ragged_dot(x, w, group_sizes):
    """`jax.lax.ragged_dot(x [R, K], w [E, K, N], group_sizes [E])` for a float or quantized w.

    int8/fp8: the grouped matmul runs on q (in the activation dtype) and each row's
    output is scaled by its expert's channel scales. int4: the experts are dequantized
    into the operand (fused by XLA on accelerators).
    """
    if not is_quantized(w):
        return jax.lax.ragged_dot(x, w, group_sizes)
    if w.fmt == "int4":
        return jax.lax.ragged_dot(x, dequantize(w, x.dtype), group_sizes)
    E = w.q.shape[0]
    y = jax.lax.ragged_dot(x, w.q.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
    expert_of_row = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=x.shape[0])
    return (y * w.scale[expert_of_row]).astype(x.dtype)


def check_trainable(*ws) -> None:
    """Raise unless every weight is a float array (gradients need float weights)."""
    if any(is_quantized(w) for w in ws):
        raise QuantError("differentiating through quantized weights is not supported: train on the float "
                         "weights (init_params or load without quantize=) and quantize afterwards")


# --------------------------------------------------------------------------------------
# Which parameters, and whole trees
# --------------------------------------------------------------------------------------

# (module, leaf) -> (contraction axes, output axes), per layer and expert.
_LAYOUT = {
    ("attn", "q"): (1, 2), ("attn", "k"): (1, 2), ("attn", "v"): (1, 2), ("attn", "o"): (2, 1),
    **{(m, p): (1, 1) for m in ("mlp", "shared", "moe") for p in ("gate", "up", "down")},
}


def quantizable(path) -> tuple[int, int] | None:
    """(n_in, n_out) of a decoder-layer weight at `path` (a tuple of keys below the
    variables root, e.g. ('params', 'layers', 'layer_0', 'attn', 'q')), else None."""
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if len(keys) < 4 or keys[0] != "params" or not keys[1].startswith("layers"):
        return None
    return _LAYOUT.get(keys[-2:])


def _leaf_names(names: tuple, fmt: str, n_in: int, n_out: int) -> dict:
    """Logical axis names of q / scale / offset from the weight's names.

    q keeps the weight's names (int4: the packed K axis takes the first contraction
    axis' name, so a tensor split of heads or FFN rows splits the packed rows alike);
    scale and offset keep the leading and output names (int4: plus the group axis,
    named like K, so groups follow their rows when the split divides them).
    """
    lead, ins, outs = _split(names, n_in, n_out)
    if fmt == "int4":
        q = lead + ins[:1] + outs
        return {"q": q, "scale": q, "offset": q}
    return {"q": names, "scale": lead + outs, "offset": None}


def quantize_params(params, fmt, group_size: int | None = None):
    """The parameter tree with every `quantizable` weight quantized to `fmt`.

    Leaves may be arrays, `jax.ShapeDtypeStruct`s (the result is abstract too), or
    flax `nn.Partitioned` boxes of either (the quantized leaves are boxed with the names
    from `_leaf_names`). Already quantized weights are left as they are. fmt None: the
    tree unchanged.
    """
    import flax.linen as nn

    fmt = as_format(fmt, group_size)
    if fmt is None:
        return params

    def one(path, leaf):
        layout = quantizable(path)
        if layout is None or is_quantized(leaf):
            return leaf
        n_in, n_out = layout
        boxed = isinstance(leaf, nn.Partitioned)
        value = leaf.value if boxed else leaf
        fn = lambda a: quantize(a, fmt, n_in=n_in, n_out=n_out)  # noqa: E731
        qw = jax.eval_shape(fn, value) if isinstance(value, jax.ShapeDtypeStruct) else fn(value)
        if not boxed:
            return qw
        names = _leaf_names(tuple(leaf.names), fmt.name, n_in, n_out)
        rebox = lambda name, x: None if x is None else nn.Partitioned(x, names[name], leaf.mesh)  # noqa: E731
        return dataclasses.replace(qw, q=rebox("q", qw.q), scale=rebox("scale", qw.scale),
                                   offset=rebox("offset", qw.offset))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: is_quantized(x) or isinstance(
        x, nn.Partitioned))


def partition_spec(w, spec):
    """PartitionSpec(s) of w's leaves given the spec of the logical weight (one entry
    per logical axis, e.g. P('expert', None, 'tensor') for [E, D, F]).

    A float weight gets `spec`; a quantized one a `QuantizedWeight` of specs: q the
    logical spec (int4: the packed K axis takes the first contraction axis' entry),
    scale/offset the leading and output entries (int4: plus the group axis like K).
    Callers split a contraction axis only where the groups divide evenly.
    """
    from jax.sharding import PartitionSpec as P

    if not is_quantized(w):
        return spec
    entries = tuple(spec) + (None,) * (w.ndim - len(spec))
    names = _leaf_names(entries, w.fmt, w.n_in, w.out_ndim)
    mk = lambda name: None if names[name] is None else P(*names[name])  # noqa: E731
    return dataclasses.replace(w, q=mk("q"), scale=mk("scale"), offset=mk("offset"))
