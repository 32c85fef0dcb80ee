"""Attention: the projection layer, the temperature, and the KV-cache entries.

Every query and key carries its absolute position; the mask follows from them (see
`llama4_jax.kernels.reference`). `attend(q, k, v, q_pos, k_pos, chunk_size=...,
impl=...)` (from `llama4_jax.kernels`) is the one seam every attention backend sits
behind; `xla` is the reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import quant, sharding
from ..config import LayerFlags, TextConfig
from ..kernels import attend, backends  # noqa: F401  (re-exported: the seam and its backends)
from ..kernels.cached import cached_attention
from ..kernels.reference import INVALID_POS, NEG, visible, xla_attention  # noqa: F401  (re-exported)
from .layers import apply_rope, param, rms_norm


def temperature_scale(positions, cfg: TextConfig):
    """NoPE attention temperature [B, T] in fp32: 1 + attn_scale * log1p(floor((p+1)/floor_scale)).

    The floor is taken on integer positions, so it is exact at every length (an fp32
    or bf16 position would round near multiples of floor_scale). HF computes the same
    from the cache length; we use each row's true position (identical without left
    padding; with left padding HF shifts the scale by the pad count past 8191 tokens).
    """
    n = (positions.astype(jnp.int32) + 1) // cfg.floor_scale
    return jnp.log1p(n.astype(jnp.float32)) * cfg.attn_scale + 1.0


def quantize_kv(x):
    """Symmetric int8 with one fp32 scale per token and KV head.

    x [B, T, K, d] -> (int8 [B, T, K, d], scale f32 [B, T, K]) with
    x ~= q * scale; the rounding error is at most scale / 2 = max|x| / 254 per element.
    """
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector stays zero
    q = jnp.clip(jnp.round(x32 / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def _pick(x, group, rows=None):
    x = x if group is None else x[group]
    return x if rows is None else x[rows]


def read_cache(entry, dtype, group=None, rows=None):
    """Keys and values [B, S, K, d] of a cache entry in `dtype` (dequantised if int8),
    the layout the attention backends take (a transposed copy: prefills only; a decode
    step reads the cache in place, `cached_attention`).

    group: for a stacked entry ([G, B, ...]), the group whose slice is read.
    rows: int [L], read only these rows ([L, S, K, d]; a prefill piece's rows)."""
    k, v = _pick(entry["k"], group, rows), _pick(entry["v"], group, rows)  # [B, K, d, S], [B, K, S, d]
    if "k_scale" in entry:
        k = k.astype(jnp.float32) * _pick(entry["k_scale"], group, rows)[:, :, None, :]
        v = v.astype(jnp.float32) * _pick(entry["v_scale"], group, rows)[..., None]
    return jnp.transpose(k, (0, 3, 1, 2)).astype(dtype), jnp.swapaxes(v, 1, 2).astype(dtype)


def write_cache(entry, k, v, k_pos, *, ring: bool, group=None, shards=None, rows=None):
    """Store the valid new keys/values of [B, T] tokens in a cache entry.

    entry: {'k': [B, K, d, S], 'v': [B, K, S, d], 'pos': [B, S]}, plus 'k_scale',
    'v_scale' [B, K, S] for an int8 cache (see `quantize_kv`; layout in
    `llama4_jax.cache`); with `group` (an int or a traced scalar) the entry is stacked
    over groups ([G, B, ...]) and only group `group` is written. k, v: [B, T, K, d].
    Global layers store position p in slot p. Chunked layers keep a ring buffer of
    S = chunk slots, slot p % S, and keep only the last S tokens of each row (older
    ones can never be attended again). Everything else (padding, evicted tokens) is
    dropped by an out-of-range index. The update is one scatter of the T new tokens
    into the buffers, which XLA performs in place when the cache is donated or carried
    (never a copy of the cache).

    shards (`sharding.SlotShards`, inside `shard_map`): the entry holds this device's
    share of the slots (device i of n: slots i * S / n onwards, S the whole entry's);
    only the new tokens whose slot falls there are written.
    rows: int [B], the entry's rows the B rows of k, v, k_pos go to (default 0..B-1;
    a prefill piece riding along a decode step writes its own rows).
    """
    S = entry["pos"].shape[-1]
    held = S
    if shards is not None:
        S = held * shards.count
    if k_pos.shape == (1, 1):
        # One token of one row (a batch-1 decode step) is written twice, to the same slot
        # with the same value: XLA rewrites a scatter of a single index into an update
        # plus a select over the whole buffer, and then copied the cache on every step.
        k_pos, k, v = (jnp.concatenate([x, x], axis=1) for x in (k_pos, k, v))
    valid = k_pos < INVALID_POS
    if ring:
        last = jnp.max(jnp.where(valid, k_pos, -1), axis=1, keepdims=True)
        keep = valid & (k_pos > last - S)
        slot = jnp.where(keep, k_pos % S, S)
    else:
        slot = jnp.where(valid & (k_pos < S), k_pos, S)
    if shards is not None:  # this device's slots only; the others (and S) are dropped
        slot = slot - jax.lax.axis_index(shards.axes) * held
        slot = jnp.where((slot >= 0) & (slot < held), slot, held)
    b = (jnp.arange(k_pos.shape[0]) if rows is None else rows)[:, None]
    lead = (b,) if group is None else (group, b)
    # Index arrays (b, slot) broadcast to [B, T] and, being split by slices, come first
    # in the indexed shape: every update below is [B, T, ...] whatever the layout.
    at = {"pos": lead + (slot,), "k": lead + (slice(None), slice(None), slot),
          "v": lead + (slice(None), slot), "k_scale": lead + (slice(None), slot), "v_scale": lead + (slice(None), slot)}
    upd = lambda name, val: entry[name].at[at[name]].set(val.astype(entry[name].dtype), mode="drop")  # noqa: E731
    new = {"pos": upd("pos", k_pos)}
    for name, x in (("k", k), ("v", v)):
        if name + "_scale" in entry:
            q, scale = quantize_kv(x)
            new[name], new[name + "_scale"] = upd(name, q), upd(name + "_scale", scale)
        else:
            new[name] = upd(name, x)
    return new


class Attention(nn.Module):
    cfg: TextConfig
    flags: LayerFlags
    dtype: jnp.dtype
    impl: str = "xla"
    segment_span: int | None = None  # packed rows: a global layer's chunk (`segment_positions`)
    fresh_cache: bool = False  # the cache holds no key yet: attend over the new keys alone (`_attend`)

    @nn.compact
    def __call__(self, x, ctx, cache=None, group=None):
        """x [B, T, D] -> (out [B, T, D], updated cache entry or None).

        cache: this layer's entry ([B, S, ...]), or with `group` the entry stacked over
        all groups ([G, B, S, ...]), of which group `group` is read and written in place.
        With ctx["piece"] (`TextModel(piece=...)`), x is one row [1, L*C + B, D]: the L
        prefill pieces' C tokens each, then one decode token for each of the cache's B
        rows; each part attends as it would alone, the pieces over their own cache rows.
        """
        cfg, dt = self.cfg, self.dtype
        D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        wq = param(self, "q", (D, H, d), ("embed", "q_heads", "head_dim"), dt)
        wk = param(self, "k", (D, K, d), ("embed", "kv_heads", "head_dim"), dt)
        wv = param(self, "v", (D, K, d), ("embed", "kv_heads", "head_dim"), dt)
        wo = param(self, "o", (H, d, D), ("q_heads", "head_dim", "embed"), dt)

        q, k, v = quant.matmul(x, wq), quant.matmul(x, wk), quant.matmul(x, wv)
        piece = ctx.get("piece")
        if piece is None:
            q, k = self._positional(q, k, ctx)
            out, cache = self._attend(q, k, v, ctx, cache, group)
            return self._out(out, wo), cache
        out, cache = self._attend_with_piece(q, k, v, ctx, piece, cache, group)
        return self._out(out, wo), cache

    def _positional(self, q, k, ctx):
        """RoPE and QK norm (RoPE layers) or the temperature (NoPE layers) of q, k [B, T, N, d]."""
        cfg = self.cfg
        if self.flags.uses_rope:
            q = apply_rope(q, ctx["cos"], ctx["sin"])
            k = apply_rope(k, ctx["cos"], ctx["sin"])
            if cfg.use_qk_norm:  # unweighted per-head RMSNorm, after RoPE, RoPE layers only
                q = rms_norm(q, None, cfg.rms_norm_eps)
                k = rms_norm(k, None, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            q = (q.astype(jnp.float32) * ctx["temp"][:, :, None, None]).astype(self.dtype)
        return q, k

    @property
    def _chunk(self):
        return self.cfg.attention_chunk_size if self.flags.is_chunked else self.segment_span

    def _attend(self, q, k, v, ctx, cache, group):
        """Attention of q [B, T, H, d] (keys k, v [B, T, K, d]) over the cache rows
        0..B-1 and itself: (out [B, T, H, d], updated cache entry)."""
        dt, chunk = self.dtype, self._chunk
        q_pos, k_pos = ctx["q_pos"], ctx["k_pos"]
        if cache is None:
            keys, vals, kpos = k, v, k_pos
        elif self.fresh_cache:
            # An empty cache (a prefill's first call): every key a query may see is new,
            # so the attention reads those and not the whole allocation (a chunked layer
            # read [cache | new], 3x the keys for the benchmark's 128-token prompts in a
            # 256-slot cache; the global ones the cache). The batch benchmark's prefill
            # (8 x 128 tokens, two devices) took 117-131 ms instead of 134-144.
            cache = write_cache(cache, k, v, k_pos, ring=self.flags.is_chunked, group=group)
            keys, vals, kpos = k, v, k_pos
        elif self.flags.is_chunked and q.shape[1] > 1:
            # Ring buffer, several new tokens: attend over [cached | new] so a prefill
            # longer than the ring still sees its own chunk, then keep the last `chunk`
            # tokens per row.
            ck, cv = read_cache(cache, dt, group)
            keys = jnp.concatenate([ck, k], axis=1)
            vals = jnp.concatenate([cv, v], axis=1)
            kpos = jnp.concatenate([_pick(cache["pos"], group), k_pos], axis=1)
            cache = write_cache(cache, k, v, k_pos, ring=True, group=group)
        else:
            # Global layers, and a chunked layer's single decode token: write first, then
            # attend over the cache. The one token at position p evicts p - S, which is
            # never in p's chunk (S is the chunk, or max_len > p), so nothing it may see
            # is lost, and no [cached | new] copy of the ring is made per step.
            decode = q.shape[1] == 1
            shards = sharding.slot_axes() if decode else None
            cache = write_cache(cache, k, v, k_pos, ring=self.flags.is_chunked, group=group, shards=shards)
            if decode:
                return self._read_in_place(q, q_pos, cache, group, shards), cache
            (keys, vals), kpos = read_cache(cache, dt, group), _pick(cache["pos"], group)
        return attend(q, keys, vals, q_pos, kpos, chunk_size=chunk, impl=self.impl), cache

    def _read_in_place(self, q, q_pos, cache, group, shards=None):
        """A decode step reads the cache in its own layout, in place, whatever the
        backend (the backends are built for many queries)."""
        return cached_attention(q, cache["k"], cache["v"], q_pos, cache["pos"], chunk_size=self._chunk,
                                k_scale=cache.get("k_scale"), v_scale=cache.get("v_scale"),
                                split_slots=sharding.splits("cache_seq"), group=group, shards=shards)

    def _attend_with_piece(self, q, k, v, ctx, piece, cache, group):
        """q, k, v [1, L*C + B, N, d]: L prefill pieces of C tokens (extending cache rows
        piece["rows"], whose decode tokens are invalid), then one decode token per cache
        row. Every new key is written first, then the decode tokens read the cache in
        place and each piece reads its row.

        Writing a piece before reading it is exact when the piece does not cross a
        multiple of the attention chunk (the engine's pieces never do): in a ring buffer
        it then evicts only keys of earlier chunks, which none of its queries sees (a
        global layer evicts nothing). All writes before all reads also keeps the update
        in place: a piece row read from the old cache and the writes after it made
        XLA:CPU copy each layer's whole cache twice per step."""
        (L, C), B = piece["q_pos"].shape, ctx["q_pos"].shape[0]
        H, d = q.shape[2], q.shape[3]
        (qd, kd, vd), (qp, kp, vp) = ([t[0, L * C:].reshape(B, 1, *t.shape[2:]) for t in (q, k, v)],
                                      [t[0, :L * C].reshape(L, C, *t.shape[2:]) for t in (q, k, v)])
        qd, kd = self._positional(qd, kd, ctx)
        qp, kp = self._positional(qp, kp, piece)
        rows, ring = piece["rows"], self.flags.is_chunked
        cache = write_cache(cache, kd, vd, ctx["k_pos"], ring=ring, group=group)
        cache = write_cache(cache, kp, vp, piece["k_pos"], ring=ring, group=group, rows=rows)
        out_dec = self._read_in_place(qd, ctx["q_pos"], cache, group)
        (keys, vals), kpos = read_cache(cache, self.dtype, group, rows), _pick(cache["pos"], group, rows)
        out_pcs = attend(qp, keys, vals, piece["q_pos"], kpos, chunk_size=self._chunk, impl=self.impl)
        return jnp.concatenate([out_pcs.reshape(1, L * C, H, d), out_dec.reshape(1, B, H, d)], axis=1), cache

    def _out(self, out, wo):
        # One [H*d, D] matmul (quant.matmul): contracting (h, e) as two dims made XLA
        # transpose and copy the whole weight on every call (seen in the compiled decode
        # step); the reshapes of contiguous dims are free.
        B, T, H, d = out.shape
        return quant.matmul(out.reshape(B, T, H * d), wo, n_in=2)
