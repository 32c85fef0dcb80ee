"""Positions, the mask rule and the reference attention: the leaf every backend shares.

Masks are never passed around. Every query and key carries its absolute position
(per row, so left padding shifts nothing), and the mask follows from them:

    key j is visible to query i  iff  k_pos[j] <= q_pos[i]
                                      and (not chunked or k_pos[j] // C == q_pos[i] // C)

Padding and empty cache slots get the position `INVALID_POS`, which fails the causal
test for every query. This is HF's mask exactly: chunks are aligned to the first real
token of each row (HF offsets them by the leading-pad count), not to a sliding window.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Larger than any real position, small enough that pos // chunk stays in int32.
INVALID_POS = 2**30
# Finite, so a fully-masked row gives a uniform softmax instead of NaN.
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_pos, k_pos, chunk_size: int | None):
    """Boolean mask [B, T, S] from query positions [B, T] and key positions [B, S]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    m = kp <= qp
    if chunk_size:
        m = m & (kp // chunk_size == qp // chunk_size)
    return m


def xla_attention(q, k, v, q_pos, k_pos, *, chunk_size: int | None = None):
    """Reference attention: softmax(q k^T / sqrt(d) + mask) v with GQA.

    q [B, T, H, d] (already temperature-scaled), k/v [B, S, K, d]; H = K * G and
    query head h reads KV head h // G (HF's repeat_kv). Logits, softmax statistics
    and the probability-weighted sum accumulate in fp32 (as SDPA does).
    """
    B, T, H, d = q.shape
    K = k.shape[2]
    # Heads go major before the matmuls ([B, K, G, T, d] queries, [B, K, S, d] keys and
    # values), so both einsums are plain batched GEMMs over (b, k) on operands laid out
    # as they lie, and the [B, K, G, T, S] probabilities are read by P @ V in the layout
    # the softmax wrote. Contracting over the token-major [B, T, K, d] inputs made
    # XLA:CPU transpose the whole probability tensor twice per call (1.3-1.8x slower on
    # CPU: vision tiles 69 -> 40 ms, 8 x 128 tokens 6.5 -> 5.0 ms; gradients 1.3-1.45x).
    qg = q.reshape(B, T, K, H // K, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkgtd,bksd->bkgts", qg, kt, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(d))
    mask = visible(q_pos, k_pos, chunk_size)[:, None, None]
    logits = jnp.where(mask, logits, NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, d).astype(q.dtype)
