"""Positions, the mask rule and the reference attention: the leaf every backend shares.

Masks are never passed around. Every query and key carries its absolute position
(per row, so left padding shifts nothing), and the mask follows from them:

    key j is visible to query i  iff  k_pos[j] <= q_pos[i]
                                      and (not chunked or k_pos[j] // C == q_pos[i] // C)

Padding and empty cache slots get the position `INVALID_POS`, which fails the causal
test for every query. This is HF's mask exactly: chunks are aligned to the first real
token of each row (HF offsets them by the leading-pad count), not to a sliding window.

Packed rows (several training examples end to end, `segment_positions`) keep this
rule: the mask position of a token is `segment * span + its position in its segment`,
with `span` the row length rounded up to a multiple of the chunk, and every layer takes
a chunk: the chunked layers their own (which divides `span`, so a segment's chunks
start at its first token, as a lone prompt's do), the global layers `span` itself. A
token then sees exactly the earlier tokens of its own segment, on every backend, and
the blocked backends skip the other segments' key blocks. RoPE and the attention
temperature take the position within the segment, so each example is computed as if
it were alone in its row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .. import sharding  # the mesh context only (sharding imports nothing of the package)

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


def segment_span(seq_len: int, chunk_size: int | None) -> int:
    """The mask-position stride between the segments of a packed row of `seq_len` tokens:
    seq_len rounded up to a multiple of the chunk (see the module docstring). Raises
    ValueError when a row that long could hold mask positions past INVALID_POS."""
    span = -(-seq_len // chunk_size) * chunk_size if chunk_size else seq_len
    if seq_len * span >= INVALID_POS:
        raise ValueError(f"packed rows (segment_ids) of {seq_len} tokens are too long: their mask positions "
                         f"would reach {seq_len} x {span}, past {INVALID_POS} (rows of up to 16,384 tokens fit)")
    return span


def segment_starts(segment_ids):
    """bool [B, T]: the tokens that start a segment of a packed row (the first token, and
    every token whose id differs from the one before)."""
    return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)


def segment_positions(segment_ids, valid, chunk_size: int | None):
    """(positions, mask positions, span) of packed rows.

    segment_ids int [B, T]: a new segment starts wherever the id differs from the token
    before (ids need only differ between neighbours; padding may carry any id, it is
    excluded by `valid`). positions [B, T]: each token's position within its segment
    (what RoPE and the attention temperature take); mask positions: `segment * span +
    position`, the positions the mask rule takes, with span = `segment_span(T,
    chunk_size)`, which the global layers take as their chunk.
    """
    T = segment_ids.shape[1]
    span = segment_span(T, chunk_size)
    t = jnp.arange(T, dtype=jnp.int32)[None]
    start = segment_starts(segment_ids)
    first = jax.lax.cummax(jnp.where(start, t, 0), axis=1)  # index of the segment's first token
    segment = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1
    positions = jnp.where(valid, t - first, 0).astype(jnp.int32)
    return positions, segment * span + positions, span


def contiguous_positions(q_pos, k_pos):
    """bool scalar: every row's query and key positions are 0, 1, ..., T-1 (S == T).

    Where this holds, our position mask is the index mask a fused kernel builds itself
    (causal, or chunked causal with chunks from index 0): the device-side half of the
    condition under which `splash` and `cudnn` run their kernels."""
    ar = jnp.arange(q_pos.shape[1], dtype=q_pos.dtype)[None]
    return jnp.all(q_pos == ar) & jnp.all(k_pos == ar.astype(k_pos.dtype))


def kernel_may_apply(q, k) -> bool:
    """The trace-time half of that condition: self-attention (S == T) and no active
    multi-device mesh (`sharding.activate`: a fused kernel is a custom call the SPMD
    partitioner cannot split, so XLA would gather q/k/v onto every device)."""
    ctx = sharding.active()
    multi = ctx is not None and ctx[0].size > 1
    return q.shape[1] == k.shape[1] and not multi


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
