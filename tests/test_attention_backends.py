"""The blockwise and Pallas attention backends against the `xla` reference.

Seam-level cases use small blocks (8 / 16) so every case spans several query and key
blocks and block skipping is exercised; odd lengths make the block padding matter.
Tolerances (fp32, matmul precision highest): 2e-6 on outputs of size ~1 and 2e-5 on
gradients (sums over up to 48 keys of products of size ~1): the backends reorder fp32
sums (online softmax), nothing else. bf16: see `test_bf16`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.kernels import blockwise as bw
from llama4_jax.kernels import default_attention_impl, pallas_flash
from llama4_jax.model.attention import INVALID_POS, attend, backends, xla_attention
from llama4_jax.model.text import abstract_params, forward
from tests.hf_models import TEXT
from tests.lowering import lower_for_tpu_or_skip

TOL = 2e-6
GRAD_TOL = 2e-5


def make_inputs(B, T, S, H, K, d, *, left_pad=(), seed=0, dtype=jnp.float32):
    """Random q [B,T,H,d], k/v [B,S,K,d]; keys are the last S tokens, queries the last T.

    left_pad[b] pads row b on the left: its first tokens are invalid keys and every
    position is shifted, as `positions_from_mask` does.
    """
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in ((B, T, H, d), (B, S, K, d), (B, S, K, d)))
    pads = list(left_pad) + [0] * (B - len(left_pad))
    idx = np.arange(S)[None, :] - np.asarray(pads)[:, None]
    k_pos = np.where(idx >= 0, idx, INVALID_POS).astype(np.int32)
    q_pos = np.maximum(idx[:, S - T:], 0).astype(np.int32)
    return q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos)


def valid_rows(q_pos, k_pos):
    """[B, T, 1, 1] mask of query rows that are real tokens (self-attention layout)."""
    T = q_pos.shape[1]
    return (k_pos[:, -T:] < INVALID_POS)[:, :, None, None]


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(q, k, v, q_pos, k_pos, impl, chunk_size):
    if impl == "xla":
        return xla_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size)
    if impl == "blockwise":
        return bw.blockwise_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, block_q=8, block_k=8)
    return pallas_flash.pallas_flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, block_q=16,
                                               block_k=16)[0]


# (B, T, H, K, d, chunk, left_pad): GQA ratios 5, 4, 1; global; chunk smaller than and not
# dividing T (37 = 4 * 8 + 5), equal to T, dividing T; left-padded rows.
CASES = {
    "global_gqa5_leftpad": (2, 37, 5, 1, 14, None, (5,)),
    "chunk8_not_dividing_gqa4": (2, 37, 8, 2, 10, 8, (0, 3)),
    "chunk_equal_T_gqa1": (1, 37, 4, 4, 8, 37, ()),
    "chunk16_dividing_gqa5": (1, 48, 5, 1, 14, 16, ()),
}


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_xla(case, impl):
    B, T, H, K, d, chunk, pad = CASES[case]
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, left_pad=pad)
    ref = run(q, k, v, qp, kp, "xla", chunk)
    out = run(q, k, v, qp, kp, impl, chunk)
    m = valid_rows(qp, kp)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_decode_against_cache(impl):
    """One new token against a chunked layer's ring buffer (slots out of position order,
    an empty slot) followed by the new key, and against a global layer's cache
    (max_len slots, only the first 29 filled)."""
    q, k, v, qp, kp = make_inputs(2, 1, 32, 5, 1, 14, seed=1)
    # Chunked: chunk 16, positions 32..47 stored at slot p % 16, slot 3 empty; new token 48.
    ring_pos = np.array([32 + ((s - 0) % 16) for s in range(16)])
    ring_pos = np.where(np.arange(16) == 3, INVALID_POS, ring_pos + np.where(np.arange(16) < 5, 16, 0))
    kp_ring = jnp.asarray(np.tile(np.concatenate([ring_pos, 48 + np.arange(16)])[None], (2, 1)), jnp.int32)
    kp_ring = kp_ring.at[:, 17:].set(INVALID_POS)  # only one new token (slot 16) is real
    qp_ring = jnp.full((2, 1), 48, jnp.int32)
    for chunk, qpos, kpos in ((16, qp_ring, kp_ring), (None, jnp.full((2, 1), 28, jnp.int32),
                                                        jnp.where(jnp.arange(32) < 29, jnp.arange(32), INVALID_POS)
                                                        [None].repeat(2, 0).astype(jnp.int32))):
        ref = run(q, k, v, qpos, kpos, "xla", chunk)
        out = run(q, k, v, qpos, kpos, impl, chunk)
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


# ---- the Pallas kernel's GQA query blocks -----------------------------------------------

# (B, T, H, K, d, chunk, left_pad, block_q): GQA ratios G = 1, 3 (not a power of two), 4,
# 5 with odd head dims (padded to 16 inside); block_q None = the default (as many
# positions as fill 64 fp32 rows: 21 for G = 3, 12 for G = 5, so 63 / 60 of 64 rows);
# explicit ones where G * block_q is not a power of two (3 * 8 = 24 -> 32, 4 * 5 = 20 ->
# 32 padded rows) or is one (1 * 16).
GQA_CASES = {
    "g1_d9_global_leftpad": (1, 37, 3, 3, 9, None, (4,), 16),
    "g3_d11_chunk8_leftpad": (2, 37, 6, 2, 11, 8, (0, 5), 8),
    "g3_d12_chunk16_default": (1, 50, 3, 1, 12, 16, (), None),
    "g4_d7_chunk16_block5": (2, 41, 8, 2, 7, 16, (3,), 5),
    "g5_d13_chunk8_default": (1, 37, 10, 2, 13, 8, (), None),
    "g5_d13_global_default": (2, 37, 5, 1, 13, None, (0, 6), None),
}


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_q"))
def run_pallas(q, k, v, q_pos, k_pos, chunk_size, block_q):
    return pallas_flash.pallas_flash_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, block_q=block_q,
                                               block_k=16)


@pytest.mark.parametrize("case", list(GQA_CASES))
def test_pallas_gqa_blocks_equal_xla(case):
    """Output equals xla and the lse equals blockwise's (ring attention merges by it),
    for every G and row padding of GQA_CASES."""
    B, T, H, K, d, chunk, pad, block_q = GQA_CASES[case]
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, left_pad=pad, seed=11)
    out, lse = run_pallas(q, k, v, qp, kp, chunk, block_q)
    m = valid_rows(qp, kp)
    ref = xla_attention(q, k, v, qp, kp, chunk_size=chunk)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=TOL, rtol=0)
    _, lse_ref = bw.flash_attention(q, k, v, qp, kp, chunk_size=chunk, block_q=8, block_k=8)
    np.testing.assert_allclose(np.where(m[..., 0], lse, 0), np.where(m[..., 0], lse_ref, 0), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["g3_d11_chunk8_leftpad", "g5_d13_global_default", "g3_t150_chunk64"])
def test_pallas_gqa_gradients(case):
    """jax.grad through the kernel's custom VJP equals the reference's. The backward
    runs at blockwise's block sizes on inputs padded again to them: in g3_t150_chunk64
    (150 tokens, chunk 64, so 64 x 64 backward tiles) the kernel pads T to 168 (bq 21)
    and the backward to 192."""
    B, T, H, K, d, chunk, pad, block_q = GQA_CASES.get(case, (1, 150, 3, 1, 11, 64, (7,), None))
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, left_pad=pad, seed=12)
    m = valid_rows(qp, kp)
    w = jnp.asarray(np.random.default_rng(13).normal(size=(B, T, H, d)), jnp.float32)

    def loss(f, q, k, v):
        return jnp.sum(jnp.where(m, f(q, k, v), 0) * w)

    pallas = lambda q, k, v: run_pallas(q, k, v, qp, kp, chunk, block_q)[0]  # noqa: E731
    ref = lambda q, k, v: xla_attention(q, k, v, qp, kp, chunk_size=chunk)  # noqa: E731
    grads = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2)))(q, k, v)
    refs = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    for g, g_ref, name in zip(grads, refs, "qkv"):
        np.testing.assert_allclose(g, g_ref, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("H,K,d", [(6, 2, 11), (10, 2, 13)])
def test_pallas_gqa_bf16(H, K, d):
    """bf16, default blocks (128 rows: 42 positions x 3 heads, 25 x 5), G = 3 and 5:
    within the bf16 tolerance of `test_bf16`."""
    q, k, v, qp, kp = make_inputs(2, 61, 61, H, K, d, left_pad=(0, 9), seed=14)
    m = valid_rows(qp, kp)
    exact = xla_attention(q, k, v, qp, kp, chunk_size=16)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = xla_attention(q16, k16, v16, qp, kp, chunk_size=16).astype(jnp.float32)
    assert pallas_flash.block_sizes(61, 61, H, K, 2)[::2] == ((42, 128) if H // K == 3 else (25, 128))
    out = jax.jit(lambda *a: pallas_flash.pallas_flash_attention(*a, chunk_size=16)[0])(q16, k16, v16, qp, kp)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=3e-2, rtol=0)
    err_ref = float(jnp.max(jnp.abs(jnp.where(m, ref - exact, 0))))
    err_out = float(jnp.max(jnp.abs(jnp.where(m, out - exact, 0))))
    assert err_out <= 1.5 * err_ref + 1e-3, (err_out, err_ref)


@pytest.mark.parametrize("H,K,d", [(6, 2, 11), (4, 4, 9)])
def test_pallas_gqa_decode_against_cache(H, K, d):
    """One new token per row (a program per KV head: G of 16 rows real) against a
    chunked layer's ring buffer (slots out of position order, one empty) and a global
    layer's half-filled cache, rows at different positions."""
    q, k, v, _, _ = make_inputs(2, 1, 32, H, K, d, seed=15)
    ring_pos = np.array([(32 + s) if s >= 5 else (48 + s) for s in range(16)] + [INVALID_POS] * 16)
    ring_pos[3] = INVALID_POS
    kp_ring = jnp.asarray(np.stack([ring_pos, ring_pos]), jnp.int32).at[1, 16].set(49)
    qp_ring = jnp.asarray([[52], [49]], jnp.int32)  # row 0's token 52 sees 48..52 of the buffer
    kp_glob = jnp.asarray(np.where(np.arange(32)[None] < np.array([[29], [17]]), np.arange(32), INVALID_POS),
                          jnp.int32)
    qp_glob = jnp.asarray([[28], [16]], jnp.int32)
    for chunk, qpos, kpos in ((16, qp_ring, kp_ring), (None, qp_glob, kp_glob)):
        out = run_pallas(q, k, v, qpos, kpos, chunk, None)[0]
        np.testing.assert_allclose(out, xla_attention(q, k, v, qpos, kpos, chunk_size=chunk), atol=TOL, rtol=0)


def _sub_jaxprs(eqn):
    import jax.extend.core

    return jax.extend.core.jaxprs_in_params(eqn.params)


def _pallas_calls(jaxpr):
    """The pallas_call equations of a jaxpr, looking inside nested jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for sub in _sub_jaxprs(eqn):
            yield from _pallas_calls(sub)


def _loads(jaxpr, depth=0):
    """[(shape, loop depth)] of every ref load in a kernel jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("get", "load"):
            found.append((tuple(eqn.invars[0].aval.shape), depth))
        for sub in _sub_jaxprs(eqn):
            found += _loads(sub, depth + (eqn.primitive.name == "while"))
    return found


@pytest.mark.parametrize("H,K", [(10, 2), (6, 2), (8, 8)])
def test_pallas_reads_each_kv_block_once_per_query_block(H, K):
    """The grid has one program per (batch row, KV head, query block), not per query
    head; its q tile holds the G heads' rows (G * bq, padded to a power of two); and the
    kernel loads the K and V refs once each, inside the loop over the key blocks of the
    plan. So a K/V block is read once per query block for all G heads: B * K * sum(cnt)
    K tiles in all (cnt from `blockwise.block_plan`), a G-th of the B * H * sum(cnt) of a
    kernel with one program per query head."""
    B, T, S, d, bq, bk = 2, 37, 40, 12, 8, 16
    q, k, v, qp, kp = make_inputs(B, T, S, H, K, d)
    f = lambda *a: pallas_flash.pallas_flash_attention(*a, chunk_size=8, block_q=bq, block_k=bk)  # noqa: E731
    (eqn,) = list(_pallas_calls(jax.make_jaxpr(f)(q, k, v, qp, kp).jaxpr))
    n_q, S_pad, rows = -(-T // bq), -(-S // bk) * bk, pallas_flash._pow2(H // K * bq)
    assert tuple(eqn.params["grid_mapping"].grid) == (B, K, n_q)
    loads = _loads(eqn.params["jaxpr"])
    assert ((rows, 16), 0) in loads  # the q tile: G heads x bq positions (+ padding) x d padded to 16
    kv = [depth for shape, depth in loads if shape == (S_pad, 16)]
    assert kv == [1, 1], loads  # K and V, one load each per step of the key-block loop
    assert ((n_q,), 0) in loads  # the loop's trip count: the plan's cnt[i] for the program's query block


def test_auto_backend_on_a_long_cache():
    """`auto` picks blockwise for a one-token decode against 1100 cache slots (> XLA_MAX_LEN),
    700 filled: equal to xla (empty blocks are skipped, not miscounted)."""
    q, k, v, _, _ = make_inputs(1, 1, 1100, 5, 1, 8, seed=9)
    kp = jnp.where(jnp.arange(1100) < 700, jnp.arange(1100), INVALID_POS).astype(jnp.int32)[None]
    qp = jnp.full((1, 1), 699, jnp.int32)
    assert default_attention_impl(1100) == "blockwise"
    out = jax.jit(lambda *a: attend(*a, chunk_size=None, impl="auto"))(q, k, v, qp, kp)
    np.testing.assert_allclose(out, xla_attention(q, k, v, qp, kp), atol=TOL, rtol=0)


def test_block_plan_skips_masked_blocks():
    """Chunked layer, 64 sorted positions, blocks of 8, chunk 16: query block i needs
    only the key blocks of its own chunk up to itself (1 or 2), the O(S * C) schedule;
    a global layer needs every block up to the diagonal."""
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    idx, cnt = bw.block_plan(pos, pos, 16, 8, 8)
    np.testing.assert_array_equal(cnt, [1, 2] * 4)
    np.testing.assert_array_equal(idx[3, :2], [2, 3])
    _, cnt = bw.block_plan(pos, pos, None, 8, 8)
    np.testing.assert_array_equal(cnt, np.arange(1, 9))


@pytest.mark.parametrize("case", ["global_gqa5_leftpad", "chunk8_not_dividing_gqa4"])
@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_gradients_match_reference(case, impl):
    """jax.grad through the custom VJPs equals jax.grad of the reference, for q, k, v."""
    B, T, H, K, d, chunk, pad = CASES[case]
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, left_pad=pad, seed=2)
    m = valid_rows(qp, kp)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, d)), jnp.float32)

    def loss(impl, q, k, v):
        return jnp.sum(jnp.where(m, run(q, k, v, qp, kp, impl, chunk), 0) * w)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    for g, g_ref, name in zip(grad(impl, q, k, v), grad("xla", q, k, v), "qkv"):
        np.testing.assert_allclose(g, g_ref, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_bf16(impl):
    """bf16 inputs: as close to the fp32 result as the bf16 reference is. Both round
    q, k, v and the probabilities to bf16 (8 mantissa bits, relative error 2^-9), on
    outputs of size ~1; we allow 3e-2 absolute from the bf16 reference, about 8 bf16
    ulps at 1, and check ours is no further than 1.5x the reference's own fp32 error."""
    B, T, H, K, d, chunk, pad = CASES["chunk8_not_dividing_gqa4"]
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, left_pad=pad, seed=4)
    m = valid_rows(qp, kp)
    exact = run(q, k, v, qp, kp, "xla", chunk)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = run(q16, k16, v16, qp, kp, "xla", chunk).astype(jnp.float32)
    out = run(q16, k16, v16, qp, kp, impl, chunk).astype(jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=3e-2, rtol=0)
    err_ref = float(jnp.max(jnp.abs(jnp.where(m, ref - exact, 0))))
    err_out = float(jnp.max(jnp.abs(jnp.where(m, out - exact, 0))))
    assert err_out <= 1.5 * err_ref + 1e-3, (err_out, err_ref)


def test_fully_masked_rows_are_zero_with_empty_lse():
    """A query that sees no key gets output 0 and lse = NEG (finite), never NaN."""
    q, k, v, qp, kp = make_inputs(1, 4, 8, 2, 1, 8)
    kp = jnp.full_like(kp, INVALID_POS)
    out, lse = bw.flash_attention(q, k, v, qp, kp, chunk_size=None)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == bw.NEG)


# One scanned group of the scout_like pattern (3 chunked RoPE layers, 1 global NoPE layer,
# chunk 8, floor_scale 6 so the NoPE temperature varies) with one dense MoE layer: the
# whole attention stack at the smallest compile cost.
MODEL_CFG = dataclasses.replace(TEXT["scout_like"], num_hidden_layers=4, no_rope_layers=(1, 1, 1, 0), moe_layers=(3,))


def random_params(cfg, seed=0):
    """Random fp32 parameters of `cfg` (normal / sqrt(fan_in)), without tracing flax init."""
    leaves, tree = jax.tree_util.tree_flatten(abstract_params(cfg, dtype="float32"))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-1]), x.dtype) for x in leaves])


@functools.lru_cache(maxsize=None)
def model_case():
    """(params, ids [2, 125], mask, xla reference logits), shared with test_ring so the
    reference compiles once. Row 1 is left-padded by 8 tokens: one whole chunk, so its
    chunks stay aligned to the ring's 8-token zigzag pieces (the chunk-local path)."""
    params = random_params(MODEL_CFG)
    ids = jax.random.randint(jax.random.key(1), (2, 125), 0, MODEL_CFG.vocab_size)
    mask = jnp.ones((2, 125), jnp.int32).at[1, :8].set(0)
    return params, ids, mask, forward(MODEL_CFG, params, ids, attention_mask=mask, moe_impl="dense")


def test_model_forward_matches_xla():
    """Full decoder with the blockwise backend equals the xla reference, left padding
    included. Logits are O(1); fp32 reordering through 4 layers stays below 2e-5."""
    params, ids, mask, ref = model_case()
    out = forward(MODEL_CFG, params, ids, attention_mask=mask, attention_impl="blockwise", moe_impl="dense")
    m = mask[:, :, None] > 0
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=2e-5, rtol=0)


def test_registered_and_default():
    assert {"xla", "blockwise", "pallas", "splash", "cudnn", "ring", "ring_blockwise", "ring_pallas",
            "auto"} <= set(backends())
    assert default_attention_impl(256) == "xla"
    assert default_attention_impl(65536) == "blockwise"
    with pytest.raises(ValueError, match="unknown attention_impl 'nope'"):
        attend(*make_inputs(1, 2, 2, 1, 1, 8), chunk_size=None, impl="nope")
    with pytest.raises(ValueError, match="positions must be"):
        bw.flash_attention(*make_inputs(1, 2, 2, 1, 1, 8)[:3], jnp.zeros((1, 3), jnp.int32),
                           jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("chunk", [None, 8])
def test_pallas_lowers_for_cuda(chunk):
    """The Pallas kernel (interpret=False) lowers for `cuda` on this CPU host, in the
    configurations the model uses: the tiny test shapes (GQA ratio 5, head dim 14
    padded to 16) in fp32, prefill and a one-token decode; GQA ratio 3 with head dim 11
    (rows 3 x 21 padded to 64); and Scout's attention shape (40 heads on 8 KV heads of
    128, bf16: 5 x 25 of 128 rows, 8 warps), prefill at a length that is not a power of
    two and a one-token decode (5 of 16 rows)."""
    for T, S, H, K, d, dtype in ((37, 37, 5, 1, 14, jnp.float32), (1, 40, 5, 1, 14, jnp.float32),
                                 (50, 50, 6, 2, 11, jnp.float32), (192, 192, 40, 8, 128, jnp.bfloat16),
                                 (1, 300, 40, 8, 128, jnp.bfloat16)):
        q, k, v, qp, kp = make_inputs(1, T, S, H, K, d, dtype=dtype)
        f = lambda *a: pallas_flash.pallas_flash_attention(*a, chunk_size=chunk, interpret=False)  # noqa: E731
        exp = pallas_flash.lower_for_cuda(f, q, k, v, qp, kp)
        assert exp.platforms == ("cuda",)
        assert "triton" in exp.mlir_module()


def test_auto_picks_by_platform_and_size():
    """CPU: xla up to XLA_MAX_LEN tokens, then blockwise. GPU: xla while its fp32 scores
    fit GPU_XLA_MAX_SCORE_BYTES (faster than blockwise at 16K on an H200), then blockwise."""
    from llama4_jax import kernels

    assert default_attention_impl(kernels.XLA_MAX_LEN, platform="cpu") == "xla" == default_attention_impl(256)
    assert default_attention_impl(257, platform="cpu") == "blockwise"
    assert default_attention_impl(16384, batch_heads=4, platform="gpu") == "xla"  # 4 GiB of scores
    assert default_attention_impl(16384, batch_heads=5, platform="gpu") == "blockwise"
    assert default_attention_impl(1, key_len=65536, batch_heads=64, platform="gpu") == "xla"  # a decode step
    assert kernels.backends()[:3] == ("xla", "blockwise", "pallas")


def test_kernels_do_not_import_the_model():
    """No import cycle: the kernels package imports nothing of llama4_jax.model (its
    shared leaf is kernels/reference.py); the model imports `attend` from it."""
    import ast
    import pathlib

    import llama4_jax.kernels

    for path in pathlib.Path(llama4_jax.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert not (name.startswith("..model") or name.startswith("llama4_jax.model")), (path.name, name)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("llama4_jax.model") for a in node.names), path.name


# ---- fused kernels under a positions check: splash (jax's Pallas TPU kernel,
# interpret mode here) and cudnn (cuDNN flash attention; jax.nn's XLA implementation
# off a GPU) -----------------------------------------------------------------------------

# (B, T, H, K, d, chunk): chunk not dividing T, GQA 5, head dim 14 (T padded to 128);
# global over 130 tokens (two 128-token blocks after padding, one nearly empty);
# chunk dividing T with GQA 4.
SPLASH_CASES = {
    "chunk8_gqa5": (2, 37, 5, 1, 14, 8),
    "global_two_blocks": (1, 130, 4, 2, 16, None),
    "chunk16_dividing_gqa4": (2, 48, 8, 2, 10, 16),
}


def contiguous_inputs(B, T, H, K, d, seed=0, dtype=jnp.float32):
    q, k, v, qp, kp = make_inputs(B, T, T, H, K, d, seed=seed, dtype=dtype)
    assert np.array_equal(qp, np.tile(np.arange(T), (B, 1))) and np.array_equal(kp, qp)
    return q, k, v, qp, kp


# (B, T, H, K, d, chunk): whole chunks plus a partial one, GQA 5; whole chunks only,
# GQA 4; one partial chunk (T < chunk); global.
CUDNN_CASES = {
    "chunk8_tail_gqa5": (2, 37, 5, 1, 16, 8),
    "chunk16_dividing_gqa4": (2, 48, 8, 2, 8, 16),
    "chunk64_one_partial": (1, 40, 4, 2, 8, 64),
    "global": (2, 33, 4, 2, 8, None),
}


def _splash_kernel(q, k, v, chunk):
    from llama4_jax.kernels import splash

    return splash.splash_kernel_attention(q, k, v, chunk_size=chunk)


def _cudnn_kernel(q, k, v, chunk):
    from llama4_jax.kernels import cudnn

    return cudnn.chunked_causal(q, k, v, chunk_size=chunk)


def _with_fallback(name):
    from llama4_jax.kernels import cudnn, splash

    return {"splash": splash.splash_attention, "cudnn": cudnn.cudnn_attention}[name]


# name -> (the kernel alone for positions 0..T-1, its cases, the cases its gradient runs)
FUSED = {
    "splash": (_splash_kernel, SPLASH_CASES, ("chunk8_gqa5", "global_two_blocks")),
    "cudnn": (_cudnn_kernel, CUDNN_CASES, ("chunk8_tail_gqa5", "global")),
}


@pytest.mark.parametrize("name,case", [(n, c) for n, (_, cases, _) in FUSED.items() for c in cases])
def test_fused_kernel_equals_xla(name, case):
    """The kernel equals xla where it applies (positions 0..T-1 in every row), alone and
    through its backend: splash in interpret mode; cudnn's calls (chunks reshaped into
    rows, a partial chunk apart) through jax.nn's XLA implementation, the calls cuDNN
    gets on a GPU."""
    kernel, cases, _ = FUSED[name]
    B, T, H, K, d, chunk = cases[case]
    q, k, v, qp, kp = contiguous_inputs(B, T, H, K, d, seed=5)
    ref = xla_attention(q, k, v, qp, kp, chunk_size=chunk)
    out = jax.jit(lambda q, k, v: kernel(q, k, v, chunk))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    out = jax.jit(lambda *a: attend(*a, chunk_size=chunk, impl=name))(q, k, v, qp, kp)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name,case", [(n, c) for n, (_, _, grads) in FUSED.items() for c in grads])
def test_fused_kernel_gradients_match_reference(name, case):
    """The kernel's gradients equal jax.grad of the reference (splash's own dq / dkv
    kernels; for cudnn the reshaped calls', cuDNN's backward kernels on a GPU)."""
    kernel, cases, _ = FUSED[name]
    B, T, H, K, d, chunk = cases[case]
    q, k, v, qp, kp = contiguous_inputs(B, T, H, K, d, seed=6)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, H, d)), jnp.float32)
    f = lambda q, k, v: jnp.sum(kernel(q, k, v, chunk) * w)  # noqa: E731
    f_ref = lambda q, k, v: jnp.sum(xla_attention(q, k, v, qp, kp, chunk_size=chunk) * w)  # noqa: E731
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    for g, g_ref, gname in zip(grads, jax.grad(f_ref, argnums=(0, 1, 2))(q, k, v), "qkv"):
        np.testing.assert_allclose(g, g_ref, atol=GRAD_TOL, rtol=0, err_msg=f"d{gname}")


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_kernel_applies_only_where_its_mask_is_ours(name):
    """The kernel runs exactly when positions are 0..T-1 in every row of a self-attention
    call with no multi-device mesh; everything else takes the fallback. A fallback that
    returns a sentinel shows which branch ran."""
    from llama4_jax import sharding

    with_fallback = _with_fallback(name)
    B, T, H, K, d, chunk = SPLASH_CASES["chunk8_gqa5"]
    q, k, v, qp, kp = contiguous_inputs(B, T, H, K, d, seed=9)
    sentinel = lambda q, k, v, qp, kp, chunk_size: jnp.full(q.shape, 7.0, q.dtype)  # noqa: E731
    call = jax.jit(lambda q, k, v, qp, kp: with_fallback(q, k, v, qp, kp, chunk_size=chunk, fallback=sentinel))
    np.testing.assert_allclose(call(q, k, v, qp, kp), xla_attention(q, k, v, qp, kp, chunk_size=chunk), atol=TOL)
    _, _, _, qp_pad, kp_pad = make_inputs(B, T, T, H, K, d, left_pad=(0, 3))  # row 1 left-padded
    shifted = qp + 8  # contiguous but not starting at 0 (chunks would be misaligned)
    invalid = kp.at[0, 5].set(INVALID_POS)  # one empty key slot
    for case, (qpos, kpos) in {"left pad": (qp_pad, kp_pad), "offset": (shifted, shifted),
                               "invalid slot": (qp, invalid), "keys differ": (qp, kp.at[1].set(kp[1, ::-1]))}.items():
        assert np.all(np.asarray(call(q, k, v, qpos, kpos)) == 7.0), case
    # Static: a decode step (T=1 against 37 keys), and an active 8-device mesh.
    assert np.all(np.asarray(with_fallback(q[:, -1:], k, v, qp[:, -1:], kp, chunk_size=chunk,
                                           fallback=sentinel)) == 7.0)
    with sharding.activate(sharding.make_mesh("data=8")):
        assert np.all(np.asarray(with_fallback(q, k, v, qp, kp, chunk_size=chunk, fallback=sentinel)) == 7.0)
    # The registered backend's fallback is a real backend: left-padded rows equal xla.
    out = jax.jit(lambda *a: attend(*a, chunk_size=chunk, impl=name))(q, k, v, qp_pad, kp_pad)
    m = valid_rows(qp_pad, kp_pad)
    ref = xla_attention(q, k, v, qp_pad, kp_pad, chunk_size=chunk)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(FUSED))
def test_model_forward_with_fused_kernel_matches_xla(name):
    """The decoder with `splash` or `cudnn` (3 chunked RoPE layers with QK norm, 1
    global NoPE layer with temperature tuning, chunk 8 over 125 tokens: 15 whole chunks
    and a partial one) equals xla: unpadded rows run the kernel in every layer; with a
    left-padded row the whole batch takes the fallback."""
    params, ids, mask, ref_padded = model_case()
    ref = forward(MODEL_CFG, params, ids, moe_impl="dense")
    out = forward(MODEL_CFG, params, ids, attention_impl=name, moe_impl="dense")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    out = forward(MODEL_CFG, params, ids, attention_mask=mask, attention_impl=name, moe_impl="dense")
    m = mask[:, :, None] > 0
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref_padded, 0), atol=2e-5, rtol=0)


def test_splash_bf16():
    """bf16: as close to the fp32 result as the bf16 xla reference is (see `test_bf16`;
    splash also rounds q * 1/sqrt(d) to bf16 once, and keeps P @ V in fp32)."""
    from llama4_jax.kernels import splash

    B, T, H, K, d, chunk = SPLASH_CASES["chunk8_gqa5"]
    q, k, v, qp, kp = contiguous_inputs(B, T, H, K, d, seed=8)
    exact = xla_attention(q, k, v, qp, kp, chunk_size=chunk)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = xla_attention(q16, k16, v16, qp, kp, chunk_size=chunk).astype(jnp.float32)
    out = splash.splash_kernel_attention(q16, k16, v16, chunk_size=chunk)
    assert out.dtype == jnp.bfloat16
    out = out.astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=3e-2, rtol=0)
    err_ref, err_out = float(jnp.max(jnp.abs(ref - exact))), float(jnp.max(jnp.abs(out - exact)))
    assert err_out <= 1.5 * err_ref + 1e-3, (err_out, err_ref)


def test_auto_on_tpu_is_splash():
    from llama4_jax.kernels import platform

    assert default_attention_impl(512, platform="tpu") == "splash"
    assert default_attention_impl(65536, platform="tpu") == "splash"
    with platform.tracing_for("tpu"):
        assert default_attention_impl(512) == "splash"
    with platform.tracing_for("cuda"):
        assert default_attention_impl(512) == "xla"
    assert default_attention_impl(256) == "xla" and platform.target() == "cpu"


def test_platform_target_and_tracing_for():
    """Trace-time choices read `platform.target()`: this host's backend, or the platform
    of an enclosing `tracing_for` (names normalised, nesting restored, typos refused)."""
    from llama4_jax.kernels import pallas_flash, platform, ring, splash

    assert platform.target() == "cpu"
    assert pallas_flash.default_interpret() and splash.default_interpret() and ring.default_inner() == "blockwise"
    with platform.tracing_for("cuda") as p:
        assert p == platform.target() == "gpu"
        assert not pallas_flash.default_interpret() and splash.default_interpret()
        assert ring.default_inner() == "pallas"
        with platform.tracing_for("tpu"):
            assert platform.target() == "tpu" and not splash.default_interpret() and pallas_flash.default_interpret()
        assert platform.target() == "gpu"
    assert platform.target() == "cpu"
    with pytest.raises(ValueError, match="unknown platform 'tpuv5'"):
        with platform.tracing_for("tpuv5"):
            pass


@pytest.mark.parametrize("chunk", [None, 8192])
def test_splash_lowers_for_tpu(chunk):
    """The `splash` backend, traced as for a TPU (kernel compiled, not interpreted), lowers
    for `tpu` on this CPU host at Scout's attention shape (40 heads on 8 KV heads of 128,
    bf16, 192 tokens padded to a 256-token block), forward and gradient, with the
    positions check and the fallback beside it. Mosaic's own compile of the kernel needs
    a TPU and is not checked here."""
    q, k, v, qp, kp = make_inputs(1, 192, 192, 40, 8, 128, dtype=jnp.bfloat16)
    f = lambda q, k, v, qp, kp: attend(q, k, v, qp, kp, chunk_size=chunk, impl="splash")  # noqa: E731
    g = jax.grad(lambda q, k, v, qp, kp: f(q, k, v, qp, kp).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn, kernels in ((f, ("splash_mha_fwd",)), (g, ("splash_mha_fwd", "splash_mha_dkv", "splash_mha_dq"))):
        exp = lower_for_tpu_or_skip(fn, q, k, v, qp, kp)
        module = exp.mlir_module()
        assert exp.platforms == ("tpu",) and "tpu_custom_call" in module
        for name in kernels:
            assert name in module, name


def test_auto_on_gpu_is_cudnn_for_half_precision():
    """`auto` on a GPU is `cudnn` for bf16/fp16 activations and the scores-size rule for
    fp32. Traced for a GPU on this host (no cuDNN here), the `cudnn` backend is its
    fallback alone: `auto` in bf16 lowers for cuda, with neither cuDNN's custom call
    nor the positions check and jax.nn's XLA implementation (which run only off GPU)."""
    from jax import export

    from llama4_jax.kernels import cudnn, platform

    assert default_attention_impl(4096, platform="gpu", dtype=jnp.bfloat16) == "cudnn"
    assert default_attention_impl(4096, platform="gpu", dtype=jnp.float16) == "cudnn"
    assert default_attention_impl(4096, platform="gpu", dtype=jnp.float32) == "xla"
    assert default_attention_impl(4096, platform="gpu") == "xla"
    assert default_attention_impl(4096, platform="cpu", dtype=jnp.bfloat16) == "blockwise"
    assert default_attention_impl(4096, platform="tpu", dtype=jnp.bfloat16) == "splash"
    q, k, v, qp, kp = make_inputs(1, 64, 64, 4, 2, 128, dtype=jnp.bfloat16)
    with platform.tracing_for("cuda"):
        assert not cudnn.cudnn_runs(q, k, v, 16)
        exp = export.export(jax.jit(lambda *a: attend(*a, chunk_size=16, impl="auto")), platforms=["cuda"])(
            q, k, v, qp, kp)
    module = exp.mlir_module()
    assert "__cudnn" not in module  # no fused-attention custom call
    assert "stablehlo.case" not in module and "stablehlo.if" not in module  # no positions check: the fallback alone
    assert not cudnn.cudnn_runs(q, k, v, 16)  # on this CPU host: not a GPU trace
