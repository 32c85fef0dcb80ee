"""Quantized formats: FP8 checkpoints as stored, and quantizing weights while streaming.

Float8 e4m3 tensors with per-output-channel scales (compressed-tensors: per-expert
`experts.{e}.{gate,up,down}_proj.weight` + `weight_scale` [out, 1]; fbgemm:
`experts.gate_up_proj` + `gate_up_proj_scale` [E, 1, 2F], `experts.down_proj` +
`down_proj_scale` [E, D, 1], Linear `weight` + `weight_scale`) are dequantized on read,
`w = float32(w8) * scale`, then cast to the requested dtype, unless the load keeps them
as fp8 (`fp8_channel_scale`: the stored e4m3 values and scales become a
`quant.QuantizedWeight` as they are). `quantization_config` in config.json is
validated first (`read_quantization`), then every FP8 tensor's scale against the
tensor's shape, from the headers alone (`check_fp8_scales`: a scale is per tensor or
broadcasts axis by axis; anything else is refused naming both tensors); the
checkpoint's `input_scale`s (static activation bounds) are not used (`_is_ignored`).

`quantize_piece` quantizes one weight as it is read (`load(..., quantize=)`,
`convert --quantize`): in chunks of its leading (expert) axis, so host memory holds one
chunk in fp32 and the quantized result, never the float model.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import ml_dtypes
import numpy as np

from .. import quant
from .base import CheckpointError
from .names import Rule, from_hf, hf_shape
from .safetensors_io import SafetensorsReader, _norm_region


def _is_ignored(name: str) -> str | None:
    """Why a checkpoint tensor is deliberately not read (None: it must be consumed)."""
    if name.endswith(("input_scale", "input_scale_ub")):
        # Static activation-quantization bounds of FP8 checkpoints: we dequantize the
        # weights and run activations unquantized, so they have no use.
        return "FP8 activation scale"
    return None


def read_quantization(path: str) -> dict | None:
    """The validated `quantization_config` of a checkpoint's config.json (None if absent).

    Supported: compressed-tensors with float8 per-channel weights, and fbgemm_fp8.
    """
    with open(os.path.join(path, "config.json")) as f:
        q = json.load(f).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fbgemm_fp8":
        return q
    if method == "compressed-tensors":
        fmt = q.get("format", "float-quantized")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise CheckpointError(f"{path}: compressed-tensors format {fmt!r} is not supported "
                                  "(only 'float-quantized' FP8 weights)")
        for gname, g in (q.get("config_groups") or {}).items():
            w = g.get("weights") or {}
            got = (w.get("num_bits"), w.get("type"), w.get("strategy"))
            if got != (8, "float", "channel"):
                raise CheckpointError(
                    f"{path}: quantization group {gname} has weights (num_bits, type, strategy)={got}; "
                    "only (8, 'float', 'channel') is supported")
        return q
    raise CheckpointError(f"{path}: quantization method {method!r} is not supported "
                          "(supported: 'compressed-tensors' FP8, 'fbgemm_fp8')")


def _scale_name(reader: SafetensorsReader, name: str) -> str:
    """The per-channel scale stored beside an FP8 tensor."""
    cands = ([name[: -len("weight")] + "weight_scale"] if name.endswith(".weight") else []) + [name + "_scale"]
    for c in cands:
        if c in reader:
            return c
    raise CheckpointError(f"{reader.path}: FP8 tensor {name} has no scale (looked for {' or '.join(cands)})")


def _scale_view(reader: SafetensorsReader, name: str):
    """(scale name, stored shape, swapped): the scale of an FP8 tensor, and whether its
    last two axes are swapped against the tensor's.

    fbgemm stores `down_proj_scale` as [E, D, 1] for `down_proj` [E, F, D]: the scale of
    output channel d is scale[e, d, 0].
    """
    sname = _scale_name(reader, name)
    sshape = reader.info(sname).shape
    return sname, sshape, name.endswith("experts.down_proj") and len(sshape) == 3


def _unswap(shape_or_array, swap: bool):
    if not swap:
        return shape_or_array
    if isinstance(shape_or_array, tuple):
        return shape_or_array[:-2] + (shape_or_array[-1], shape_or_array[-2])
    return np.swapaxes(shape_or_array, -1, -2)


def fp8_weight_names(reader: SafetensorsReader) -> list[str]:
    """The tensors of a checkpoint stored in a float8 type (e4m3 or e5m2), sorted."""
    return sorted(n for n, t in reader.tensors.items() if t.dtype.name.startswith("float8"))


def _checked_scale(reader: SafetensorsReader, name: str):
    """(scale name, its shape as the tensor's axes, swapped): the scale of FP8 tensor
    `name`, refused with a CheckpointError naming both unless it is per tensor (one
    value) or broadcasts against the tensor axis by axis (each axis 1 or the tensor's)."""
    shape = reader.info(name).shape
    sname, sshape, swap = _scale_view(reader, name)
    eff = _unswap(sshape, swap)
    if math.prod(eff) != 1 and (len(eff) != len(shape) or any(s not in (1, n) for s, n in zip(eff, shape))):
        raise CheckpointError(f"{reader.path}: scale {sname} has shape {sshape}, which does not match FP8 tensor "
                              f"{name} of shape {shape} (a scale is per tensor, or has the tensor's axes with 1 "
                              "on those it does not vary along)")
    return sname, eff, swap


def check_fp8_scales(reader: SafetensorsReader) -> list[str]:
    """Check, from the headers only, that every FP8 tensor has a scale whose shape fits
    it (CheckpointError naming the scale and the tensor otherwise), before any data is
    read. Returns the FP8 tensors' names (empty: the checkpoint has no FP8 weights)."""
    names = fp8_weight_names(reader)
    for name in names:
        _checked_scale(reader, name)
    return names


def _read_hf(reader: SafetensorsReader, name: str, region, consumed: set | None, raw: bool = False) -> np.ndarray:
    """A region of an HF tensor, dequantized to float32 if it is stored as FP8 (raw: as stored)."""
    info = reader.info(name)
    x = reader.read(name, region)
    if raw or not info.dtype.name.startswith("float8"):
        return x
    sname, eff, swap = _checked_scale(reader, name)
    if math.prod(eff) == 1:  # per tensor
        scale = reader.read(sname).astype(np.float32).reshape(())
    else:
        region = _norm_region(region, info.shape)
        sregion = tuple(r if s == n else slice(0, 1) for r, s, n in zip(region, eff, info.shape))
        scale = _unswap(reader.read(sname, _unswap(sregion, swap)).astype(np.float32), swap)
    if consumed is not None:
        consumed.add(sname)
    # Dequantize in fp32 (transformers' `w.float() * scale`); the one rounding to a
    # narrower dtype happens at the cast to the requested parameter dtype.
    return x.astype(np.float32) * scale


# --------------------------------------------------------------------------------------
# FP8 kept as stored
# --------------------------------------------------------------------------------------

FP8_STORED = np.dtype(ml_dtypes.float8_e4m3fn)


def fp8_channel_scale(reader: SafetensorsReader, name: str, rule: Rule, k: int, leaf_shape, n_in: int,
                      n_out: int, consumed: set | None) -> np.ndarray | None:
    """The per-output-channel scale [*lead, *out] (fp32) of our leaf `leaf_shape` that
    FP8 tensor `name` produces through `rule`, or None when the stored tensor cannot be
    kept as our fp8 format: stored in another float8 type (e5m2), or with a scale that
    varies along the contraction (then the caller dequantizes and re-quantizes).
    A scale whose shape does not fit the tensor raises CheckpointError naming both.

    A per-tensor scale is broadcast to every channel (exact: the same number).
    """
    if reader.info(name).dtype != FP8_STORED:
        return None
    sname, eff, swap = _checked_scale(reader, name)  # a scale that fits no way is an error, not a fallback
    lead = len(leaf_shape) - n_in - n_out
    one = tuple(1 if lead <= i < lead + n_in else int(n) for i, n in enumerate(leaf_shape))  # contraction -> 1
    want = hf_shape(rule, one)
    per_tensor = math.prod(eff) == 1
    if not per_tensor and any(s not in (1, n) for s, n in zip(eff, want)):
        return None
    s = _unswap(reader.read(sname).astype(np.float32), swap)
    s = np.broadcast_to(s.reshape(()) if per_tensor else s, want)
    if consumed is not None:
        consumed.add(sname)
    out = tuple(int(n) for n in leaf_shape[lead + n_in:])
    return from_hf(rule, k, np.ascontiguousarray(s), one).reshape(tuple(leaf_shape[:lead]) + out)


# --------------------------------------------------------------------------------------
# Quantizing while streaming
# --------------------------------------------------------------------------------------

# fp32 bytes of the largest chunk of one weight quantized at once (at least one index of
# its leading axis, i.e. one expert): with the quantized result, what loading or
# converting with quantize= holds in host memory beyond one stored tensor.
QUANT_CHUNK_BYTES = 256 << 20


@functools.lru_cache(maxsize=None)
def _host_quantizer(fmt: quant.QuantFormat, n_in: int, n_out: int):
    """fp32 numpy weight -> QuantizedWeight of numpy arrays, computed by `quant.quantize`
    (jitted) on a CPU device, so it is the same arithmetic as quantizing a loaded tree."""
    fn = jax.jit(functools.partial(quant.quantize, fmt=fmt, n_in=n_in, n_out=n_out))
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): the default device
        cpu = None

    def run(w: np.ndarray) -> quant.QuantizedWeight:
        qw = fn(jax.device_put(w, cpu) if cpu is not None else w)
        return jax.tree_util.tree_map(np.asarray, qw)

    return run


def quantize_piece(read, shape, fmt: quant.QuantFormat, n_in: int, n_out: int) -> quant.QuantizedWeight:
    """Quantize one weight [*lead, *in, *out] of `shape` as it is read.

    read(region) returns the float32 values of a region (a tuple of slices on the
    leading axis). A weight with leading axes (the experts of one layer) is read and
    quantized in chunks of that axis of at most `QUANT_CHUNK_BYTES` (one index at
    least), since quantization is independent per leading index: the result is bitwise
    `quant.quantize` of the whole weight. Returns a QuantizedWeight of numpy arrays.
    """
    quantize = _host_quantizer(fmt, n_in, n_out)
    shape = tuple(int(n) for n in shape)
    if len(shape) == n_in + n_out:
        return quantize(read(()))
    step = max(1, QUANT_CHUNK_BYTES // (math.prod(shape[1:]) * 4))
    out = None
    for i in range(0, shape[0], step):
        j = min(shape[0], i + step)
        qw = quantize(read((slice(i, j),)))
        if out is None:  # the static fields do not depend on the leading size
            out = jax.tree_util.tree_map(lambda a: np.empty(shape[:1] + a.shape[1:], a.dtype), qw)
        for dst, src in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(qw)):
            dst[i:j] = src
        del qw
    return out
