"""The KV cache: an explicit pytree, created here, threaded through `TextModel`.

    cache = {'layer_j': {'k':   [G, B, K, d, S_j],           # j = member of the scanned group
                         'v':   [G, B, K, S_j, d],
                         'pos': [G, B, S_j] int32,            # absolute position per slot
                         ('k_scale', 'v_scale': [G, B, K, S_j] f32 when int8)}}

G = `num_groups` (the scanned `layers` axis), B batch rows, K KV heads, d head dim.
A per-group cache (`init_cache(per_group=True)`, `split_groups`) holds each entry as
a tuple of G entries of [1, B, ...] arrays, one buffer per group: the unrolled model
(`TextModel(scan_layers=False)`, the engine on CPU) reads and writes group g's
buffers in place, where a group sliced out of a stacked array would be copied before
each product (`llama4_jax.kernels.cached`). Batch stays on axis 1 of every leaf.
S_j is `attention_chunk_size` for chunked (RoPE) layers, which keep a ring buffer of
the last chunk (older tokens can never be attended again), and `max_len` for global
(NoPE) layers, where position p lives in slot p. Empty slots hold `INVALID_POS`, so
the position-derived mask ignores them and rows of different lengths (ragged,
left-padded batches) need no separate length array: each row's length is the number
of valid slots its global layers hold.

Keys are stored transposed ([K, d, S] per row) and values as [K, S, d], so a decode
step's two products read each row's keys and values of one KV head as one contiguous
matrix, in place (`llama4_jax.kernels.cached`); `read_cache` gives the [B, S, K, d]
layout the attention backends take (a copy, made for prefills only).

int8 option (`kv_dtype="int8"`): keys and values are stored as symmetric int8 with one
fp32 scale per token and KV head (`model.attention.quantize_kv`), a quarter of the
fp32 bytes (plus 4/d for the scales); the error per element is at most max|x|/254.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Llama4Config, TextConfig
from .model.attention import INVALID_POS, quantize_kv, read_cache

__all__ = ["init_cache", "abstract_cache", "cache_slots", "cache_bytes", "cache_lengths", "split_groups",
           "quantize_kv", "read_cache", "KV_DTYPES"]

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _text(config) -> TextConfig:
    return config.text if isinstance(config, Llama4Config) else config


def cache_slots(config, max_len: int) -> tuple[int, ...]:
    """Slots per group member: the chunk for chunked layers (at most max_len), else max_len."""
    t = _text(config)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return tuple(min(t.attention_chunk_size, max_len) if f.is_chunked else max_len for f in t.group_flags)


def _kv_dtype(kv_dtype, dtype):
    name = jnp.dtype(dtype).name if kv_dtype is None else str(kv_dtype)
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES} (or None for the model dtype), got {kv_dtype!r}")
    return jnp.dtype(name)


def init_cache(config, batch: int, max_len: int, *, dtype="float32", kv_dtype=None, per_group: bool = False):
    """An empty cache for `batch` rows of at most `max_len` positions each.

    dtype: the model (activation) dtype; kv_dtype: None (same as dtype), a float
    dtype name, or "int8" for the quantised cache. per_group: one buffer per group
    (`split_groups`), for the unrolled model.
    """
    t = _text(config)
    G, K, d = t.num_groups, t.num_key_value_heads, t.head_dim
    kvd = _kv_dtype(kv_dtype, dtype)
    cache = {}
    for j, S in enumerate(cache_slots(t, max_len)):
        entry = {
            "k": jnp.zeros((G, batch, K, d, S), kvd),
            "v": jnp.zeros((G, batch, K, S, d), kvd),
            "pos": jnp.full((G, batch, S), INVALID_POS, jnp.int32),
        }
        if kvd == jnp.int8:
            entry["k_scale"] = jnp.zeros((G, batch, K, S), jnp.float32)
            entry["v_scale"] = jnp.zeros((G, batch, K, S), jnp.float32)
        cache[f"layer_{j}"] = entry
    return split_groups(cache) if per_group else cache


def split_groups(cache):
    """A stacked cache ([G, B, ...] leaves) as a per-group cache: each entry a tuple of
    its G groups, [1, B, ...] leaves (new arrays). A per-group cache is returned as it is."""
    return {name: entry if isinstance(entry, tuple) else
            tuple(jax.tree_util.tree_map(lambda x, g=g: x[g:g + 1], entry) for g in range(entry["pos"].shape[0]))
            for name, entry in cache.items()}


def abstract_cache(config, batch: int, max_len: int, *, dtype="float32", kv_dtype=None, per_group: bool = False):
    """Shapes and dtypes of `init_cache(...)` without allocating it."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype=dtype, kv_dtype=kv_dtype,
                                             per_group=per_group))


def cache_bytes(config, batch: int, max_len: int, *, dtype="float32", kv_dtype=None) -> int:
    """Bytes the cache occupies (all layers, all rows)."""
    tree = abstract_cache(config, batch, max_len, dtype=dtype, kv_dtype=kv_dtype)
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def cache_lengths(config, cache):
    """Tokens held per row [B] (positions seen so far), read from a global layer.

    Only defined when the group has a global (non-chunked) layer, as every Llama 4
    config does; a chunked ring buffer forgets how many tokens came before it.
    """
    t = _text(config)
    for j, f in enumerate(t.group_flags):
        if not f.is_chunked:
            entry = cache[f"layer_{j}"]
            pos = (entry[0] if isinstance(entry, tuple) else entry)["pos"][0]  # group 0's [B, S]
            return jnp.sum(pos < INVALID_POS, axis=-1).astype(jnp.int32)
    raise ValueError("cache_lengths needs a global (non-chunked) attention layer in the config")
