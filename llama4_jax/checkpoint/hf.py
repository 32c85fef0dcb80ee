"""Hugging Face checkpoint directories: streaming load (`load_hf`) and export (`save_hf`).

`load_hf` builds every parameter with `jax.make_array_from_callback`, so each device
reads only its own slice of each HF tensor. Scanned parameters are filled one group
(one HF tensor) at a time into a preallocated, donated device array, so host memory is
bounded by a few buffers of one HF tensor (read, transposed, and on the CPU backend the
device copy: ~2x the largest tensor measured), independent of depth. Every HF tensor
must be consumed and every parameter produced: `plan_leaves` and `_check_consumed`
check both directions.

`save_hf` writes safetensors shards one tensor at a time, the exact inverse of the
reading transforms (bitwise round trip).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Llama4Config, load_config, to_hf as config_to_hf
from ..model.text import abstract_params
from .base import _DTYPES, CheckpointError, _default_sharding, _get, _np_dtype, _progress, _set
from .names import Entry, Leaf, _region_to_hf, checkpoint_entries, hf_shape, plan_leaves, to_hf
from .quantized import _is_ignored, _read_hf, read_quantization
from .safetensors_io import SafetensorsReader, _norm_region, write_safetensors


def _read_leaf_region(reader: SafetensorsReader, leaf: Leaf, entry: Entry, region, dtype,
                      consumed: set | None) -> np.ndarray:
    """The region of one layer's (unstacked) leaf produced by `entry`, in `dtype`."""
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    region = _norm_region(region, shape)
    if "{e}" in entry.hf_name:  # one HF tensor per expert: leading axis of our leaf
        parts = [_read_view(reader, entry.hf_name.format(e=e), entry.rule, leaf.k, shape[1:], region[1:], dtype,
                            consumed) for e in range(region[0].start, region[0].stop)]
        return np.stack(parts) if parts else np.empty(tuple(s.stop - s.start for s in region), dtype)
    return _read_view(reader, entry.hf_name, entry.rule, leaf.k, shape, region, dtype, consumed)


def _read_view(reader, name, rule, k, shape, region, dtype, consumed) -> np.ndarray:
    info = reader.info(name)
    want = hf_shape(rule, shape)
    if info.shape != want:
        raise CheckpointError(f"{reader.path}: tensor {name} has shape {info.shape}, expected {want}")
    hf_region, gathers, perm = _region_to_hf(rule, k, shape, region)
    x = _read_hf(reader, name, hf_region, consumed)
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


def _check_consumed(reader: SafetensorsReader, consumed: set) -> None:
    left = sorted(k for k in reader.tensors if k not in consumed and _is_ignored(k) is None)
    if left:
        more = f" and {len(left) - 8} more" if len(left) > 8 else ""
        raise CheckpointError(f"{reader.path}: tensors not used by the model: {left[:8]}{more}")


def load_hf(path: str, *, dtype: str = "bfloat16", shardings=None, progress: bool = False):
    """Read a Hugging Face Llama 4 checkpoint directory into (config, params) on device.

    Args:
      path: directory with config.json and safetensors weights (one file, several, or
        shards with `model.safetensors.index.json`). FP8 weights are dequantized.
      dtype: parameter dtype, "bfloat16" | "float32" | "float16".
      shardings: None (every parameter on the default device) or a pytree with the
        structure of the params (`{'params': ...}`) whose leaves are
        `jax.sharding.Sharding`s or None (default device). Each device reads only its
        slice of each HF tensor; a scanned leaf's slice spans one HF tensor per group.
      progress: show a tqdm bar over the bytes read.

    Returns: (Llama4Config, params) with params a tree of `jax.Array`.
    Peak host memory: a few buffers of one device shard of the largest HF tensor.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    config = load_config(path)
    np_dtype = _np_dtype(dtype)
    read_quantization(path)  # validates the quantization scheme before any data is read
    reader = SafetensorsReader(path)
    abstract = abstract_params(config, dtype=dtype)
    leaves = plan_leaves(config, abstract, reader.tensors)
    total = sum(math.prod(lf.shape) * np_dtype.itemsize for lf in leaves)
    consumed: set[str] = set()
    params: dict = {}
    with _progress(total, "load", progress) as bar:
        for lf in leaves:
            sharding = _get(shardings, lf.path) if shardings is not None else None
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
                arr = _zeros(lf.shape, np_dtype.name, sharding)()
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
def _zeros(shape, dtype: str, sharding):
    return jax.jit(lambda: jnp.zeros(shape, _np_dtype(dtype)), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _update_layer(sharding):
    """a[g] = x in place (a donated); g traced, so one compilation per leaf shape."""
    return jax.jit(lambda a, x, g: jax.lax.dynamic_update_index_in_dim(a, x, g, 0), out_shardings=sharding,
                   donate_argnums=0)


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
