"""Attention of a few new queries over the KV cache, in the cache's own layout.

A decode step is memory bound: each step reads every cached key and value once, and
the cost should be that read. The cache (`llama4_jax.cache`) stores keys transposed,
k [B, K, d, S], and values as v [B, K, S, d], so both products are plain batched
matmuls over (row, KV head) on contiguous [d, S] / [S, d] blocks:

    logits[b, k, g, t, s] = q[b, t, k, g, :] @ k[b, k, :, s]     (contract d: k's rows)
    out[b, t, k, g, :]    = p[b, k, g, t, :] @ v[b, k, :, :]      (contract s: v's rows)

With the [B, S, K, d] layout the backends take, XLA:CPU transposed (copied) the
whole cache slice of every layer before each product and ran the first one with both
operands contracted on their minor axis, several times slower than the read
(benchmarks/generate.py --part context).

A float cache held in its own buffers (one layer's arrays, or a per-group cache's
[1, ...] arrays: `init_cache(per_group=True)`) is read in one pass: one product over
all its slots, one softmax, one product. Each product then reads its whole operand
where it lies, at the memory bandwidth. Anything sliced out of a larger buffer (a
block of slots, or one group of a stacked [G, ...] cache) is first copied by XLA:CPU,
which cost more than the read: in a profile of the decode step at 64K slots (benchmark
model, batch 1) a global layer's read took 7.6 ms in 512-slot blocks from the stacked
cache (4.7 ms of it copying blocks), 3.9 ms in one pass over its own buffer. The pass
keeps [B, H, T, S] fp32 logits, H / (2 K d) of the layer's fp32 key and value bytes
per query (2% for Scout): past `ONE_PASS_MAX_BYTES` of them the blocked read below is
used instead. Both products run on one thread: at 64K slots (K=2, d=32, batch 1, read
from memory, not the CPU's cache) the logits product read its keys at 12-15 GB/s and
the values product its values at 15-19 GB/s, where both cores read 32 GB/s. Splitting
the slots did not spread them over the threads: two products over halves took 1.3-1.5
ms and one batched product over [2, d, S/2] halves 5.0-5.5 ms, against 1.05-1.18 ms
for the one product (XLA:CPU runs a step's kernels one after another: its thunk executor
gives ready kernels to a second thread only when more than 8 are ready at once).

Otherwise the slots are visited in blocks of `block` (a `lax.fori_loop` with an online
softmax, flash-attention style) and only up to the last occupied slot of any row, so a
step reads the occupied part of the cache, not the whole allocation: a stacked cache
(the scanned layers, where the group index is traced), an int8 cache, and a one-pass
cache while at most half of its slots are occupied (`SPARSE_BLOCK`; decided as the step
runs: a run's cache is sized for its longest prompt, and the other rows leave most of
it empty). The blocks' slices are copies, but of `block` slots each. An int8
cache is read as int8: each block is converted as it is sliced, and its per-slot
scales are applied to the logits (keys) and to the probabilities (values), so no
dequantized copy of the cache is ever made. A cache whose slot axis is split over
devices (a `seq` mesh axis) is read in one block (the reductions over the split axis
are then XLA's collectives).

Numerics equal `xla_attention` on the same keys (fp32 logits, softmax statistics and
accumulation); only for a row with no visible key at all (never a real decode row: its
own token is written before it is read) the result differs: uniform over the visited
slots instead of over all of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .reference import INVALID_POS, NEG, visible

__all__ = ["cached_attention", "DEFAULT_BLOCK", "ONE_PASS_MAX_BYTES", "SPARSE_BLOCK"]

# Slots per block: large enough that each product is a proper matmul and the loop's
# per-step cost is small, small enough that a row's block of keys (K * d * block * 4
# bytes: 2 MiB for Scout's K=8, d=128) stays in the CPU's cache between the slice
# (and int8 convert) and the product. Measured at batch 1 and 8, 16K-64K slots, K=2,
# d=32: 512 and 1024 within noise of one block and of each other; 256 and >= 2048
# slower (up to 1.6x).
DEFAULT_BLOCK = 512

# Largest fp32 logits array [B, H, T, S] read in one pass (see the module docstring);
# beyond it the cache is read in blocks, so the step's memory stays bounded.
ONE_PASS_MAX_BYTES = 256 << 20

# Slots per block of the blocked read a one-pass cache takes while at most half of its
# slots are occupied. Measured (8 layers, 4 rows, K=2, d=32, 2304 slots, ms): one pass
# 3.5-3.7 at any occupancy; blocks of 256 1.6 / 2.9 / 5.1 with 300 / 1000 / 2000 slots
# occupied (512: 1.9 / 3.0 / 6.3). The engine's decode step of 4 rows with 128 / 1000
# of 2304 slots occupied: 7.0 / 9.5 ms against 11.6 / 11.8 in one pass.
SPARSE_BLOCK = 256


def _scores(qg, kb, ks):
    """fp32 logits [B, K, G, T, s] of queries [B, K, G, T, d] against one key block [B, K, d, s]."""
    lg = jnp.einsum("bkgtd,bkds->bkgts", qg, kb.astype(qg.dtype), preferred_element_type=jnp.float32)
    return lg if ks is None else lg * ks[:, :, None, None, :]


def _values(p, vb, vs, dtype):
    """Probabilities [B, K, G, T, s] (fp32) times one value block [B, K, s, d], accumulated in fp32."""
    if vs is not None:  # the value scale belongs to the slot: fold it into the probability
        p = p * vs[:, :, None, None, :]
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(dtype), vb.astype(dtype), preferred_element_type=jnp.float32)


def _combine_shards(out, l, m, axes):
    """The softmax over every device's slots from each device's part: out [..., d] the
    unnormalised sum of exp(logit - m) v over its slots, l [...] the sum of exp(logit -
    m), m [...] its largest logit. One all-gather of the three; each part is rescaled
    to the largest m (a part with no visible slot has m = NEG and weighs exp(NEG - m) =
    0 next to any part that has one). The same on every device, in device order."""
    parts = jax.lax.all_gather(jnp.concatenate([out, l[..., None], m[..., None]], axis=-1), axes)
    out, l, m = parts[..., :-2], parts[..., -2], parts[..., -1]
    w = jnp.exp(m - jnp.max(m, axis=0))
    return jnp.sum(out * w[..., None], axis=0), jnp.sum(l * w, axis=0)


def cached_attention(q, k, v, q_pos, k_pos, *, chunk_size: int | None, k_scale=None, v_scale=None,
                     block: int | None = 0, split_slots: bool = False, group=None, shards=None):
    """softmax(q k^T / sqrt(d) + mask) v over a cache, in the cache's layout.

    q [B, T, H, d] (temperature already applied), k [B, K, d, S], v [B, K, S, d] (int8
    with k_scale / v_scale [B, K, S], or float), q_pos [B, T], k_pos [B, S] (the
    positions of the slots; empty slots hold INVALID_POS), chunk_size as for
    `xla_attention`. block: slots per step of the loop (None: one block; 0, the
    default: one pass over a float cache in its own buffers whose logits fit
    ONE_PASS_MAX_BYTES, or blocks of SPARSE_BLOCK while at most half of its >= 2 *
    SPARSE_BLOCK slots are occupied; else DEFAULT_BLOCK);
    split_slots: the slot axis is split over devices, read it in one block.
    group: the cache arrays (not q, q_pos) are stacked over layer groups ([G, ...])
    and group `group` (an int or traced scalar) is read: each block is sliced straight
    from the stacked buffer, so the layer's slice is never copied out first. A static
    group 0 of [1, ...] arrays (a per-group cache) is the whole buffer.
    shards (`sharding.SlotShards`, inside `shard_map`): the cache arrays hold this
    device's share of the slots. Each device reads its share in one pass, and the
    partial softmaxes are combined exactly (`_combine_shards`: one all-gather of each
    shard's output, maximum and sum).
    Returns [B, T, H, d] in q's dtype.
    """
    B, T, H, d = q.shape
    K, S = k.shape[-3], k.shape[-1]
    if isinstance(group, int) and k.shape[0] == 1:  # [1, ...]: indexing it is free (a bitcast)
        k, v, k_pos = k[0], v[0], k_pos[0]
        k_scale, v_scale = (None if x is None else x[0] for x in (k_scale, v_scale))
        group = None
    # With the default block, a float cache in its own buffers is read in one pass, or,
    # while at most half of its slots are occupied, in SPARSE_BLOCK-slot blocks up to the
    # last occupied one (decided when it runs).
    sparse = False
    if block == 0:
        one_pass = group is None and k_scale is None and B * H * T * S * 4 <= ONE_PASS_MAX_BYTES
        block = None if one_pass else DEFAULT_BLOCK
        sparse = one_pass and shards is None and not split_slots and S >= 2 * SPARSE_BLOCK
    dtype = q.dtype
    qg = jnp.transpose(q.reshape(B, T, K, H // K, d), (0, 2, 3, 1, 4))

    def masked(lg, kp):  # scaled after the product, in fp32, as the reference does
        return jnp.where(visible(q_pos, kp, chunk_size)[:, None, None], lg * (1.0 / math.sqrt(d)), NEG)

    def finish(out):  # [B, K, G, T, d] -> [B, T, H, d]
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, d).astype(dtype)

    # The last occupied slot of any row (global layers fill slots in position order; a
    # ring buffer, once full, is occupied whole).
    pos = k_pos if group is None else k_pos[group]
    occupied = jnp.max(jnp.where(pos < INVALID_POS, jnp.arange(1, S + 1, dtype=jnp.int32), 0))

    def one_pass():
        kk, vv, kp, ks, vs = k, v, k_pos, k_scale, v_scale
        if group is not None:
            kk, vv, kp = k[group], v[group], k_pos[group]
            ks, vs = (None if x is None else x[group] for x in (k_scale, v_scale))
        lg = masked(_scores(qg, kk, ks), kp)
        # The normalisation divides the [.., d] output, not the [.., S] probabilities
        # (as the blocked loop does): one pass less over the slots.
        m = jnp.max(lg, axis=-1)
        p = jnp.exp(lg - m[..., None])
        out, l = _values(p, vv, vs, dtype), jnp.sum(p, axis=-1)
        if shards is not None:
            out, l = _combine_shards(out, l, m, shards.axes)
        return finish(out / l[..., None])

    def blocked(block):
        """The slots in blocks of `block` (a `lax.fori_loop` with an online softmax) up
        to the last occupied one; at least one block, so a batch of empty rows gives
        finite (uniform) rows, as the reference does."""
        n_blocks = jnp.maximum((occupied + block - 1) // block, 1)

        def take(x, start, axis):  # `block` slots of x from `start` along `axis` (of group `group`)
            if x is None:
                return None
            if group is None:
                return jax.lax.dynamic_slice_in_dim(x, start, block, axis)
            starts = [jnp.asarray(group, jnp.int32)] + [jnp.int32(0)] * (x.ndim - 1)
            starts[axis + 1] = start
            sizes = (1,) + x.shape[1:axis + 1] + (block,) + x.shape[axis + 2:]
            return jax.lax.dynamic_slice(x, starts, sizes)[0]

        def body(i, carry):
            m, l, acc = carry
            # The last block is shifted back to end at S; its slots that an earlier block
            # already visited are left out by `fresh`.
            start = jnp.minimum(i * block, S - block)
            kb, vb, ks, vs, kp = (take(k, start, 3), take(v, start, 2), take(k_scale, start, 2),
                                  take(v_scale, start, 2), take(k_pos, start, 1))
            fresh = start + jnp.arange(block) >= i * block  # slots not seen by an earlier block
            lg = jnp.where(fresh, masked(_scores(qg, kb, ks), kp), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(lg, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(lg - m_new[..., None])
            l = l * alpha + jnp.sum(p, axis=-1)
            acc = acc * alpha[..., None] + _values(p, vb, vs, dtype)
            return m_new, l, acc

        G = H // K
        init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
                jnp.zeros((B, K, G, T, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        return finish(acc / l[..., None])

    if sparse:
        return jax.lax.cond(occupied * 2 <= S, lambda: blocked(SPARSE_BLOCK), one_pass)
    if block is None or split_slots or shards is not None or S <= block:
        return one_pass()
    return blocked(block)
