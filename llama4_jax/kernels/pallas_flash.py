"""A Pallas flash-attention forward kernel (causal, chunked or global, GQA, per-row positions).

One program handles one (batch row, KV head, query block) and all G = H / K query heads
that share the KV head: the wrapper stacks the G heads' queries of the block into the
rows of one [R, d] tile (R = G * bq rows, head-major, padded to a power of two with
rows that see nothing), so each K/V block the program walks is loaded once and serves
every head of its group, instead of once per query head. The key blocks walked are the
ones the block plan of the pure-JAX `blockwise` backend lists for the query block
(`blockwise.block_plan`), so fully-masked key blocks are never loaded and a chunked
layer costs O(S * C). The mask is rebuilt per tile from int32 positions
(`blockwise.tile_mask`, with each row's own position), so left padding, ring-buffer
caches and the zigzag layout of ring attention need nothing special. K/V are never
repeated in memory.

Block sizes: `bq` query positions per block (any size; the block plan and padding take
any), so R = G * bq kernel rows; by default bq is chosen to fill DEFAULT_ROWS rows
(128 for 2-byte inputs, 64 for fp32, whose q and K/V tiles are twice the bytes: the
per-head kernel's fp32 tile of 64 rows, which compiled and ran on the H200, and the
usual Triton flash tile for bf16; the best sizes are a GPU measurement still to make).
G = 5 (Scout, Maverick) thus gets 25 positions x 5 heads = 125 of 128 rows; a one-token
decode step gets one program per KV head with its G rows (of 16).

Outputs: the normalised output in fp32 and the log-sum-exp per query row (fp32), so
partial results can be merged (ring attention). Softmax statistics are fp32; the
probabilities are cast to the value dtype before P @ V, as in the `xla` reference.

Portability: the kernel uses only generic Pallas (BlockSpecs, `pl.ds` slices, a
`fori_loop` with a data-dependent trip count, `jnp.dot`), no backend-specific
primitives. On CPU it runs with `interpret=True`; for `cuda` it lowers through the
Pallas Triton backend (checked on CPU with `jax.export`, see `lower_for_cuda`; jax
>= 0.11 reads the GPU model from an abstract mesh there, `cuda_lowering_context`).
Triton needs power-of-two tiles of at least 16, so the wrapper pads the head dim (zeros change
neither q.k nor the extra output columns, which are dropped), the row count R and the
key block. Mosaic GPU (jax 0.10's default GPU lowering for pallas_call, and the
successor of the Triton backend deprecated from jax 0.11) rejects this kernel's small
int32 copies (the block plan and position tiles are under its 128-byte warpgroup
minimum), so the Triton backend is selected explicitly; a Mosaic GPU variant would need
TMA-sized tiles and wgmma, and is not written yet.

Gradients: the forward is wrapped in a custom VJP whose backward is the blockwise
FlashAttention-2 backward (`blockwise.flash_backward`, pure JAX), recomputing tiles
from the lse. It runs at the blockwise backend's own block sizes (`blockwise.block_sizes`),
not the kernel's: its tiles are a serial loop of XLA ops, and the H200 run measured
870 ms for forward + backward (bf16, 16K tokens, chunk 8192) with the kernel's 64 x 64
tiles against 73 ms for the blockwise backend, whose backward ran at 256 x 512.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import blockwise as bw
from . import platform

DEFAULT_ROWS = 128  # kernel rows (G heads x bq positions) per program for 2-byte inputs; half for fp32
DEFAULT_BLOCK_K = 64
_MIN_TILE = 16  # tl.dot needs every dimension >= 16
_SQ = getattr(pl, "squeezed", None)  # a block dimension of size 1 that the kernel does not see


def _pow2(n: int) -> int:
    return max(_MIN_TILE, 1 << max(0, (n - 1).bit_length()))


def _kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, chunk_size, bk, scale):
    """One (b, kv head, i) program. Refs (after BlockSpecs): idx [n_q, n_k], cnt [n_q],
    qpos [1, R], kpos [1, S], q [R, d] (the G heads' rows of query block i), k/v [S, d],
    o [R, d], lse [1, R]."""
    i = pl.program_id(2)
    q = q_ref[...]
    qp = qpos_ref[...]  # [1, R]: each row's position (-1: padding, sees nothing)
    rows, d = q.shape

    def body(n, carry):
        m, l, acc = carry
        start = pl.multiple_of(idx_ref[i, n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # one load per key block, shared by all G heads
        v = v_ref[pl.ds(start, bk), :]
        kp = kpos_ref[:, pl.ds(start, bk)]  # [1, bk]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [R, bk]
        mask = bw.tile_mask(qp, kp, chunk_size)[0]
        s = jnp.where(mask, s, bw.NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((rows,), bw.NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), bw.NEG)[None, :]


def _stack_heads(q, q_pos, K: int, bq: int, rows: int):
    """q [B, T, H, d] -> [B, K, n_q * rows, d] and q_pos [B, T] -> [B, n_q * rows].

    Query block i of KV head kh is rows [i * rows, (i + 1) * rows): head g of the group
    (query head kh * G + g) at rows g * bq .. g * bq + bq - 1, then rows - G * bq padding
    rows (zeros, position -1). T must be a multiple of bq and rows >= G * bq.
    """
    B, T, H, d = q.shape
    G, n_q = H // K, T // bq
    pad = rows - G * bq
    x = q.reshape(B, n_q, bq, K, G, d).transpose(0, 3, 1, 4, 2, 5).reshape(B, K, n_q, G * bq, d)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, K, n_q * rows, d)
    p = jnp.broadcast_to(q_pos.reshape(B, n_q, 1, bq), (B, n_q, G, bq)).reshape(B, n_q, G * bq)
    p = jnp.pad(p, ((0, 0), (0, 0), (0, pad)), constant_values=-1).reshape(B, n_q * rows)
    return x, p


def _unstack_heads(x, G: int, bq: int, rows: int):
    """Inverse of `_stack_heads`: [B, K, n_q * rows, *rest] -> [B, n_q * bq, K * G, *rest]."""
    B, K, n_rows = x.shape[:3]
    rest = x.shape[3:]
    n_q = n_rows // rows
    x = x.reshape(B, K, n_q, rows, *rest)[:, :, :, :G * bq].reshape(B, K, n_q, G, bq, *rest)
    perm = (0, 2, 4, 1, 3) + tuple(range(5, 5 + len(rest)))
    return x.transpose(perm).reshape(B, n_q * bq, K * G, *rest)


def _pallas_call(q, k, v, q_pos, k_pos, chunk_size, bq, bk, scale, interpret):
    """Padded inputs (T % bq == S % bk == 0, d a power of two): out fp32 [B,T,H,d], lse [B,T,H]."""
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    R = _pow2(G * bq)
    idx, cnt = bw.block_plan(q_pos, k_pos, chunk_size, bq, bk)
    n_q, n_k = idx.shape
    qs, qps = _stack_heads(q, q_pos, K, bq, R)  # [B, K, n_q * R, d], [B, n_q * R]
    kt = k.transpose(0, 2, 1, 3)  # [B, K, S, d]
    vt = v.transpose(0, 2, 1, 3)
    kernel = functools.partial(_kernel, chunk_size=chunk_size, bk=bk, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, K, n_q),
        in_specs=[
            pl.BlockSpec((n_q, n_k), lambda b, kh, i: (0, 0)),
            pl.BlockSpec((n_q,), lambda b, kh, i: (0,)),
            pl.BlockSpec((1, R), lambda b, kh, i: (b, i)),
            pl.BlockSpec((1, S), lambda b, kh, i: (b, 0)),
            pl.BlockSpec((_SQ, _SQ, R, d), lambda b, kh, i: (b, kh, i, 0)),
            pl.BlockSpec((_SQ, _SQ, S, d), lambda b, kh, i: (b, kh, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, S, d), lambda b, kh, i: (b, kh, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((_SQ, _SQ, R, d), lambda b, kh, i: (b, kh, i, 0)),
            pl.BlockSpec((_SQ, 1, R), lambda b, kh, i: (b, kh, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, n_q * R, d), jnp.float32),
            jax.ShapeDtypeStruct((B, K, n_q * R), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_gpu_params(interpret, R, d),
        name="llama4_flash_fwd",
    )(idx, cnt, qps, k_pos, qs, kt, vt)
    return _unstack_heads(out, G, bq, R), _unstack_heads(lse, G, bq, R)



def _gpu_params(interpret, rows, d):
    """Pick the Triton lowering on GPU (jax 0.10 would otherwise try Mosaic GPU, whose
    copy engine cannot move this kernel's small int32 block-plan and position tiles).
    8 warps from a [128, 128] tile up (its fp32 accumulator alone is 64 KB of
    registers: 128 per thread at 4 warps), 4 below, as Triton's flash tutorial does."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=8 if rows * d >= 128 * 128 else 4, num_stages=2)


def _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk, interpret):
    """T/S already padded to the blocks; pads the head dim to a power of two >= 16."""
    d = q.shape[3]
    dp = _pow2(d)
    if dp != d:
        pad = ((0, 0), (0, 0), (0, 0), (0, dp - d))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    out, lse = _pallas_call(q, k, v, q_pos, k_pos, chunk_size, bq, bk, 1.0 / math.sqrt(d), interpret)
    return out[..., :d], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_pos, k_pos, chunk_size, bq, bk, interpret):
    return _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk, interpret)


def _flash_fwd(q, k, v, q_pos, k_pos, chunk_size, bq, bk, interpret):
    out, lse = _fwd_impl(q, k, v, q_pos, k_pos, chunk_size, bq, bk, interpret)
    return (out, lse), (q, k, v, q_pos, k_pos, out, lse)


def _flash_bwd(chunk_size, bq, bk, interpret, res, cts):
    """The blockwise FlashAttention-2 backward at the blockwise backend's block sizes
    (see the module docstring), on inputs padded again to those blocks: extra query
    rows (position -1) and keys (INVALID_POS) take part in no tile, so they add nothing."""
    q, k, v, q_pos, k_pos, out, lse = res
    dout, dlse = cts
    T, S = q.shape[1], k.shape[1]
    bbq, bbk = bw.block_sizes(T, S, bw.DEFAULT_BLOCK_Q, bw.DEFAULT_BLOCK_K, chunk_size)
    q, k, v, q_pos, k_pos = bw.pad_inputs(q, k, v, q_pos, k_pos, bbq, bbk)
    pt = q.shape[1] - T
    if pt:
        out, dout = (jnp.pad(x, ((0, 0), (0, pt), (0, 0), (0, 0))) for x in (out, dout))
        lse = jnp.pad(lse, ((0, 0), (0, pt), (0, 0)), constant_values=bw.NEG)
        dlse = jnp.pad(dlse, ((0, 0), (0, pt), (0, 0)))
    dq, dk, dv = bw.flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, dlse, chunk_size=chunk_size,
                                   bq=bbq, bk=bbk)
    return dq[:, :T], dk[:, :S], dv[:, :S], None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_interpret() -> bool:
    """Interpret the kernel unless tracing for a GPU (where it compiles; `platform.target()`)."""
    return platform.target() != "gpu"


def block_sizes(T: int, S: int, H: int, K: int, itemsize: int, block_q: int | None = None,
                block_k: int = DEFAULT_BLOCK_K) -> tuple[int, int, int]:
    """(bq query positions, bk keys, R kernel rows) per program.

    bq: `block_q` when given, else as many positions as fill DEFAULT_ROWS rows (half
    for inputs of more than 2 bytes) with the G = H / K heads of a KV head, at least
    1; capped by T. R = G * bq rounded up to a power of two >= 16 (Triton), the
    extra rows being padding. bk: `block_k` rounded to a power of two >= 16, capped
    by S rounded the same way.
    """
    G = H // K
    if block_q is None:
        block_q = max(1, (DEFAULT_ROWS if itemsize <= 2 else DEFAULT_ROWS // 2) // G)
    bq = max(1, min(block_q, T))
    return bq, min(_pow2(block_k), _pow2(S)), _pow2(G * bq)


def pallas_flash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, block_q: int | None = None,
                           block_k: int = DEFAULT_BLOCK_K, interpret: bool | None = None):
    """Flash attention through the Pallas kernel: (out fp32 [B,T,H,d], lse fp32 [B,T,H]).

    Same inputs and mask as `reference.xla_attention`. `block_q` is the number of
    query positions per program (all G heads of a KV head each: G * block_q kernel
    rows), chosen by `block_sizes` when None; `block_k` the keys per step. `interpret`
    defaults to True off GPU.
    """
    bw.check_shapes(q, k, v, q_pos, k_pos)
    if interpret is None:
        interpret = default_interpret()
    (_, T, H, _), (S, K) = q.shape, k.shape[1:3]
    bq, bk, _ = block_sizes(T, S, H, K, jnp.dtype(q.dtype).itemsize, block_q, block_k)
    qp, kp, vp, qpp, kpp = bw.pad_inputs(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), bq, bk)
    out, lse = _flash(qp, kp, vp, qpp, kpp, chunk_size, bq, bk, interpret)
    return out[:, :T], lse[:, :T]


def pallas_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `pallas` attention backend: output [B, T, H, d] in q's dtype."""
    with jax.named_scope("pallas_attention"):
        out, _ = pallas_flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size)
    return out.astype(q.dtype)


# The GPU `lower_for_cuda` lowers for off a GPU (jax >= 0.11 reads its compute capability).
CUDA_LOWERING_DEVICE_KIND = "NVIDIA H200"


def cuda_lowering_context():
    """Off a GPU, an abstract mesh of one CUDA_LOWERING_DEVICE_KIND: jax >= 0.11's Triton
    lowering reads the compute capability from it ("No supported GPU devices found,
    please specify an abstract GPU device" without it); jax 0.10 ignores it. On a GPU,
    nothing (the device itself is read)."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=CUDA_LOWERING_DEVICE_KIND, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args):
    """Lower `fn(*args)` (a function that runs the kernel with interpret=False) for
    `cuda` with `jax.export`, on any host (`cuda_lowering_context`). Returns the
    `jax.export.Exported`.

    Pallas Triton kernels lower to a `__gpu$xla.gpu.triton` custom call that is not
    on jax.export's list of stable custom calls, hence the disabled check.
    """
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with cuda_lowering_context():
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
