"""Splash attention (jax's Pallas TPU kernel) where its static mask is our mask.

`jax.experimental.pallas.ops.tpu.splash_attention` takes one mask over token *indices*,
the same for every batch row: `ChunkedCausalMask` (added to it for Llama 4) for the
chunked RoPE layers, `CausalMask` for the global NoPE layers. Our mask is over
*positions* (`reference.visible`), so the two agree exactly when

    S == T and q_pos[b] == k_pos[b] == arange(T) for every row b,

i.e. self-attention over whole unpadded sequences starting at position 0: training
and a full-sequence forward without a cache. That is the condition, in this order:

  * static (trace time): keys are the queries' own tokens (S == T) and no multi-device
    mesh is active (`llama4_jax.sharding.activate`: the kernel is a custom call the SPMD
    partitioner cannot split, so XLA would gather q/k/v onto every device);
  * dynamic: the positions are contiguous from 0 in every row, checked on device and
    branched with `lax.cond`; left-padded or ragged rows, INVALID_POS slots, a decode
    step or a prefill against a cache take the `fallback` backend.

Everything else our attention does happens before the seam and reaches the kernel in
q and k: NoPE temperature tuning and QK norm are already applied to q (and k), GQA maps
query head h to KV head h // G in both (splash's MHA kernel with K < H KV heads). The
kernel applies no 1/sqrt(d), so q is scaled in fp32 and cast back (one extra rounding of
q in bf16; exact to fp32 rounding in fp32). Its softmax statistics and P @ V are fp32
(the reference casts P to the value dtype first: bf16 results differ by bf16 rounding).
Its mask value is our NEG, so no NaN can appear. The sequence is padded at the end to
a multiple of the block (128 to 512): padded keys sit after every real query, so the
causal mask already hides them, and padded query rows are dropped.

The kernel is compiled only on TPU; elsewhere it runs in Pallas interpret mode (tests
compare it with `xla` on CPU, forward and gradient). `platform.lower_for_tpu` lowers it
for TPU on any host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import platform
from .reference import contiguous_positions, kernel_may_apply

BLOCKS = (512, 256, 128)  # splash's kv compute block must be a multiple of 128 lanes


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(T: int) -> int:
    """Query/key block of the kernel for T tokens (padded to a multiple of 128): the
    largest of BLOCKS dividing the padded length. Untuned (no TPU measurement yet)."""
    Tp = _round_up(T, BLOCKS[-1])
    return next(b for b in BLOCKS if Tp % b == 0)


def default_interpret() -> bool:
    """Interpret the kernel unless tracing for a TPU (where it compiles)."""
    return platform.target() != "tpu"


def _kernel(Tp: int, H: int, chunk_size: int | None, block: int, interpret: bool):
    """The splash MHA kernel for [H, Tp, d] queries. Built inside each trace (it holds
    jax arrays); its numpy mask processing is cached by jax (`process_mask`)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.ChunkedCausalMask((Tp, Tp), chunk_size) if chunk_size else sm.CausalMask((Tp, Tp))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def splash_kernel_attention(q, k, v, *, chunk_size: int | None = None, interpret: bool | None = None):
    """The splash kernel alone, for positions arange(T) in every row (no check).

    q [B, T, H, d], k/v [B, T, K, d] -> [B, T, H, d] in q's dtype. Differentiable (the
    kernel's own dq / dkv backward kernels).
    """
    B, T, H, d = q.shape
    if interpret is None:
        interpret = default_interpret()
    block = block_size(T)
    Tp = _round_up(T, block)
    kernel = _kernel(Tp, H, chunk_size, block, interpret)
    scale = 1.0 / float(d) ** 0.5
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    qt, kt, vt = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (qs, k, v))  # [B, heads, Tp, d]
    out = jax.vmap(kernel)(qt, kt, vt)  # [B, H, Tp, d]
    return out.transpose(0, 2, 1, 3)[:, :T].astype(q.dtype)


def splash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, fallback, interpret: bool | None = None):
    """Attention equal to `xla_attention`: splash where the module's condition holds,
    `fallback(q, k, v, q_pos, k_pos, chunk_size=...)` everywhere else."""
    if not kernel_may_apply(q, k):
        return fallback(q, k, v, q_pos, k_pos, chunk_size=chunk_size)
    with jax.named_scope("splash_attention"):
        return jax.lax.cond(
            contiguous_positions(q_pos, k_pos),
            lambda q, k, v, qp, kp: splash_kernel_attention(q, k, v, chunk_size=chunk_size, interpret=interpret),
            lambda q, k, v, qp, kp: fallback(q, k, v, qp, kp, chunk_size=chunk_size),
            q, k, v, q_pos, k_pos)
