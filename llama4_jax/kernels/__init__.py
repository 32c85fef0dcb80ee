"""Attention kernels behind the one `attend` seam, and the table that names them.

Backends (each equal to the `xla` reference, see tests):
  xla             einsum + mask, the reference (`reference.py`)
  blockwise       pure-JAX flash attention that skips fully-masked key blocks (`blockwise.py`)
  pallas          the Pallas flash kernel; interpret mode off GPU (`pallas_flash.py`)
  splash          jax's splash attention (Pallas TPU) where positions are contiguous
                  from 0, the accelerator default elsewhere (`splash.py`); interpret off TPU
  cudnn           cuDNN flash attention (jax.nn.dot_product_attention) where positions
                  are contiguous from 0, the platform default elsewhere (`cudnn.py`);
                  jax.nn's XLA implementation off a GPU
  ring            ring attention over a `seq` mesh axis (`ring.py`); inner kernel per platform
  ring_blockwise  ring attention with the blockwise inner kernel
  ring_pallas     ring attention with the Pallas inner kernel
  auto            the platform/length default (`default_attention_impl`)

The table is written out here; `register_backend` adds a user's own implementation.
This package depends on nothing of the model (`reference.py` is its leaf: positions,
the mask rule, the reference); the model imports `attend` from here. Platform choices
are made while tracing, from `platform.target()` (see `platform.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from . import blockwise, cudnn, pallas_flash, platform, ring, splash
from . import platform as _platform  # `platform` is also a parameter name below
from .reference import xla_attention

# Up to this many tokens (query or key) one fused [T, S] einsum beats the blocked loop
# on CPU, or is within a few percent of it. Measured on the Scout-shaped benchmark
# model (hidden 256, 8 heads, 2 KV heads, fp32, 2 threads, 256 x 256 tiles), prefill
# time, xla vs blockwise, medians of 5 interleaved: 1 prompt x 100 tokens into 144
# slots 86 vs 104 ms; 8 x 120 into 144 282 vs 340; 1 x 120 into 256 63 vs 67; 8 x 120
# into 256 283 vs 241; 8 x 60 into 192 136 vs 133. Past it: 1 x 200 into 272 155 vs
# 126; 8 x 200 into 272 794 vs 626; 4 x 250 into 272 410 vs 388. Re-measured after `xla`
# put heads major (engine prefill, medians of 6): 1 x 384 145 vs 160 ms, 1 x 512 171 vs
# 173, 1 x 768 559 vs 307; 4 x 384 678 vs 642, 8 x 300 1303 vs 1156: still the point.
XLA_MAX_LEN = 256
# On GPU the fused einsum stays fastest much longer (H200, 16K tokens, chunk 8192, fp32:
# 17 ms forward against blockwise's 33 ms with the chunked mask, 17 against 56 with the
# global one; benchmarks/results/gpu-h200.md); its cost is the [B, H, T, S] fp32 score
# array, so it is used while that stays under this many bytes.
GPU_XLA_MAX_SCORE_BYTES = 4 << 30


def accelerator_default(seq_len: int, *, batch_heads: int = 1, key_len: int | None = None) -> str:
    """`xla` while its fp32 scores (batch_heads x seq_len x key_len x 4 bytes) stay under
    GPU_XLA_MAX_SCORE_BYTES, then `blockwise`: the GPU default, measured on the H200, and
    the TPU fallback where splash does not apply (unmeasured on TPU)."""
    scores = 4 * batch_heads * seq_len * (key_len or seq_len)
    return "xla" if scores <= GPU_XLA_MAX_SCORE_BYTES else "blockwise"


def default_attention_impl(seq_len: int, *, mesh=None, batch_heads: int = 1, key_len: int | None = None,
                           platform: str | None = None, dtype=None) -> str:
    """The attention backend `attention_impl='auto'` resolves to.

    `ring` when a mesh with more than one device on its `seq` axis is given. Otherwise,
    by platform (`platform`, default `platform.target()`, read at trace time):
      * CPU: `xla` for short sequences (<= XLA_MAX_LEN, where the [T, S] mask is small
        and one fused einsum is fastest) and the pure-JAX `blockwise` backend for
        longer ones;
      * GPU: `cudnn` for bf16/fp16 activations (`dtype`), which runs cuDNN's flash
        attention where positions are contiguous from 0 (training, a forward without
        cache; on the H200 at 16K tokens 0.69 ms forward and 1.8 ms with the backward
        against xla's 6.5 / 26 ms) and `accelerator_default` elsewhere; for other or
        unknown dtypes `accelerator_default` (`xla` while its scores fit 4 GiB, then
        `blockwise`). The Pallas kernel runs on GPU (its bf16 forward measured 0.98 ms
        at 16K) but its backward is far slower (870 ms), so it stays opt-in
        (`attention_impl="pallas"`);
      * TPU: `splash`, which runs jax's splash kernel where positions are contiguous
        from 0 (training, a forward without cache) and `accelerator_default` elsewhere.
    """
    if mesh is not None and ring.SEQ_AXIS in mesh.axis_names and mesh.shape[ring.SEQ_AXIS] > 1:
        return "ring"
    target = _platform.normalize(platform) if platform else _platform.target()
    if target == "tpu":
        return "splash"
    if target == "gpu":
        if dtype is not None and jnp.dtype(dtype) in cudnn.KERNEL_DTYPES:
            return "cudnn"
        return accelerator_default(seq_len, batch_heads=batch_heads, key_len=key_len)
    return "xla" if seq_len <= XLA_MAX_LEN else "blockwise"


def _shape_default(q, k, *, dtype=None) -> str:
    """`default_attention_impl` for these q [B, T, H, d] and k [B, S, K, d] (no mesh): a
    prefill picks by prompt length, a decode step by cache length."""
    return default_attention_impl(max(q.shape[1], k.shape[1]), batch_heads=q.shape[0] * q.shape[2],
                                  key_len=k.shape[1], dtype=dtype)


def auto_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `auto` backend: `default_attention_impl` for these shapes and q's dtype.

    Lets code that calls the seam directly (the generate engine, TextModel) ask for the
    platform default; a prefill picks by prompt length, a decode step by cache length
    (where `blockwise` also skips the empty cache blocks).
    """
    return attend(q, k, v, q_pos, k_pos, chunk_size=chunk_size, impl=_shape_default(q, k, dtype=q.dtype))


def cudnn_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `cudnn` backend: cuDNN's kernel where `cudnn.py`'s condition holds, else the
    platform default for these shapes without it."""
    fallback = _BACKENDS[_shape_default(q, k)]
    return cudnn.cudnn_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, fallback=fallback)


def splash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `splash` backend: the splash kernel where `splash.py`'s condition holds, else
    `accelerator_default` for these shapes."""
    fallback = _BACKENDS[accelerator_default(max(q.shape[1], k.shape[1]), batch_heads=q.shape[0] * q.shape[2],
                                             key_len=k.shape[1])]
    return splash.splash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, fallback=fallback)


_BACKENDS = {
    "xla": xla_attention,
    "blockwise": blockwise.blockwise_attention,
    "pallas": pallas_flash.pallas_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
    "ring": ring.make_backend(None),
    "ring_blockwise": ring.make_backend("blockwise"),
    "ring_pallas": ring.make_backend("pallas"),
    "auto": auto_attention,
}


def register_backend(name: str, fn) -> None:
    """Make an attention implementation selectable as `attention_impl=name`; fn has
    `xla_attention`'s signature and must equal it."""
    _BACKENDS[name] = fn


def backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def attend(q, k, v, q_pos, k_pos, *, chunk_size: int | None, impl: str = "xla"):
    """Dispatch to the attention backend `impl` (see `backends()`)."""
    try:
        fn = _BACKENDS[impl]
    except KeyError:
        raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(_BACKENDS)}") from None
    return fn(q, k, v, q_pos, k_pos, chunk_size=chunk_size)


__all__ = ["attend", "backends", "register_backend", "default_attention_impl", "accelerator_default", "auto_attention",
           "XLA_MAX_LEN", "GPU_XLA_MAX_SCORE_BYTES", "blockwise", "cudnn", "pallas_flash", "platform", "ring",
           "splash"]
