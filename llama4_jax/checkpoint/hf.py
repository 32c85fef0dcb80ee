"""Hugging Face checkpoint directories: streaming load (`load_hf`) and export (`save_hf`).

`load_hf` builds every parameter with `jax.make_array_from_callback`, so each device
reads only its own slice of each HF tensor. Scanned parameters are filled one group
(one HF tensor) at a time into a preallocated, donated device array, so host memory is
bounded by a few buffers of one HF tensor (read, transposed, and on the CPU backend the
device copy: ~2x the largest tensor measured), independent of depth. Every HF tensor
must be consumed and every parameter produced: `plan_leaves` and `_check_consumed`
check both directions.

With `quantize=` the decoder layers' weight matrices (`quant.quantizable`) are
quantized as they are read, one layer's tensor at a time (in chunks of experts,
`quantized.quantize_piece`), and each device receives its shard of the quantized
weight and scales: host memory stays about one stored tensor, and the float model is
never formed. FP8 checkpoints loaded as fp8 keep their stored e4m3 values and scales.

`save_hf` writes safetensors shards one tensor at a time, the exact inverse of the
reading transforms (bitwise round trip).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import quant
from ..config import Llama4Config, load_config, to_hf as config_to_hf
from ..model.text import abstract_params
from .base import _DTYPES, CheckpointError, _default_sharding, _get, _np_dtype, _progress, _set
from .names import Entry, Leaf, _region_to_hf, checkpoint_entries, hf_shape, plan_leaves, to_hf
from .quantized import (FP8_STORED, _is_ignored, _read_hf, check_fp8_scales, fp8_channel_scale, quantize_piece,
                        read_quantization)
from .safetensors_io import SafetensorsReader, _norm_region, write_safetensors


def _read_leaf_region(reader: SafetensorsReader, leaf: Leaf, entry: Entry, region, dtype,
                      consumed: set | None, raw: bool = False) -> np.ndarray:
    """The region of one layer's (unstacked) leaf produced by `entry`, in `dtype`
    (raw: FP8 tensors as stored, not dequantized)."""
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    region = _norm_region(region, shape)
    if "{e}" in entry.hf_name:  # one HF tensor per expert: leading axis of our leaf
        parts = [_read_view(reader, entry.hf_name.format(e=e), entry.rule, leaf.k, shape[1:], region[1:], dtype,
                            consumed, raw) for e in range(region[0].start, region[0].stop)]
        return np.stack(parts) if parts else np.empty(tuple(s.stop - s.start for s in region), dtype)
    return _read_view(reader, entry.hf_name, entry.rule, leaf.k, shape, region, dtype, consumed, raw)


def _read_view(reader, name, rule, k, shape, region, dtype, consumed, raw=False) -> np.ndarray:
    info = reader.info(name)
    want = hf_shape(rule, shape)
    if info.shape != want:
        raise CheckpointError(f"{reader.path}: tensor {name} has shape {info.shape}, expected {want}")
    hf_region, gathers, perm = _region_to_hf(rule, k, shape, region)
    x = _read_hf(reader, name, hf_region, consumed, raw)
    x = _transposed(x) if perm == (1, 0) else x.transpose(perm)
    for ax, g in enumerate(gathers):
        if g is not None:
            x = np.take(x, g, axis=ax)
    x = x.reshape(tuple(s.stop - s.start for s in region))
    if consumed is not None:
        consumed.add(name)
    return x.astype(dtype, copy=False)


def _transposed(x: np.ndarray, block: int = 256) -> np.ndarray:
    """x.T as a new C-contiguous array, copied in cache-sized tiles.

    numpy's plain strided copy of a transposed matrix misses cache on every element
    of one side; 256 x 256 tiles made the copy ~2.3x faster on this project's CPU.
    """
    a, b = x.shape
    out = np.empty((b, a), x.dtype)
    for i in range(0, a, block):
        for j in range(0, b, block):
            out[j:j + block, i:i + block] = x[i:i + block, j:j + block].T
    return out


def _quantized_piece(reader: SafetensorsReader, lf: Leaf, entry: Entry, fmt: quant.QuantFormat,
                     consumed: set | None) -> quant.QuantizedWeight:
    """One layer's weight of a quantizable leaf (what `entry` produces), quantized to
    `fmt`: a QuantizedWeight of numpy arrays.

    Quantized from the stored values in fp32 (FP8 ones dequantized), not from values
    first rounded to the load dtype. fp8 from an FP8 checkpoint keeps the stored e4m3
    values and scales as they are where the stored scale is per output channel (or per
    tensor); otherwise (e5m2, scales along the contraction) it is dequantized and
    quantized again.
    """
    n_in, n_out = quant.quantizable(lf.path)
    shape = lf.shape[1:] if lf.stacked else lf.shape
    if fmt.name == "fp8":
        per_expert = "{e}" in entry.hf_name
        names = entry.hf_names(shape[0]) if per_expert else [entry.hf_name]
        scales = [fp8_channel_scale(reader, n, entry.rule, lf.k, shape[1:] if per_expert else shape, n_in, n_out,
                                    consumed) for n in names]
        if all(s is not None for s in scales):
            q = _read_leaf_region(reader, lf, entry, (), FP8_STORED, consumed, raw=True)
            scale = np.stack(scales) if per_expert else scales[0]
            return quant.QuantizedWeight(q, scale, None, "fp8", n_in, n_out)
    return quantize_piece(lambda region: _read_leaf_region(reader, lf, entry, region, np.float32, consumed),
                          shape, fmt, n_in, n_out)


_PARTS = ("q", "scale", "offset")


def _part_sharding(sharding, node: quant.QuantizedWeight, part: str):
    """The sharding of one array of a quantized weight, from what the caller gave for
    the weight: a QuantizedWeight of shardings (`sharding.param_shardings(quantize=)`),
    one sharding of the logical weight (its spec mapped by `quant.partition_spec`),
    or None (the default device)."""
    if sharding is None:
        return _default_sharding()
    if quant.is_quantized(sharding):
        return getattr(sharding, part)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, getattr(quant.partition_spec(node, sharding.spec), part))
    return sharding


def _place_quantized(node: quant.QuantizedWeight, sharding, lf: Leaf, produce) -> quant.QuantizedWeight:
    """The device arrays of quantized leaf `lf` (abstract `node`), one layer at a time:
    produce(g) -> host QuantizedWeight of group g (0 for an unstacked leaf), whose
    arrays are cut into each device's shard (a scanned leaf's groups written in place,
    as for float leaves)."""
    parts = [p for p in _PARTS if getattr(node, p) is not None]
    shs = {p: _part_sharding(sharding, node, p) for p in parts}

    def check(host, p, shape):
        a = getattr(host, p)
        if tuple(a.shape) != tuple(shape) or a.dtype != getattr(node, p).dtype:
            raise AssertionError(f"{'/'.join(lf.path)}.{p}: produced {a.shape} {a.dtype}, expected {shape} "
                                 f"{getattr(node, p).dtype}")
        return a

    if not lf.stacked:
        host = produce(0)
        out = {p: jax.make_array_from_callback(getattr(node, p).shape, shs[p],
                                               lambda idx, a=check(host, p, getattr(node, p).shape): a[idx])
               for p in parts}
        return dataclasses.replace(node, **out)
    # All arrays of the weight at once: one compilation per leaf, not per array.
    sh = tuple(shs[p] for p in parts)
    out = _zeros(tuple(getattr(node, p).shape for p in parts), tuple(np.dtype(getattr(node, p).dtype) for p in parts),
                 sh)()
    for g in range(len(lf.sources)):
        host = produce(g)
        pieces = []
        for p in parts:
            a = check(host, p, getattr(node, p).shape[1:])
            pieces.append(jax.make_array_from_callback(a.shape, _piece_sharding(shs[p]), lambda idx, a=a: a[idx]))
        out = _update_layer(sh)(out, tuple(pieces), np.int32(g))
        del host, pieces
    return dataclasses.replace(node, **dict(zip(parts, out)))


def _nbytes(node) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(node))


def _check_consumed(reader: SafetensorsReader, consumed: set) -> None:
    left = sorted(k for k in reader.tensors if k not in consumed and _is_ignored(k) is None)
    if left:
        more = f" and {len(left) - 8} more" if len(left) > 8 else ""
        raise CheckpointError(f"{reader.path}: tensors not used by the model: {left[:8]}{more}")


def load_hf(path: str, *, dtype: str = "bfloat16", shardings=None, progress: bool = False, quantize=None):
    """Read a Hugging Face Llama 4 checkpoint directory into (config, params) on device.

    Args:
      path: directory with config.json and safetensors weights (one file, several, or
        shards with `model.safetensors.index.json`). FP8 weights are dequantized; a
        scale whose shape does not fit its tensor is refused (CheckpointError naming
        both) before any data is read.
      dtype: parameter dtype, "bfloat16" | "float32" | "float16".
      shardings: None (every parameter on the default device) or a pytree with the
        structure of the params (`{'params': ...}`) whose leaves are
        `jax.sharding.Sharding`s or None (default device). Each device reads only its
        slice of each HF tensor; a scanned leaf's slice spans one HF tensor per group.
      progress: show a tqdm bar over the bytes read.
      quantize: None, "int8" | "int4" | "fp8" or a `quant.QuantFormat`: the tree of
        `abstract_params(config, dtype=dtype, quantize=)`, each quantizable weight
        quantized as it is read (`_quantized_piece`); its shardings, if given, are a
        `quant.QuantizedWeight` of shardings (`sharding.param_shardings(quantize=)`)
        or one NamedSharding of the logical weight.

    Returns: (Llama4Config, params) with params a tree of `jax.Array`.
    Peak host memory: a few buffers of one device shard of the largest HF tensor
    (quantized: one layer's tensor, chunked by experts, in fp32, and its quantized form).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    config = load_config(path)
    np_dtype = _np_dtype(dtype)
    fmt = quant.as_format(quantize)
    read_quantization(path)  # validates the quantization scheme before any data is read
    reader = SafetensorsReader(path)
    check_fp8_scales(reader)  # and every FP8 tensor's scale shape
    abstract = abstract_params(config, dtype=dtype)
    target = quant.quantize_params(abstract, fmt)
    leaves = plan_leaves(config, abstract, reader.tensors)
    total = sum(_nbytes(_get(target, lf.path)) for lf in leaves)
    consumed: set[str] = set()
    params: dict = {}
    with _progress(total, "load", progress) as bar:
        for lf in leaves:
            sharding = _get(shardings, lf.path) if shardings is not None else None
            node = _get(target, lf.path)
            if quant.is_quantized(node):
                arr = _place_quantized(node, sharding, lf, lambda g, lf=lf: _quantized_piece(
                    reader, lf, lf.sources[g], fmt, consumed))
                bar.update(_nbytes(node))
                _set(params, lf.path, arr)
                continue
            sharding = sharding if sharding is not None else _default_sharding()

            def read(index, lf=lf, entry=lf.sources[0]):
                return _read_leaf_region(reader, lf, entry, index, np_dtype, consumed)

            if not lf.stacked:
                arr = jax.make_array_from_callback(lf.shape, sharding, read)
            else:
                # One group at a time into a preallocated stacked array, updated in place
                # (donated): host memory holds one device shard of one HF tensor, and
                # the device one group beyond the parameter itself.
                piece_sharding = _piece_sharding(sharding)
                arr = _zeros(lf.shape, np_dtype, sharding)()
                for g, entry in enumerate(lf.sources):
                    piece = jax.make_array_from_callback(
                        lf.shape[1:], piece_sharding, functools.partial(read, entry=entry))
                    arr = _update_layer(sharding)(arr, piece, np.int32(g))
                    del piece
            bar.update(math.prod(lf.shape) * np_dtype.itemsize)
            _set(params, lf.path, arr)
    _check_consumed(reader, consumed)
    return config, params


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype: np.dtype, sharding):
    """Zeros of `shape` in `sharding`; tuples of shapes, dtypes and shardings give a tuple."""
    if isinstance(sharding, tuple):
        return jax.jit(lambda: tuple(jnp.zeros(s, d) for s, d in zip(shape, dtype)), out_shardings=sharding)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _update_layer(sharding):
    """a[g] = x in place (a donated; a and x arrays or tuples of them); g traced, so one
    compilation per leaf shape."""
    return jax.jit(lambda a, x, g: jax.tree_util.tree_map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, g, 0),
                                                          a, x), out_shardings=sharding, donate_argnums=0)


def _host_slice(x, g: int | None) -> np.ndarray:
    """x[g] (or x) on the host; a device array is sliced on device first (one layer moves)."""
    if g is None:
        return np.asarray(x)
    if isinstance(x, np.ndarray):
        return x[g]
    return np.asarray(_index_layer(x, g))


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, sharding=None):
    if kind == "index":  # traced index: one compilation per leaf shape, not per layer
        return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _index_layer(x, g):
    return _jitted("index")(x, np.int32(g))


def save_hf(config: Llama4Config, params, path: str, *, max_shard_bytes: int = 5 << 30,
            progress: bool = False) -> None:
    """Write params as a Hugging Face checkpoint directory transformers loads.

    config.json (from `config.to_hf`), safetensors shards of at most `max_shard_bytes`
    (`model.safetensors` when one is enough, else `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json`). Tensors keep the parameters' dtype and are
    produced one at a time. `path` must not exist or be an empty directory.
    """
    entries = checkpoint_entries(config)
    plan = []  # (name, shape, dtype, produce)
    for e in entries:
        leaves = [_get(params, p) for p in e.paths]
        shapes = [tuple(x.shape[1:]) if e.group is not None else tuple(x.shape) for x in leaves]
        shape = hf_shape(e.rule, shapes[0])
        dt = np.dtype(leaves[0].dtype)

        def produce(e=e, leaves=leaves):
            parts = tuple(_host_slice(x, e.group) for x in leaves)
            return to_hf(e.rule, parts)

        plan.append((e.hf_name, shape, dt, produce))
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        n = math.prod(t[1]) * t[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise CheckpointError(f"export destination {path} is not empty")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config_to_hf(config), "torch_dtype": _torch_dtype_name(plan[0][2])}, f, indent=2)
    total = sum(math.prod(t[1]) * t[2].itemsize for t in plan)
    weight_map = {}
    with _progress(total, "export", progress) as bar:
        for i, shard in enumerate(shards):
            fn = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

            def counted(t):
                name, shape, dt, produce = t

                def p():
                    a = produce()
                    bar.update(a.nbytes)
                    return a
                return (name, shape, dt, p)

            write_safetensors(os.path.join(path, fn), [counted(t) for t in shard])
            weight_map.update({t[0]: fn for t in shard})
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# Files of a Hugging Face directory besides config and weights that the tokenizer,
# processor and generation defaults are read from (`AutoTokenizer`, `AutoProcessor`,
# `generation_config.json`); conversion carries them across so a converted directory
# serves wherever the source did.
SIDE_FILE_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "generation_config", "preprocessor_config",
                      "processor_config", "added_tokens")


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer, chat template, processor and generation config files of `src`
    into `dst` (plain files only; symlinks are copied as the files they point to).
    Returns the names copied."""
    names = sorted(f for f in os.listdir(src) if f.startswith(SIDE_FILE_PREFIXES)
                   and os.path.isfile(os.path.join(src, f)))
    for f in names:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return names


def source_dtype(path: str, reader: SafetensorsReader) -> str:
    """The dtype a checkpoint keeps by default (transformers' `dtype="auto"`).

    config.json's `dtype` (transformers >= 5) or `torch_dtype`, when it is a parameter
    dtype we support; else the dtype shared by the stored floating weights. FP8
    weights do not count: their config names the dtype they dequantize to.
    """
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) in _DTYPES:
            return cfg[key]
    stored = {t.dtype.name for t in reader.tensors.values()
              if t.dtype.kind == "f" or t.dtype.name == "bfloat16"} - {"float64"}
    stored = {d for d in stored if not d.startswith("float8")}
    if len(stored) == 1 and stored <= set(_DTYPES):
        return stored.pop()
    raise CheckpointError(f"{path}: cannot tell the checkpoint's dtype (config.json names none, the weights are "
                          f"{sorted(stored)}); pass one of {list(_DTYPES)}")


def _torch_dtype_name(dt: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dt).name]


def _piece_sharding(sharding):
    """Sharding of one group of a stacked leaf: the stacked sharding without its first axis."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"scanned parameters need a NamedSharding or SingleDeviceSharding, got {sharding}")
