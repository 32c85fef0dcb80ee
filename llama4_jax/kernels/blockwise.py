"""Blockwise (flash) attention in pure JAX: online softmax over key blocks.

The sequence is cut into query blocks of `block_q` rows and key blocks of `block_k`
columns. A *block plan* (computed from the positions, see `block_plan`) lists, for every
query block, the key blocks that may hold a visible key; all other blocks are never
touched. With the chunked mask a query block meets only the key blocks of its own
chunk, so a chunked layer costs O(S * C) work instead of O(S^2); memory is O(S) since
no [T, S] matrix is ever built, only [block_q, block_k] tiles.

Numerics: logits, the running max `m`, the running sum `l` and the output accumulator
are fp32 (as in the `xla` reference); probabilities are cast to the value dtype before
the P @ V product, as the reference does. The log-sum-exp of every query row is returned
(fp32) so partial results over disjoint key sets can be merged exactly (`merge`), which
is what ring attention does. A query row that sees no key gets output 0 and
lse = `NEG` (a finite sentinel, so merging never produces NaN).

Gradients: `flash_attention` has a custom VJP (the FlashAttention-2 backward, which
recomputes the probabilities tile by tile from the saved lse), so training memory is
also O(S). It accepts a cotangent for the lse output too, which makes functions built
on top of it (ring attention merges) differentiable by ordinary autodiff.

Dimension letters: B batch, T queries, S keys, H query heads, K kv heads, G = H / K,
d head dim; n_q / n_k numbers of query / key blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .reference import INVALID_POS

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for logits and lse
_MAX_POS = INVALID_POS - 1

# Tile sizes, measured on CPU (2 threads, fp32, causal, chunk 8192, forward, medians of
# 7 interleaved in one process), in ms for 256 x 256 / 256 x 512 / 128 x 256 /
# 512 x 512 tiles: 8 heads, 2 KV heads, d 32 at 1 x 1000 tokens 24.1 / 30.8 / 22.1 /
# 34.9; 4 x 600 74.8 / 101 / 54.6 / 146; 8 x 1000 206 / 250 / 202 / 280; 1 x 4000 195 /
# 210 / 212 / 245; Scout's heads (40 / 8, d 128) at 1 x 1000 217 / 257 / 231 / 298.
# 128 x 256 against 256 x 256 again (9 runs): faster where 256-row tiles pad most
# (4 x 600: 39.6 vs 55.1; 2 x 2000: 112 vs 126) and for the gradient at 2 x 1024 (124
# vs 168; 1 x 2048: 278 vs 280), slower on long prompts (1 x 4000: 209 vs 174) and with
# Scout's heads (236 vs 226): 256 x 256 serves the long prefill pieces best.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


# --------------------------------------------------------------------------------------
# Block plan: which key blocks can be visible to which query block
# --------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# Chunks of at least this many positions cap the tile size (see `block_sizes`).
MIN_CHUNK_TILE = 64


def block_sizes(T: int, S: int, block_q: int, block_k: int, chunk_size: int | None = None) -> tuple[int, int]:
    """Block sizes actually used: the requested ones, or the whole axis when shorter.

    A chunked layer whose chunk is smaller than the tiles (and at least
    MIN_CHUNK_TILE) uses tiles of the chunk size, so it touches only the tiles of its
    own chunks: measured on CPU, a training step of an 8-layer width-128 model with
    chunk 128 on 8 x 512 tokens took 1.04 s with 128 x 128 tiles, 1.35 s with
    256 x 512 ones. Smaller chunks keep the default tiles (per-tile overhead
    would outweigh the skipped work).
    """
    if chunk_size and MIN_CHUNK_TILE <= chunk_size:
        block_q, block_k = min(block_q, chunk_size), min(block_k, chunk_size)
    return (T if T <= block_q else block_q), (S if S <= block_k else block_k)


def block_need(q_pos, k_pos, chunk_size: int | None, bq: int, bk: int):
    """bool [n_q, n_k]: key block j may contain a key visible to query block i.

    A conservative test on position ranges (taken over the whole batch, so one plan
    serves every row): key block j can matter to query block i iff its smallest valid
    key position is <= the largest query position of block i and, for chunked layers,
    the chunk ranges of the two blocks overlap. It is exact for sorted positions (the
    prefill case) and safe for any order (ring-buffer caches).

    Args:
      q_pos: int32 [B, T] with T a multiple of bq. Rows with position < 0 see nothing.
      k_pos: int32 [B, S] with S a multiple of bk; INVALID_POS marks padding.
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    qb = q_pos.reshape(B, T // bq, bq)
    kb = k_pos.reshape(B, S // bk, bk)
    q_ok = qb >= 0
    q_lo = jnp.min(jnp.where(q_ok, qb, _MAX_POS), axis=(0, 2))  # [n_q]
    q_hi = jnp.max(jnp.where(q_ok, qb, -1), axis=(0, 2))
    k_ok = kb < INVALID_POS
    k_lo = jnp.min(jnp.where(k_ok, kb, _MAX_POS), axis=(0, 2))  # [n_k]
    k_hi = jnp.max(jnp.where(k_ok, kb, -1), axis=(0, 2))
    need = (k_hi[None, :] >= 0) & (q_hi[:, None] >= 0) & (k_lo[None, :] <= q_hi[:, None])
    if chunk_size:
        c = chunk_size
        need &= (k_lo[None, :] // c <= q_hi[:, None] // c) & (k_hi[None, :] // c >= q_lo[:, None] // c)
    return need


def block_plan(q_pos, k_pos, chunk_size: int | None, bq: int, bk: int):
    """The needed key blocks of every query block (see `block_need`), as index lists.

    Returns idx int32 [n_q, n_k] (the needed key blocks of query block i first,
    ascending) and cnt int32 [n_q] (how many entries of idx[i] are needed).
    """
    return _compact(block_need(q_pos, k_pos, chunk_size, bq, bk))


def _compact(need):
    """[n, m] bool -> (indices of the True columns first, ascending [n, m], counts [n])."""
    idx = jnp.argsort(~need, axis=1, stable=True).astype(jnp.int32)
    return idx, jnp.sum(need, axis=1, dtype=jnp.int32)


def pad_inputs(q, k, v, q_pos, k_pos, bq: int, bk: int):
    """Pad T to a multiple of bq (query position -1: sees nothing) and S to a multiple
    of bk (key position INVALID_POS: seen by nothing)."""
    T, S = q.shape[1], k.shape[1]
    pt, ps = _round_up(T, bq) - T, _round_up(S, bk) - S
    if pt:
        q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pt)), constant_values=-1)
    if ps:
        k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, ps)), constant_values=INVALID_POS)
    return q, k, v, q_pos, k_pos


def tile_mask(qp, kp, chunk_size: int | None):
    """Visibility of a [bq, bk] tile from positions [B, bq] and [B, bk] -> [B, bq, bk].

    The same rule as `reference.visible`, plus: a query with position < 0 (block
    padding) sees nothing, and a padded key (INVALID_POS) is never visible.
    """
    m = (kp[:, None, :] <= qp[:, :, None]) & (qp[:, :, None] >= 0)
    if chunk_size:  # chunk ids per row before broadcasting: no per-element division
        m &= (kp // chunk_size)[:, None, :] == (qp // chunk_size)[:, :, None]
    return m


def tile_full(qp, kp, chunk_size: int | None):
    """bool scalar: every key of the tile is visible to every query (no mask needed).

    True iff all positions are real, the latest key precedes the earliest query and,
    chunked, all of them lie in one chunk. O(bq + bk) work.
    """
    q_lo, q_hi, k_hi = jnp.min(qp), jnp.max(qp), jnp.max(kp)
    full = (q_lo >= 0) & (k_hi < INVALID_POS) & (k_hi <= q_lo)
    if chunk_size:
        full &= jnp.min(kp) // chunk_size == q_hi // chunk_size  # min key .. max query in one chunk
    return full


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets (all fp32).

    out_* [..., d] normalised outputs, lse_* [...] their log-sum-exps; the result is the
    attention over the union: weights exp(lse_x - lse) with lse = logaddexp(lse_a, lse_b).
    Empty parts (lse = NEG) get weight 0 next to any non-empty part.
    """
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    tot = wa + wb
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / tot[..., None]
    return out, m + jnp.log(tot)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


def _split_heads(q, K):
    B, T, H, d = q.shape
    return q.reshape(B, T, K, H // K, d)


def _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk):
    """out fp32 [B, T, H, d], lse fp32 [B, T, H]; shapes already padded to the blocks."""
    B, T, H, d = q.shape
    K = k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(d)
    idx, cnt = block_plan(q_pos, k_pos, chunk_size, bq, bk)
    qg = _split_heads(q, K).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, d]

    def q_block(i):
        with jax.named_scope("flash_q_block"):
            qb = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)  # [B, K, G, bq, d]
            qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)

            def update(carry, kb, vb, mask):
                """Online-softmax update with one key tile; mask None = all visible."""
                m, l, acc = carry
                # Tiles are laid out [B, K, bk, G, bq]: the softmax reductions run over a
                # major axis, so they vectorise along the contiguous query axis (measured
                # ~1.7x faster on CPU than reducing along a minor key axis). The query
                # block [B, K, G, bq, d] and the accumulator [B, K, d, G, bq] match that
                # layout, so neither matmul transposes the probability tile: with q as
                # [B, bq, K, G, d] and acc as [B, K, G, bq, d], XLA:CPU copied the tile
                # twice per step, and the forward took 1.3-1.45x longer (1 x 1000 tokens,
                # 8 heads / 2 KV heads, d 32: 20.0 vs 13.8 ms; 8 x 1000: 208 vs 155).
                s = jnp.einsum("bkgqd,bskd->bksgq", qb, kb, preferred_element_type=jnp.float32) * scale
                if mask is not None:
                    s = jnp.where(mask, s, NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=2))
                shift = m_new
                if mask is not None:
                    # A masked logit is NEG and exp(NEG - m_new) = 0, except in a row
                    # whose keys are all masked so far (m_new = NEG): shifted by 0
                    # instead, its masked entries give exp(NEG) = 0 too. Per row, not
                    # a select over the tile after the exp (XLA:CPU repeated that one
                    # in both of its consumers: 9% of a 1024-token prefill).
                    shift = jnp.where(m_new > NEG, m_new, 0.0)
                p = jnp.exp(s - shift[:, :, None])
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(p, axis=2)
                pv = jnp.einsum("bksgq,bskd->bkdgq", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
                return m_new, l, acc * corr[:, :, None] + pv

            def body(j, carry):
                start = idx[i, j] * bk
                kb = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=1)  # [B, bk, K, d]
                vb = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=1)
                kp = jax.lax.dynamic_slice_in_dim(k_pos, start, bk, axis=1)
                mask = jnp.swapaxes(tile_mask(qp, kp, chunk_size), 1, 2)[:, None, :, None, :]  # [B,1,bk,1,bq]
                # Interior tiles (every key visible to every query: most of them) skip
                # the mask selects, about a third of the elementwise work.
                return jax.lax.cond(tile_full(qp, kp, chunk_size), lambda c: update(c, kb, vb, None),
                                    lambda c: update(c, kb, vb, mask), carry)

            init = (
                jnp.full((B, K, G, bq), NEG, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, d, G, bq), jnp.float32),
            )
            m, l, acc = jax.lax.fori_loop(0, cnt[i], body, init)
            seen = l > 0
            out = acc / jnp.where(seen, l, 1.0)[:, :, None]
            lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
            # [B, K, d, G, bq] -> [B, bq, H, d]; [B, K, G, bq] -> [B, bq, H]
            return out.transpose(0, 4, 1, 3, 2).reshape(B, bq, H, d), lse.transpose(0, 3, 1, 2).reshape(B, bq, H)

    out, lse = jax.lax.map(q_block, jnp.arange(T // bq))  # [n_q, B, bq, ...]
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, T, H, d)
    lse = lse.transpose(1, 0, 2, 3).reshape(B, T, H)
    return out, lse


# --------------------------------------------------------------------------------------
# Backward (FlashAttention-2): dq by query blocks, dk/dv by key blocks
# --------------------------------------------------------------------------------------


def flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, dlse, *, chunk_size, bq, bk):
    """Gradients (dq, dk, dv) of (out, lse) = attention(q, k, v) on padded shapes.

    With P = exp(S - lse) recomputed per tile, dP = dO V^T and
    dS = P * (dP - delta), delta_i = sum_d dO_i * O_i - dlse_i (the lse cotangent
    enters because d lse_i / d S_ij = P_ij). dq = dS K * scale, dk = dS^T Q * scale,
    dv = P^T dO; the G query heads of a KV head are summed into its dk/dv. All sums
    are fp32; results are cast to the input dtypes.
    """
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(d)
    f32 = jnp.float32
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1) - dlse.astype(f32)  # [B, T, H]
    # Every operand in the tile's layout [B, K, (G, bq | bk), ...] (transposed once
    # here), so no matmul copies a tile or a block per step.
    qg = _split_heads(q, K).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, d]
    dog = _split_heads(dout.astype(f32), K).transpose(0, 2, 3, 1, 4)
    lse_g = lse.reshape(B, T, K, G).transpose(0, 2, 3, 1)  # [B, K, G, T]
    delta_g = delta.reshape(B, T, K, G).transpose(0, 2, 3, 1)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, d]
    need = block_need(q_pos, k_pos, chunk_size, bq, bk)
    idx, cnt = _compact(need)
    idx_t, cnt_t = _compact(need.T)  # for key block j, the query blocks that need it

    def tile(i, j):
        """P and dS of tile (query block i, key block j): [B, K, G, bq, bk] fp32."""
        qb = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
        qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)
        do = jax.lax.dynamic_slice_in_dim(dog, i * bq, bq, axis=3)
        ls = jax.lax.dynamic_slice_in_dim(lse_g, i * bq, bq, axis=3)
        dl = jax.lax.dynamic_slice_in_dim(delta_g, i * bq, bq, axis=3)
        kb = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
        kp = jax.lax.dynamic_slice_in_dim(k_pos, j * bk, bk, axis=1)
        s = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=f32) * scale
        mask = tile_mask(qp, kp, chunk_size)[:, None, None]
        p = jnp.where(mask, jnp.exp(s - ls[..., None]), 0.0)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do, vb.astype(f32))
        ds = p * (dp - dl[..., None])
        return qb, do, kb, p, ds

    def dq_block(i):
        def body(n, dq):
            _, _, kb, _, ds = tile(i, idx[i, n])
            return dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kb.astype(f32)) * scale

        return jax.lax.fori_loop(0, cnt[i], body, jnp.zeros((B, K, G, bq, d), f32))

    def dkv_block(j):
        def body(n, carry):
            dk, dv = carry
            qb, do, _, p, ds = tile(idx_t[j, n], j)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qb.astype(f32)) * scale
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p, do)
            return dk, dv

        z = jnp.zeros((B, K, bk, d), f32)
        return jax.lax.fori_loop(0, cnt_t[j], body, (z, z))

    with jax.named_scope("flash_bwd_dq"):
        dq = jax.lax.map(dq_block, jnp.arange(T // bq))  # [n_q, B, K, G, bq, d]
    with jax.named_scope("flash_bwd_dkv"):
        dk, dv = jax.lax.map(dkv_block, jnp.arange(S // bk))  # [n_k, B, K, bk, d]
    dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, H, d)
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, S, K, d)
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, S, K, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_pos, k_pos, chunk_size, bq, bk):
    return _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk)


def _flash_fwd(q, k, v, q_pos, k_pos, chunk_size, bq, bk):
    out, lse = _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk)
    return (out, lse), (q, k, v, q_pos, k_pos, out, lse)


def _flash_bwd(chunk_size, bq, bk, res, cts):
    q, k, v, q_pos, k_pos, out, lse = res
    dout, dlse = cts
    dq, dk, dv = flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, dlse, chunk_size=chunk_size, bq=bq, bk=bk)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_shapes(q, k, v, q_pos, k_pos):
    """Raise a ValueError naming the mismatch if the seam's shapes are inconsistent."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,T,H,d] and k = v [B,S,K,d]; got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, H, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or H % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch/head_dim, or H is not a multiple of K")
    if q_pos.shape != (B, T) or k_pos.shape != (B, k.shape[1]):
        raise ValueError(f"positions must be q_pos [B,T]={(B, T)}, k_pos [B,S]={(B, k.shape[1])}; "
                         f"got {q_pos.shape}, {k_pos.shape}")


def flash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Blockwise attention with log-sum-exp: (out fp32 [B, T, H, d], lse fp32 [B, T, H]).

    Same inputs and mask as `reference.xla_attention` (q already temperature
    scaled, positions per row, INVALID_POS for padding). Differentiable (custom VJP).
    """
    check_shapes(q, k, v, q_pos, k_pos)
    T, S = q.shape[1], k.shape[1]
    bq, bk = block_sizes(T, S, block_q, block_k, chunk_size)
    qp, kp, vp, qpp, kpp = pad_inputs(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), bq, bk)
    out, lse = _flash(qp, kp, vp, qpp, kpp, chunk_size, bq, bk)
    return out[:, :T], lse[:, :T]


def blockwise_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, block_q=DEFAULT_BLOCK_Q,
                        block_k=DEFAULT_BLOCK_K):
    """The `blockwise` attention backend: output [B, T, H, d] in q's dtype."""
    with jax.named_scope("blockwise_attention"):
        out, _ = flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, block_q=block_q, block_k=block_k)
    return out.astype(q.dtype)
