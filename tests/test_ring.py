"""Ring attention on 8 fake CPU devices equals single-device `xla`.

Inputs are put in the zigzag layout (as `forward` does) and outputs permuted back.
Tolerances as in test_attention_backends (fp32 reorderings only): 2e-6 on outputs,
2e-5 on gradients, 2e-5 on model logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from llama4_jax.kernels import ring
from llama4_jax.model.attention import INVALID_POS, xla_attention
from llama4_jax.model.text import forward
from tests.test_attention_backends import GRAD_TOL, MODEL_CFG, TOL, make_inputs, model_case, valid_rows

N = 8
T = 64  # 2N pieces of 4 tokens: chunk 4 keeps every chunk on one device, chunk 6 does not


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:N]), ("seq",))


PERM = ring.zigzag_permutation(T, N)
INV = np.argsort(PERM)


def to_layout(*xs):
    return tuple(x[:, PERM] for x in xs)


@functools.partial(jax.jit, static_argnames=("mesh", "inner", "chunk"))
def run_ring(q, k, v, qp, kp, mesh, inner, chunk):
    return ring.ring_flash_attention(q, k, v, qp, kp, chunk_size=chunk, mesh=mesh, inner=inner)[0]


def test_zigzag_layout():
    """Device i holds pieces i and 2N-1-i, each of T / 2N consecutive tokens."""
    dev = PERM.reshape(N, 2, T // (2 * N))
    assert dev[0, 0, 0] == 0 and dev[0, 1, 0] == (2 * N - 1) * 4 and dev[3, 0, 0] == 12 and dev[3, 1, 0] == 48
    np.testing.assert_array_equal(np.sort(PERM), np.arange(T))


# (chunk, left_pad, chunk-local path expected): global; chunk 4 with every chunk inside a
# half-shard (local path); chunk 6 not dividing the half-shard (ring); chunk 4 with left
# padding 3, which shifts the chunks across shards (ring).
CASES = {
    "global_leftpad": (None, (3,), None),
    "chunk_local": (4, (), True),
    "chunk_not_local": (6, (), False),
    "chunk_leftpad_not_local": (4, (0, 3), False),
}


@pytest.mark.parametrize("case,inner", [(c, "blockwise") for c in CASES] + [("global_leftpad", "pallas"),
                                                                              ("chunk_local", "pallas")])
def test_ring_equals_xla(mesh, case, inner):
    chunk, pad, local = CASES[case]
    q, k, v, qp, kp = make_inputs(2, T, T, 8, 2, 8, left_pad=pad, seed=5)
    ref = xla_attention(q, k, v, qp, kp, chunk_size=chunk)
    out = run_ring(*to_layout(q, k, v, qp, kp), mesh, inner, chunk)[:, INV]
    if chunk:
        assert bool(ring.chunk_local(kp[:, PERM], N, chunk)) == local
    m = valid_rows(qp, kp)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=TOL, rtol=0)


def test_ring_bf16(mesh):
    """bf16 q/k/v through the ring (chunked, ring path): within 3e-2 of the bf16 xla
    reference, as in test_attention_backends.test_bf16 (bf16 rounding of q, k, v and
    probabilities, 2^-9 relative, on outputs of size ~1); partial results are merged in
    fp32, so the ring adds no bf16 rounding of its own."""
    q, k, v, qp, kp = make_inputs(2, T, T, 8, 2, 8, left_pad=(0, 3), seed=10, dtype=jnp.bfloat16)
    ref = xla_attention(q, k, v, qp, kp, chunk_size=6).astype(jnp.float32)
    out = run_ring(*to_layout(q, k, v, qp, kp), mesh, "blockwise", 6)[:, INV]
    m = valid_rows(qp, kp)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=3e-2, rtol=0)


@pytest.mark.parametrize("case,inner", [("chunk_local", "blockwise"), ("chunk_not_local", "pallas")])
def test_ring_gradients(mesh, case, inner):
    """jax.grad through the ring (ppermute, lse merges, the local/ring cond) equals the
    reference: once through the chunk-local branch, once through the ring itself."""
    chunk, pad, _ = CASES[case]
    q, k, v, qp, kp = make_inputs(1, T, T, 5, 1, 8, left_pad=pad, seed=6)
    m = valid_rows(qp, kp)
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

    def loss_ref(q, k, v):
        return jnp.sum(jnp.where(m, xla_attention(q, k, v, qp, kp, chunk_size=chunk), 0) * w)

    def loss_ring(q, k, v):
        out = run_ring(*to_layout(q, k, v, qp, kp), mesh, inner, chunk)[:, INV]
        return jnp.sum(jnp.where(m, out, 0) * w)

    grads = jax.jit(jax.grad(loss_ring, (0, 1, 2)))(q, k, v)
    for g, g_ref, name in zip(grads, jax.jit(jax.grad(loss_ref, (0, 1, 2)))(q, k, v), "qkv"):
        np.testing.assert_allclose(g, g_ref, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


def test_decode_with_sequence_sharded_cache(mesh):
    """One query per row against a global layer's cache of 44 slots (padded to 48 and
    split over the 8 devices), 37 / 30 of them filled: per-device partial attention
    merged over the axis."""
    q, k, v, _, _ = make_inputs(2, 1, 44, 5, 1, 8, seed=8)
    n_filled = jnp.array([[37], [30]])
    kp = jnp.where(jnp.arange(44)[None] < n_filled, jnp.arange(44)[None], INVALID_POS).astype(jnp.int32)
    qp = (n_filled - 1).astype(jnp.int32)
    ref = xla_attention(q, k, v, qp, kp, chunk_size=None)
    out = run_ring(q, k, v, qp, kp, mesh, "blockwise", None)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_forward_and_cached_decode_equal_xla(mesh):
    """forward(attention_impl='ring', mesh=...) equals the single-device reference: 125
    tokens are padded to 128 (16 pieces of 8 = chunk 8; row 1's 8 left pads keep its
    chunks aligned, so the chunked layers take the local path), the NoPE layer runs the
    ring, RoPE and temperature use global positions; the same under jax.jit. Then one
    decode step of TextModel with the ring backend against a KV cache whose slots are
    split over `seq` gives the same logits for token 125."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llama4_jax.cache import init_cache
    from llama4_jax.model.text import TextModel, positions_from_mask

    params, ids, mask, ref = model_case()
    m = mask[:, :, None] > 0
    out = forward(MODEL_CFG, params, ids, attention_mask=mask, attention_impl="ring", moe_impl="dense", mesh=mesh)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=2e-5, rtol=0)
    # Inside a jit (as benchmarks/long_context.py calls it) the parameters are tracers.
    out = jax.jit(lambda p, i, a: forward(MODEL_CFG, p, i, attention_mask=a, attention_impl="ring", moe_impl="dense",
                                          mesh=mesh))(params, ids, mask)
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="'seq' axis"):
        forward(MODEL_CFG, params, ids, attention_impl="ring", moe_impl="dense")

    # Prefill 124 tokens into the cache on one device (xla), split the cache's slots over
    # `seq`, decode token 125 with the ring backend (sharded-cache path).
    def step(impl, params, ids, pos, valid, cache):
        with ring.use_mesh(mesh):
            return TextModel(MODEL_CFG, jnp.float32, impl, "dense").apply(params, ids, pos, valid, cache)[:2]

    step = jax.jit(step, static_argnums=0)
    pos, valid = positions_from_mask(mask)
    _, cache = step("xla", params, ids[:, :124], pos[:, :124], valid[:, :124], init_cache(MODEL_CFG, 2, 128))
    slot_axis = {"k": 4, "v": 3, "pos": 2}  # cache.py: k [G, B, K, d, S], v [G, B, K, S, d], pos [G, B, S]
    cache = {name: {leaf: jax.device_put(x, NamedSharding(mesh, P(*[None] * slot_axis[leaf], "seq")))
                    for leaf, x in entry.items()} for name, entry in cache.items()}
    logits, _ = step("ring_blockwise", params, ids[:, 124:], pos[:, 124:], valid[:, 124:], cache)
    np.testing.assert_allclose(logits, ref[:, 124:], atol=2e-5, rtol=0)
