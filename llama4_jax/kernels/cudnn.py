"""cuDNN flash attention (`jax.nn.dot_product_attention`) where its causal mask is ours.

cuDNN's fused attention takes a causal mask over token *indices*, the same for every
row. Our mask is over *positions* (`reference.visible`); the two agree exactly for
self-attention over whole unpadded rows starting at position 0 (`reference.
contiguous_positions`, checked on device, and `reference.kernel_may_apply`, checked
while tracing: S == T, no multi-device mesh), as for splash on TPU (`splash.py`):
training and a full-sequence forward without a cache. Everything else (left-padded or
packed rows, a prefill against a cache, a decode step) takes the `fallback` backend.

  * global (NoPE) layers: one causal call over the row;
  * chunked (RoPE) layers: attention within each chunk of C tokens, chunks aligned to
    position 0. That is causal attention over the row reshaped to [B * T // C, C, ...]
    (one call over the whole chunks) plus one causal call over the T % C tokens of the
    last partial chunk, if any: no token is padded and no score outside the chunk
    diagonal is computed.

GQA maps query head h to KV head h // G in both (cuDNN takes K < H heads). The scale
1/sqrt(d) is the kernel's; NoPE temperature and QK norm are already in q and k.
cuDNN runs bf16/fp16 inputs (fp32 softmax statistics and accumulation) and has its
own backward kernels, so training uses it too.

On the H200 (benchmarks/results/gpu-h200.md, 16K tokens, chunk 8192, 4/2 heads of 128,
bf16) these calls, run as the validation's candidate before this backend existed, took
0.69 ms forward and 1.80 ms forward + backward against `xla`'s
6.52 / 26.42 ms and `pallas`'s 0.98 / 870 ms, at the error of the bf16 `xla`
reference (forward 1.3e-2 against 1.7e-2; gradients 2.8e-2 against 2.0e-2): `auto`
picks it on a CUDA GPU for bf16/fp16 activations.

Where cuDNN cannot run (no CUDA backend in this process, including a CPU host that
traces a GPU program with `platform.tracing_for`; an fp32 input on a GPU; a head dim
cuDNN refuses, found by tracing the call once) the backend is the fallback. Off a GPU
the same reshaped calls run through jax.nn's XLA implementation instead, so the CPU
tests check everything here but the kernel (as `pallas` runs in interpret mode).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import platform
from .reference import contiguous_positions, kernel_may_apply

KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)


def default_implementation() -> str:
    """jax.nn.dot_product_attention's implementation for the program being traced:
    'cudnn' for a GPU, 'xla' elsewhere."""
    return "cudnn" if platform.target() == "gpu" else "xla"


def _causal(q, k, v, impl: str):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation=impl)


def chunked_causal(q, k, v, *, chunk_size: int | None, implementation: str | None = None):
    """The kernel alone, for positions arange(T) in every row (no check).

    q [B, T, H, d], k/v [B, T, K, d] -> [B, T, H, d] in q's dtype: causal attention,
    within chunks of `chunk_size` tokens from position 0 when given. implementation:
    'cudnn' or 'xla' (jax.nn's names; default `default_implementation()`).
    """
    impl = implementation or default_implementation()
    B, T, H, d = q.shape
    if not chunk_size or T <= chunk_size:
        return _causal(q, k, v, impl)
    n = T // chunk_size
    whole = n * chunk_size

    def chunks(x):  # [B, n * C, heads, d] -> [B * n, C, heads, d]
        return x[:, :whole].reshape(B * n, chunk_size, *x.shape[2:])

    out = _causal(chunks(q), chunks(k), chunks(v), impl).reshape(B, whole, H, d)
    if whole == T:
        return out
    tail = _causal(q[:, whole:], k[:, whole:], v[:, whole:], impl)
    return jnp.concatenate([out, tail], axis=1)


def cudnn_runs(q, k, v, chunk_size: int | None) -> bool:
    """Whether cuDNN takes this call: a bf16/fp16 trace for a GPU whose jax finds cuDNN
    and accepts these shapes. jax checks cuDNN's presence and the head dim while
    tracing, so the call is traced once here (abstractly, no compilation)."""
    if platform.target() != "gpu" or q.dtype not in KERNEL_DTYPES:
        return False
    try:
        jax.eval_shape(lambda q, k, v: chunked_causal(q, k, v, chunk_size=chunk_size, implementation="cudnn"),
                       q, k, v)
    except (RuntimeError, NotImplementedError, ValueError):  # no cuDNN here, or shapes it refuses
        return False
    return True


def cudnn_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, fallback):
    """Attention equal to `xla_attention`: the cuDNN kernel (jax.nn's XLA implementation
    off a GPU) where the module's condition holds, `fallback(q, k, v, q_pos, k_pos,
    chunk_size=...)` everywhere else."""
    if not kernel_may_apply(q, k) or (platform.target() == "gpu" and not cudnn_runs(q, k, v, chunk_size)):
        return fallback(q, k, v, q_pos, k_pos, chunk_size=chunk_size)
    with jax.named_scope("cudnn_attention"):
        return jax.lax.cond(
            contiguous_positions(q_pos, k_pos),
            lambda q, k, v, qp, kp: chunked_causal(q, k, v, chunk_size=chunk_size),
            lambda q, k, v, qp, kp: fallback(q, k, v, qp, kp, chunk_size=chunk_size),
            q, k, v, q_pos, k_pos)
