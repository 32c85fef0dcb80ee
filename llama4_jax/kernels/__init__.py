"""Attention kernels behind the `model.attention.attend` seam.

Backends registered here (each equal to the `xla` reference, see tests):
  blockwise       pure-JAX flash attention that skips fully-masked key blocks (`blockwise.py`)
  pallas          the Pallas flash kernel; interpret mode off GPU (`pallas_flash.py`)
  ring            ring attention over a `seq` mesh axis (`ring.py`); inner kernel per platform
  ring_blockwise  ring attention with the blockwise inner kernel
  ring_pallas     ring attention with the Pallas inner kernel
  auto            the platform/length default (`default_attention_impl`)
"""

from __future__ import annotations


from ..model.attention import attend, register_backend
from . import blockwise, pallas_flash, ring

register_backend("blockwise", blockwise.blockwise_attention)
register_backend("pallas", pallas_flash.pallas_attention)
register_backend("ring", ring.make_backend(None))
register_backend("ring_blockwise", ring.make_backend("blockwise"))
register_backend("ring_pallas", ring.make_backend("pallas"))

# Below this many tokens one fused [T, S] einsum beats the blocked loop on CPU.
XLA_MAX_LEN = 1024


def default_attention_impl(seq_len: int, *, mesh=None) -> str:
    """The attention backend `attention_impl='auto'` resolves to.

    `ring` when a mesh with more than one device on its `seq` axis is given; otherwise
    `xla` for short sequences (<= XLA_MAX_LEN, where the [T, S] mask is small and one
    fused einsum is fastest), and the pure-JAX `blockwise` backend for longer ones on
    every platform. The Pallas kernel lowers for CUDA (tested through `jax.export`) but
    has not been run on GPU hardware yet, so it is opt-in (`attention_impl="pallas"`)
    rather than the GPU default.
    """
    if mesh is not None and ring.SEQ_AXIS in mesh.axis_names and mesh.shape[ring.SEQ_AXIS] > 1:
        return "ring"
    return "xla" if seq_len <= XLA_MAX_LEN else "blockwise"


def auto_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `auto` backend: `default_attention_impl` of the longer of T and S (no mesh).

    Lets code that calls the seam directly (the generate engine, TextModel) ask for the
    platform default; a prefill picks by prompt length, a decode step by cache length
    (where `blockwise` also skips the empty cache blocks).
    """
    impl = default_attention_impl(max(q.shape[1], k.shape[1]))
    return attend(q, k, v, q_pos, k_pos, chunk_size=chunk_size, impl=impl)


register_backend("auto", auto_attention)

__all__ = ["blockwise", "pallas_flash", "ring", "default_attention_impl", "auto_attention", "XLA_MAX_LEN"]
