"""A Pallas flash-attention forward kernel (causal, chunked or global, GQA, per-row positions).

One program handles one (batch row, query head, query block): it loads its [bq, d] query
tile once and walks the key blocks listed for its query block by the same block plan the
pure-JAX `blockwise` backend uses (`blockwise.block_plan`), so fully-masked key blocks
are never loaded and a chunked layer costs O(S * C). The mask is rebuilt per tile from
int32 positions (`blockwise.tile_mask`), so left padding, ring-buffer caches and the
zigzag layout of ring attention need nothing special. Query head h reads KV head
h // G through its BlockSpec index map: K/V are never repeated in memory.

Outputs: the normalised output in fp32 and the log-sum-exp per query row (fp32), so
partial results can be merged (ring attention). Softmax statistics are fp32; the
probabilities are cast to the value dtype before P @ V, as in the `xla` reference.

Portability: the kernel uses only generic Pallas (BlockSpecs, `pl.ds` slices, a
`fori_loop` with a data-dependent trip count, `jnp.dot`), no backend-specific
primitives. On CPU it runs with `interpret=True`; for `cuda` it lowers through the
Pallas Triton backend (checked on CPU with `jax.export`, see `lower_for_cuda`). Triton
needs power-of-two tiles of at least 16, so the wrapper pads the head dim (zeros change
neither q.k nor the extra output columns, which are dropped) and the block sizes.
Mosaic GPU (jax 0.10's default GPU lowering for pallas_call, and the successor of the
Triton backend deprecated from jax 0.11) rejects this kernel's small int32 copies (the
block plan and position tiles are under its 128-byte warpgroup minimum), so the Triton
backend is selected explicitly; a Mosaic GPU variant would need TMA-sized tiles and
wgmma, and is not written yet.

Gradients: the forward is wrapped in a custom VJP whose backward is the blockwise
FlashAttention-2 backward (`blockwise.flash_backward`), recomputing tiles from the lse.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import blockwise as bw
from . import platform

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
_MIN_TILE = 16  # tl.dot needs every dimension >= 16
_SQ = getattr(pl, "squeezed", None)  # a block dimension of size 1 that the kernel does not see


def _pow2(n: int) -> int:
    return max(_MIN_TILE, 1 << max(0, (n - 1).bit_length()))


def _kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, chunk_size, bk, scale):
    """One (b, h, i) program. Refs (after BlockSpecs): idx [n_q, n_k], cnt [n_q],
    qpos [1, bq], kpos [1, S], q [bq, d], k/v [S, d], o [bq, d], lse [1, bq]."""
    i = pl.program_id(2)
    q = q_ref[...]
    qp = qpos_ref[...]  # [1, bq]
    bq, d = q.shape

    def body(n, carry):
        m, l, acc = carry
        start = pl.multiple_of(idx_ref[i, n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        kp = kpos_ref[:, pl.ds(start, bk)]  # [1, bk]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [bq, bk]
        mask = bw.tile_mask(qp, kp, chunk_size)[0]
        s = jnp.where(mask, s, bw.NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((bq,), bw.NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), bw.NEG)[None, :]


def _pallas_call(q, k, v, q_pos, k_pos, chunk_size, bq, bk, scale, interpret):
    """Padded inputs (T % bq == S % bk == 0, d a power of two): out fp32 [B,T,H,d], lse [B,T,H]."""
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    idx, cnt = bw.block_plan(q_pos, k_pos, chunk_size, bq, bk)
    n_q, n_k = idx.shape
    qt = q.transpose(0, 2, 1, 3)  # [B, H, T, d]
    kt = k.transpose(0, 2, 1, 3)  # [B, K, S, d]
    vt = v.transpose(0, 2, 1, 3)
    kernel = functools.partial(_kernel, chunk_size=chunk_size, bk=bk, scale=scale)
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, H, n_q),
        in_specs=[
            pl.BlockSpec((n_q, n_k), lambda b, h, i: (0, 0)),
            pl.BlockSpec((n_q,), lambda b, h, i: (0,)),
            pl.BlockSpec((1, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((1, S), lambda b, h, i: (b, 0)),
            pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((_SQ, _SQ, S, d), lambda b, h, i: (b, h // G, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, S, d), lambda b, h, i: (b, h // G, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((_SQ, 1, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, T, d), jnp.float32),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_gpu_params(interpret),
        name="llama4_flash_fwd",
    )(idx, cnt, q_pos, k_pos, qt, kt, vt)
    return out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)



def _gpu_params(interpret):
    """Pick the Triton lowering on GPU (jax 0.10 would otherwise try Mosaic GPU, whose
    copy engine cannot move this kernel's small int32 block-plan and position tiles)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=4, num_stages=2)


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
    q, k, v, q_pos, k_pos, out, lse = res
    dq, dk, dv = bw.flash_backward(q, k, v, q_pos, k_pos, out, lse, *cts, chunk_size=chunk_size, bq=bq, bk=bk)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_interpret() -> bool:
    """Interpret the kernel unless tracing for a GPU (where it compiles; `platform.target()`)."""
    return platform.target() != "gpu"


def pallas_flash_attention(q, k, v, q_pos, k_pos, *, chunk_size=None, block_q=DEFAULT_BLOCK_Q,
                           block_k=DEFAULT_BLOCK_K, interpret: bool | None = None):
    """Flash attention through the Pallas kernel: (out fp32 [B,T,H,d], lse fp32 [B,T,H]).

    Same inputs and mask as `reference.xla_attention`. Block sizes are rounded to
    powers of two >= 16 and capped by the (rounded) sequence lengths. `interpret`
    defaults to True off GPU.
    """
    bw.check_shapes(q, k, v, q_pos, k_pos)
    if interpret is None:
        interpret = default_interpret()
    T, S = q.shape[1], k.shape[1]
    bq, bk = min(_pow2(block_q), _pow2(T)), min(_pow2(block_k), _pow2(S))
    qp, kp, vp, qpp, kpp = bw.pad_inputs(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), bq, bk)
    out, lse = _flash(qp, kp, vp, qpp, kpp, chunk_size, bq, bk, interpret)
    return out[:, :T], lse[:, :T]


def pallas_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """The `pallas` attention backend: output [B, T, H, d] in q's dtype."""
    with jax.named_scope("pallas_attention"):
        out, _ = pallas_flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size)
    return out.astype(q.dtype)


def lower_for_cuda(fn, *args):
    """Lower `fn(*args)` (a function that runs the kernel with interpret=False) for
    `cuda` with `jax.export`, on any host. Returns the `jax.export.Exported`.

    Pallas Triton kernels lower to a `__gpu$xla.gpu.triton` custom call that is not
    on jax.export's list of stable custom calls, hence the disabled check.
    """
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
