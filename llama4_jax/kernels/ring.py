"""Ring attention: context parallelism over a `seq` mesh axis (shard_map + ppermute).

Layout. `zigzag_call` permutes the sequence once at the model input into the zigzag
layout: the T tokens are cut into 2N pieces and device i holds pieces i and 2N-1-i,
so causal work is balanced across the N devices. Position ids travel with the tokens
(global positions), so RoPE, the masks and the NoPE temperature need nothing special;
the outputs are permuted back at the end.

Self-attention (T == S, each device holds the keys of its own queries):
  - global layers: the ring. Each device keeps its queries and passes its key/value
    block (with the key positions) to its neighbour N-1 times; every step runs the
    inner flash kernel (Pallas or pure-JAX blockwise) of the local queries against the
    visiting block, giving (out, lse), merged in fp32 by log-sum-exp. The ppermute of
    the next block is issued before the step's computation so the transfer can overlap
    it. Fully-masked visiting blocks cost only their (empty) block plan.
  - chunked layers: when no attention chunk is split across devices (`chunk_local`,
    true in the zigzag layout when every half-shard is a multiple of the chunk size
    and there is no left padding), each device attends locally, with no communication
    at all. Otherwise they run the ring too, which is correct for any layout.
Against a cache (T != S, decode or prefill into a cache): the keys/values are split
along the sequence over the devices, the queries are replicated, each device attends
to its slice, and the partial results are merged with a max and two sums over the axis.

Correctness never depends on the layout (masks come from positions); the layout only
decides the load balance and whether the chunk-local path applies.

Gradients: the ring has a custom VJP whose backward is a second ring: dq stays on its
device while each device's dk/dv accumulators travel with its key/value block and come
home after N hops, every step being the blockwise FlashAttention-2 backward against the
global lse. Only the local shards are saved, so training memory is O(S / N) per device.
The chunk-local path and the sharded-cache path differentiate through the inner
kernels' custom VJPs (which accept the lse cotangent).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .reference import INVALID_POS
from . import blockwise as bw
from . import pallas_flash, platform

SEQ_AXIS = "seq"
INNER_KERNELS = ("blockwise", "pallas")

_MESH: contextvars.ContextVar = contextvars.ContextVar("ring_mesh", default=None)  # read while tracing


@contextlib.contextmanager
def use_mesh(mesh):
    """Make `mesh` the mesh of the `ring` attention backends while tracing inside."""
    check_mesh(mesh)
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def check_mesh(mesh, axis: str = SEQ_AXIS):
    if mesh is None or axis not in mesh.axis_names:
        found = None if mesh is None else tuple(mesh.axis_names)
        raise ValueError(f"ring attention needs a mesh with a {axis!r} axis; got mesh axes {found}")


def current_mesh():
    mesh = _MESH.get()
    if mesh is None:
        raise ValueError("attention_impl='ring' needs a mesh: pass mesh=... to forward (a mesh with a "
                         f"{SEQ_AXIS!r} axis), or trace inside `llama4_jax.kernels.ring.use_mesh(mesh)`")
    return mesh


def _tracing_mesh(mesh):
    """The context's abstract mesh when it has the same axes (inside `auto_axes` of a
    mesh with Explicit axes, where they are Auto), else `mesh`."""
    am = jax.sharding.get_abstract_mesh()
    if am is not None and not am.empty and tuple(am.axis_names) == tuple(mesh.axis_names):
        return am
    return mesh


def _shard_map(f, mesh, in_specs, out_specs):
    """shard_map without replication checks (Pallas interpret mode needs that), on jax 0.10-0.12.

    Inside a context mesh with the same axis names (e.g. `auto_axes` of a mesh with
    Explicit axes) the context's abstract mesh is used, so the axis types agree.
    """
    mesh = _tracing_mesh(mesh)
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def inner_kernel(name: str):
    """(q, k, v, q_pos, k_pos, chunk_size) -> (out fp32, lse) for one ring step."""
    if name == "blockwise":
        return lambda q, k, v, qp, kp, c: bw.flash_attention(q, k, v, qp, kp, chunk_size=c)
    if name == "pallas":
        return lambda q, k, v, qp, kp, c: pallas_flash.pallas_flash_attention(q, k, v, qp, kp, chunk_size=c)
    raise ValueError(f"unknown ring inner kernel {name!r}; expected one of {INNER_KERNELS}")


def default_inner() -> str:
    """The Pallas kernel where it compiles (GPU), the pure-JAX blockwise one elsewhere."""
    return "pallas" if platform.target() == "gpu" else "blockwise"


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


def zigzag_permutation(T: int, n: int) -> np.ndarray:
    """perm [T]: layout index -> original index; device i holds pieces i and 2n-1-i.

    T must be a multiple of 2n. `x_layout = x[:, perm]`, `x = x_layout[:, argsort(perm)]`.
    """
    if T % (2 * n):
        raise ValueError(f"zigzag layout needs a sequence length divisible by 2 * {n} devices; got {T}")
    pieces = np.arange(T).reshape(2 * n, T // (2 * n))
    order = [p for i in range(n) for p in (i, 2 * n - 1 - i)]
    return pieces[order].reshape(-1)


def zigzag_call(fn, mesh, input_ids, positions, valid, embeds=None, *, axis: str = SEQ_AXIS):
    """fn(ids, positions, valid, embeds) -> (logits [B,T,V], hidden [L,B,T,D] or ()) in the zigzag layout.

    Pads the sequence at the end to a multiple of 2N (padding is invalid: its keys are
    never seen), permutes ids, positions, validity (and input embeddings [B,T,D] if
    given) into the zigzag layout, shards them over `axis`, traces fn with `mesh` as
    the ring backends' mesh, and permutes the outputs back.
    """
    check_mesh(mesh, axis)
    n = mesh.shape[axis]
    B, T = input_ids.shape
    pad = (-T) % (2 * n)
    if pad:
        pad2 = ((0, 0), (0, pad))
        input_ids, valid = jnp.pad(input_ids, pad2), jnp.pad(valid, pad2)
        positions = jnp.pad(positions, pad2, mode="edge")
        if embeds is not None:
            embeds = jnp.pad(embeds, (*pad2, (0, 0)))
    perm = zigzag_permutation(T + pad, n)
    inv = np.argsort(perm)
    seq = NamedSharding(_tracing_mesh(mesh), P(None, axis))
    ids, pos, val = (jax.lax.with_sharding_constraint(x[:, perm], seq) for x in (input_ids, positions, valid))
    if embeds is not None:
        embeds = embeds[:, perm]
    with use_mesh(mesh):
        logits, hidden = fn(ids, pos, val, embeds)
    logits = logits[:, inv][:, :T]
    if not isinstance(hidden, tuple):
        hidden = hidden[:, :, inv][:, :, :T]
    return logits, hidden


def chunk_local(k_pos, n: int, chunk_size: int):
    """bool scalar: no attention chunk has valid keys on two devices.

    k_pos [B, S] in the device layout (S a multiple of n; device i holds the i-th
    slice). Each slice is split in two halves (the zigzag pieces) and the chunk ids of
    their valid keys give an interval per half; the chunk-local path is exact iff no
    two halves on different devices have overlapping intervals. Queries are the same
    tokens as the keys (self-attention), so a valid query's chunk is in its own
    device's intervals and all its visible keys are local.
    """
    B, S = k_pos.shape
    parts = 2 * n if S % (2 * n) == 0 else n
    kp = k_pos.reshape(B, parts, S // parts)
    ok = kp < INVALID_POS
    c = kp // chunk_size
    lo = jnp.min(jnp.where(ok, c, INVALID_POS), axis=2)  # [B, parts]
    hi = jnp.max(jnp.where(ok, c, -1), axis=2)
    dev = np.arange(parts) // (parts // n)
    other = jnp.asarray(dev[:, None] != dev[None, :])
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # empty halves never overlap
    return ~jnp.any(overlap & other[None])


# --------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------


def _ring_body(q, k, v, qp, kp, *, chunk_size, inner, axis, n):
    """Per-device ring loop: local q [B, t, H, d] against every device's k/v block."""
    kernel = inner_kernel(inner)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        kb, vb, kpb, out, lse = carry
        # Issue the transfer of the next block before computing on this one.
        nxt = jax.lax.ppermute((kb, vb, kpb), axis, perm)
        o, l = kernel(q, kb, vb, qp, kpb, chunk_size)
        out, lse = bw.merge(out, lse, o, l)
        return (*nxt, out, lse), None

    B, t, H, d = q.shape
    init = (k, v, kp, jnp.zeros((B, t, H, d), jnp.float32), jnp.full((B, t, H), bw.NEG, jnp.float32))
    with jax.named_scope("ring_steps"):
        (kb, vb, kpb, out, lse), _ = jax.lax.scan(step, init, None, length=n - 1)
    o, l = kernel(q, kb, vb, qp, kpb, chunk_size)  # the last block: nothing left to send
    return bw.merge(out, lse, o, l)


def _ring_bwd_body(q, k, v, qp, kp, out, lse, dout, dlse, *, chunk_size, axis, n):
    """Per-device backward ring: dq stays home; each device's dk/dv accumulators travel
    with its k/v block, collecting every device's contribution, and are home after n hops.

    Every step is the blockwise FlashAttention-2 backward of the local queries against
    the visiting block, with the *global* lse (so its probabilities are the final ones).
    """
    T, S = q.shape[1], k.shape[1]
    bq, bk = bw.block_sizes(T, S, bw.DEFAULT_BLOCK_Q, bw.DEFAULT_BLOCK_K)
    q, k, v, qp, kp = bw.pad_inputs(q, k, v, qp, kp, bq, bk)
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, q.shape[1] - T)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    out, lse, dout, dlse = (pad_t(x) for x in (out, lse, dout, dlse))
    perm = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        kb, vb, kpb, dk, dv, dq = carry
        nxt = jax.lax.ppermute((kb, vb, kpb), axis, perm)  # independent of this step: sent first
        dq_s, dk_s, dv_s = bw.flash_backward(q, kb, vb, qp, kpb, out, lse, dout, dlse, chunk_size=chunk_size,
                                             bq=bq, bk=bk)
        dk, dv = jax.lax.ppermute((dk + dk_s.astype(jnp.float32), dv + dv_s.astype(jnp.float32)), axis, perm)
        return (*nxt, dk, dv, dq + dq_s.astype(jnp.float32)), None

    z = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    with jax.named_scope("ring_bwd_steps"):
        (_, _, _, dk, dv, dq), _ = jax.lax.scan(step, (k, v, kp, z(k), z(v), z(q)), None, length=n)
    return dq[:, :T].astype(q.dtype), dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype)


def _specs(axis):
    return P(None, axis, None, None), P(None, axis, None), P(None, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, qp, kp, cfg):
    """The ring over `cfg = (mesh, axis, chunk_size, inner)`: (out fp32, lse fp32), sharded
    along the sequence. Custom VJP: the backward is a second ring (`_ring_bwd_body`),
    so only the local shards are kept for it, O(S / N) per device."""
    mesh, axis, chunk_size, inner = cfg
    s4, s3, s2 = _specs(axis)
    body = functools.partial(_ring_body, chunk_size=chunk_size, inner=inner, axis=axis, n=mesh.shape[axis])
    return _shard_map(body, mesh, (s4, s4, s4, s2, s2), (s4, s3))(q, k, v, qp, kp)


def _ring_fwd(q, k, v, qp, kp, cfg):
    out, lse = _ring(q, k, v, qp, kp, cfg)
    return (out, lse), (q, k, v, qp, kp, out, lse)


def _ring_bwd(cfg, res, cts):
    mesh, axis, chunk_size, _ = cfg
    s4, s3, s2 = _specs(axis)
    body = functools.partial(_ring_bwd_body, chunk_size=chunk_size, axis=axis, n=mesh.shape[axis])
    f = _shard_map(body, mesh, (s4, s4, s4, s2, s2, s4, s3, s4, s3), (s4, s4, s4))
    return (*f(*res, *cts), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _local_body(q, k, v, qp, kp, *, chunk_size, inner):
    return inner_kernel(inner)(q, k, v, qp, kp, chunk_size)


def _sharded_kv_body(q, k, v, qp, kp, *, chunk_size, inner, axis):
    """Replicated queries against this device's slice of the keys; merged over `axis`."""
    o, l = inner_kernel(inner)(q, k, v, qp, kp, chunk_size)
    m = jax.lax.pmax(l, axis)
    w = jnp.exp(l - m)
    tot = jax.lax.psum(w, axis)
    out = jax.lax.psum(o * w[..., None], axis) / tot[..., None]
    return out, m + jnp.log(tot)


def ring_flash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, mesh=None, inner: str | None = None,
                         axis: str = SEQ_AXIS):
    """Context-parallel attention over `mesh[axis]`: (out fp32 [B, T, H, d], lse fp32 [B, T, H]).

    Same inputs and mask as `reference.xla_attention`. T == S means
    self-attention with the sequence split over the devices (T a multiple of N);
    T != S means queries against a cache, split along S (padded to a multiple of N).
    """
    bw.check_shapes(q, k, v, q_pos, k_pos)
    mesh = current_mesh() if mesh is None else mesh
    check_mesh(mesh, axis)
    inner = inner or default_inner()
    inner_kernel(inner)  # validates the name
    n = mesh.shape[axis]
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    T, S = q.shape[1], k.shape[1]
    seq = P(None, axis)
    specs4, specs2 = P(None, axis, None, None), seq

    if T != S:  # queries against a cache split along the sequence
        pad = (-S) % n
        if pad:
            k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
            v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
            k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=INVALID_POS)
        body = functools.partial(_sharded_kv_body, chunk_size=chunk_size, inner=inner, axis=axis)
        f = _shard_map(body, mesh, (P(), specs4, specs4, P(), specs2), (P(), P()))
        with jax.named_scope("sharded_kv_attention"):
            return f(q, k, v, q_pos, k_pos)

    if T % n:
        raise ValueError(f"ring attention splits the sequence over {n} devices; length {T} is not a multiple "
                         "(forward pads it; pad when calling the backend directly)")
    in_specs = (specs4, specs4, specs4, specs2, specs2)
    out_specs = (specs4, P(None, axis, None))
    ring = lambda *args: _ring(*args, (mesh, axis, chunk_size, inner))  # noqa: E731
    if not chunk_size or n == 1:
        with jax.named_scope("ring_attention"):
            return ring(q, k, v, q_pos, k_pos)
    local = _shard_map(functools.partial(_local_body, chunk_size=chunk_size, inner=inner), mesh, in_specs, out_specs)
    with jax.named_scope("ring_chunked_attention"):
        return jax.lax.cond(chunk_local(k_pos, n, chunk_size), local, ring, q, k, v, q_pos, k_pos)


def make_backend(inner: str | None):
    """An attention-seam backend (output in q's dtype) using the mesh of `use_mesh`."""

    def ring_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
        out, _ = ring_flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, inner=inner)
        return out.astype(q.dtype)

    ring_attention.__name__ = f"ring_attention_{inner or 'default'}"
    return ring_attention
