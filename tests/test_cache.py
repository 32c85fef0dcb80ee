"""KV cache: prefill + decode equals one full forward; ring buffer; int8 error."""

import dataclasses
import functools
import gc
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax
from llama4_jax.cache import (abstract_cache, cache_bytes, cache_lengths, cache_slots, init_cache, quantize_kv,
                              split_groups)
from llama4_jax.config import Llama4Config, RopeScaling, TextConfig
from llama4_jax.model.attention import INVALID_POS, read_cache, write_cache
from llama4_jax.kernels import cached
from llama4_jax.kernels.reference import xla_attention
from llama4_jax.model.text import TextModel
from llama4_jax.model.layers import ExpertList
from llama4_jax.model.views import split_expert_layers, unstack_layers

# Every layer type in two scanned groups: RoPE+chunked and NoPE+global attention, dense
# and MoE (top-2) feed-forward; chunk 4 and floor_scale 4 so a 24-token sequence crosses
# five chunk boundaries and three temperature steps. Odd sizes catch transposes.
CFG = Llama4Config(text=TextConfig(
    vocab_size=101, hidden_size=24, intermediate_size=14, intermediate_size_mlp=18, num_hidden_layers=8,
    num_attention_heads=6, num_key_value_heads=2, head_dim=6, num_local_experts=3, num_experts_per_tok=2,
    moe_layers=(1, 3, 5, 7), no_rope_layers=(1, 1, 1, 0) * 2, attention_chunk_size=4, floor_scale=4,
    rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8), rope_theta=10000.0, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
))
PROMPT_LENS = (5, 9, 2)  # a ragged, left-padded batch
T_PROMPT, T_CHUNK, N_DECODE = 9, 3, 12  # prefill 9, a second prefill piece of 3, then 12 single steps
TOTAL = T_PROMPT + T_CHUNK + N_DECODE


@pytest.fixture(scope="module")
def params():
    """Random weights of a useful size (std 0.2 ~ 1/sqrt(24), norm weights around 1).

    Drawn with numpy into the abstract tree (no init to compile)."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 0.2 * rng.normal(size=x.shape), jnp.float32)
        return jnp.asarray(0.2 * rng.normal(size=x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, llama4_jax.abstract_params(CFG, dtype="float32"))


def _step_fn(params, ids, positions, valid, cache, scan_layers=True):
    logits, cache, _ = TextModel(CFG.text, scan_layers=scan_layers).apply(params, ids, positions, valid, cache)
    return logits, cache


_step = jax.jit(_step_fn, static_argnames=("scan_layers",))


@pytest.fixture(scope="module")
def batch():
    """[B, TOTAL] ids, left-padded so every row's prompt ends at column T_PROMPT - 1."""
    rng = np.random.default_rng(1)
    B = len(PROMPT_LENS)
    ids = rng.integers(3, CFG.text.vocab_size, size=(B, TOTAL)).astype(np.int32)
    mask = np.ones((B, TOTAL), np.int32)
    for b, n in enumerate(PROMPT_LENS):
        mask[b, :T_PROMPT - n] = 0
        ids[b, :T_PROMPT - n] = 0
    return ids, mask


def _incremental(params, ids, mask, kv_dtype=None, step=_step, split_experts=False):
    """Logits [B, TOTAL, V] from prefill, a second multi-token piece, then one token at a time.

    The first piece runs the scan; the second piece and the single-token steps run the
    unrolled model on per-group weights and the per-group cache (`split_groups` of the
    scan's), as prefill and decode do on CPU for large weights (`views.unroll_layers`;
    split_experts: with each MoE layer's experts as separate arrays, which the
    multi-token piece runs with `blocked`; "fused": also every gate and up fused, as
    the CPU decode parameters hold them, `views.layer_views`)."""
    if split_experts == "fused":
        unstacked = split_expert_layers(unstack_layers(params), fuse=True)
        layer = unstacked["params"]["layers_0"]
        assert {"gate_up", "down"} == layer["layer_0"]["mlp"].keys() == layer["layer_1"]["moe"]["shared"].keys()
        assert isinstance(layer["layer_1"]["moe"]["gate_up"], ExpertList) and "gate" not in layer["layer_1"]["moe"]
    else:
        unstacked = unstack_layers(params, split_experts=split_experts)
    B = ids.shape[0]
    cache = init_cache(CFG, B, TOTAL + 3, kv_dtype=kv_dtype)  # global layers: room to spare
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    outs = []
    for a, b in [(0, T_PROMPT), (T_PROMPT, T_PROMPT + T_CHUNK)] + [
            (t, t + 1) for t in range(T_PROMPT + T_CHUNK, TOTAL)]:
        scan = a == 0
        logits, cache = step(params if scan else unstacked, ids[:, a:b], pos[:, a:b], mask[:, a:b].astype(bool),
                              cache if scan else split_groups(cache), scan_layers=scan)
        outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("split_experts", [False, True, "fused"])
def test_prefill_then_decode_equals_full_forward(params, batch, split_experts):
    """split_experts: the decode steps' MoE layers hold their experts as an `ExpertList`,
    which `ragged` runs with `blocked` (here top-2 of 3 experts, 3 rows: every
    expert is taken by some row); "fused": with every gate and up fused too."""
    ids, mask = batch
    full = np.asarray(llama4_jax.forward(CFG, params, ids, attention_mask=mask))
    inc, cache = _incremental(params, ids, mask, split_experts=split_experts)
    valid = mask.astype(bool)
    # Same math in a different order (cache slots vs one sequence): fp32 rounding only.
    # Logits are O(10) here; 1e-4 absolute is ~1e-5 relative.
    np.testing.assert_allclose(inc[valid], full[valid], atol=1e-4, rtol=1e-5)
    assert np.abs(full[valid]).max() > 1.0  # the check has teeth: logits are not ~0
    np.testing.assert_array_equal(cache_lengths(CFG, cache), mask.sum(1))


@pytest.mark.parametrize("devices", [None, 1, 2])  # None: one device, no mesh
@pytest.mark.parametrize("split_experts", [False, True])
def test_unstacked_layers_are_views_of_the_stacked_weights(params, devices, split_experts):
    """On CPU `unstack_layers` copies nothing: every per-group (and per-expert) array
    holds the values of its slice, keeps the stacked array's sharding, and where the
    slice starts 64-byte aligned in the stacked buffer (XLA:CPU aliases aligned host
    memory; it copies the others) it is that buffer's memory, on every device."""

    if devices is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, sharding)
    stacked = params["params"]["layers"]
    un = unstack_layers(params, split_experts=split_experts)["params"]
    G = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    aliased = []

    def check(x, src, index):
        assert not isinstance(x, ExpertList)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(src)[index])
        assert x.sharding.is_equivalent_to(sharding, x.ndim)
        size = int(np.prod(src.shape[len(index):])) * src.dtype.itemsize
        offset = int(np.ravel_multi_index(index, src.shape[:len(index)])) * size
        for got, base in zip(x.addressable_shards, src.addressable_shards):
            assert got.device == base.device
            if offset % 64 == 0:
                assert got.data.unsafe_buffer_pointer() == base.data.unsafe_buffer_pointer() + offset
                aliased.append(size)

    def walk(node, src, g):
        if isinstance(node, dict):
            assert node.keys() == src.keys()
            for k in node:
                walk(node[k], src[k], g)
        elif isinstance(node, ExpertList):
            assert split_experts and len(node.parts) == src.shape[1]
            for e, part in enumerate(node.parts):
                check(part, src, (g, e))
        else:
            check(node, src, (g,))

    for g in range(G):
        walk(un[f"layers_{g}"], stacked, g)
    assert ("moe" in str(jax.tree_util.tree_structure(un))) and (
        isinstance(un["layers_0"]["layer_1"]["moe"]["gate"], ExpertList) == split_experts)
    assert sum(aliased) >= 0.9 * sum(x.nbytes for x in jax.tree_util.tree_leaves(stacked)) * (devices or 1)


@pytest.mark.parametrize("devices", [None, 2])  # None: one device, no mesh
def test_layer_views_are_kept_while_the_weights_live(params, devices):
    """`views.layer_views` makes a parameter set's views once: a second call on the
    same arrays returns the same views, other arrays (equal values) get their own, and
    the entry holds views of the buffers, not the parameter arrays, so dropping the
    parameters drops it (a single-device array is its own buffer's shard: viewed
    directly, the entry would keep it alive)."""
    from llama4_jax.model import views

    if devices is None:
        sharding, first = jax.sharding.SingleDeviceSharding(jax.devices()[0]), None
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
        sharding, first = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), jax.devices()[0]
    views.VIEWS.clear()
    p, q = jax.device_put(params, sharding), jax.device_put(params, sharding)
    a, b = views.layer_views(p, True, first), views.layer_views(p, True, first)
    assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert a[0].keys() == unstack_layers(p)["params"].keys() - set(p["params"]) and (a[2] is None) == (first is None)
    c = views.layer_views(q, True, first)
    assert not set(map(id, jax.tree_util.tree_leaves(c))) & set(map(id, jax.tree_util.tree_leaves(a)))
    assert len(views.VIEWS) == 2
    stacked = weakref.ref(jax.tree_util.tree_leaves(p["params"]["layers"])[0])
    del p, a, b
    gc.collect()
    assert stacked() is None and len(views.VIEWS) == 1
    views.VIEWS.clear()


@pytest.mark.parametrize("rows", ["decode", "prefill"])
def test_forward_on_layer_views_equals_the_scan(params, batch, monkeypatch, rows):
    """`forward` on CPU with large weights (the threshold patched to 0) and concrete
    parameters runs the unrolled model on per-group views (with per-expert arrays,
    read by `rowwise`, for at most E routed rows: 1 token x top-2 of 3 experts), not
    the scan, which would copy every layer's weights out of the stacked arrays. Logits
    and hidden states equal the scanned layers' (`jax.jit(forward)`: tracers, so the
    scan) on the left-padded batch, to fp32 summation order."""
    from llama4_jax.model import views

    ids, mask = batch
    ids, mask = (ids[:1, -1:], mask[:1, -1:]) if rows == "decode" else (ids, mask)
    scanned = jax.jit(lambda p, i, m: llama4_jax.forward(CFG, p, i, attention_mask=m, return_hidden_states=True))
    ref_logits, ref_hidden = scanned(params, ids, mask)
    monkeypatch.setattr(views, "_UNROLL_MIN_BYTES", 0)
    views.VIEWS.clear()
    logits, hidden = llama4_jax.forward(CFG, params, ids, attention_mask=mask, return_hidden_states=True)
    assert [key[2] for key in views.VIEWS] == [rows == "decode"]  # views made, per expert for decode
    np.testing.assert_allclose(logits, ref_logits, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(hidden, ref_hidden, atol=2e-6, rtol=1e-6)
    views.VIEWS.clear()


def test_single_row_decode_equals_full_forward(params, batch):
    """Batch 1, where `write_cache` writes each decode token twice to its slot (a scatter
    of one index became a copy of the cache), equals the full forward; and a dropped
    single token (padding) leaves the cache as it was."""
    ids, mask = batch[0][1:2], batch[1][1:2]
    full = np.asarray(llama4_jax.forward(CFG, params, ids, attention_mask=mask))
    inc, cache = _incremental(params, ids, mask)
    np.testing.assert_allclose(inc[0], full[0], atol=1e-4, rtol=1e-5)  # as the batched test
    entry = cache["layer_0"][0]
    entry = {k: x[0] for k, x in entry.items()}  # group 0's [B, ...] arrays
    same = write_cache(entry, jnp.ones((1, 1, 2, 6)), jnp.ones((1, 1, 2, 6)), jnp.full((1, 1), INVALID_POS), ring=True)
    for k in entry:
        np.testing.assert_array_equal(same[k], entry[k])


def test_cache_form_must_match_the_model(params, batch):
    """The scanned model takes the stacked cache, the unrolled one the per-group cache;
    the other form is refused with a message that names the right one."""
    ids, mask = batch
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    args = (ids[:, :2], pos[:, :2], mask[:, :2].astype(bool))
    stacked = init_cache(CFG, ids.shape[0], 8)
    with pytest.raises(ValueError, match="per-group cache"):
        _step_fn(params, *args, split_groups(stacked))
    with pytest.raises(ValueError, match="per-group cache"):
        _step_fn(unstack_layers(params), *args, stacked, scan_layers=False)


def test_decode_in_cache_blocks_equals_one_block(params, batch, monkeypatch):
    """Decode steps reading the cache in blocks of 4 slots (the ring buffers' size: whole
    blocks; the global layers' 27 slots: a last block shifted back over seen slots, and
    blocks past the last occupied slot skipped) give the logits of one block (float: the
    one-pass read of the per-group cache; int8: one block of DEFAULT_BLOCK slots)."""
    for kv in (None, "int8"):
        ref, _ = _incremental(params, ids := batch[0], mask := batch[1], kv_dtype=kv)
        monkeypatch.setattr(cached, "DEFAULT_BLOCK", 4)
        monkeypatch.setattr(cached, "ONE_PASS_MAX_BYTES", 0)  # float caches too
        out, _ = _incremental(params, ids, mask, kv_dtype=kv, step=jax.jit(_step_fn, static_argnames=("scan_layers",)))
        monkeypatch.undo()
        valid = mask.astype(bool)
        np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=1e-5)  # fp32 summation order only


@functools.partial(jax.jit, static_argnames=("scan_layers", "fresh"))
def _prefill_fn(params, ids, positions, valid, cache, scan_layers, fresh):
    logits, cache, _ = TextModel(CFG.text, scan_layers=scan_layers).apply(params, ids, positions, valid, cache,
                                                                        fresh_cache=fresh)
    return logits, cache


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_cache_prefill_equals_reading_the_cache(params, batch, scan):
    """A prefill into an empty cache with fresh_cache (attention over the new keys
    alone) gives the logits of one that reads the cache, and writes the same cache. The
    9-token prompts are longer than the chunked layers' 4-slot ring. With an int8 cache
    the fresh prefill attends the new keys unquantized: its logits are the float
    cache's (the reading path's are not), and it writes the same slots."""
    ids, mask = batch
    T, B = T_PROMPT, ids.shape[0]
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)[:, :T]
    args = (ids[:, :T], pos, mask[:, :T].astype(bool))
    p = params if scan else unstack_layers(params)
    new = {}
    for kv in (None, "int8"):
        cache = init_cache(CFG, B, TOTAL, kv_dtype=kv)
        cache = cache if scan else split_groups(cache)
        for fresh in (False, True):
            new[kv, fresh] = _prefill_fn(p, *args, cache, scan_layers=scan, fresh=fresh)
    valid = mask[:, :T].astype(bool)
    ref = np.asarray(new[None, False][0])[valid]
    assert np.abs(ref).max() > 1.0
    # fp32 summation order only (the skipped keys are empty slots, masked to weight 0);
    # the later layers' keys carry that rounding into the cache (~2e-7 here).
    for kv in (None, "int8"):
        np.testing.assert_allclose(np.asarray(new[kv, True][0])[valid], ref, atol=1e-5, rtol=1e-5)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5),
                           new[None, True][1], new[None, False][1])
    for kv in (None, "int8"):  # the same slots written
        slots = [[x for path, x in jax.tree_util.tree_leaves_with_path(new[kv, f][1])
                  if "pos" in jax.tree_util.keystr(path)] for f in (True, False)]
        assert len(slots[0]) == len(slots[1]) == (len(CFG.text.group_flags) if scan else len(CFG.text.layer_flags))
        jax.tree_util.tree_map(np.testing.assert_array_equal, *slots)
    assert not np.allclose(np.asarray(new["int8", False][0])[valid], ref, atol=1e-5)  # int8 read back: differs
    with pytest.raises(ValueError, match="fresh_cache"):
        TextModel(CFG.text).init(jax.random.key(0), ids[:, :T], pos, valid, fresh_cache=True)


def test_int8_cache_error(params, batch):
    ids, mask = batch
    ref, _ = _incremental(params, ids, mask)
    q8, cache = _incremental(params, ids, mask, kv_dtype="int8")
    entry = cache["layer_0"][0]  # group 0 of the per-group cache the unrolled steps wrote
    assert entry["k"].dtype == jnp.int8 and entry["k_scale"].dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(q8[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    # int8 with per-token, per-head scales: each K/V element is off by <= max|x|/254
    # (0.4%); through 8 layers with O(1) activations that was observed as 9e-3 of the
    # largest logit (deterministic: fixed weights and inputs).
    # Bound 2e-2; and it must not be exact (the cache really is quantised).
    assert 0 < err < 2e-2, err


def test_quantize_kv_bound():
    x = jax.random.normal(jax.random.key(3), (2, 5, 3, 16)) * jnp.arange(1, 6)[None, :, None, None]
    q, scale = quantize_kv(x)
    back = q.astype(jnp.float32) * scale[..., None]
    # round-to-nearest: |x - q * s| <= s / 2 per element (plus fp32 rounding).
    assert bool(jnp.all(jnp.abs(back - x) <= scale[..., None] * (0.5 + 1e-5)))
    q0, s0 = quantize_kv(jnp.zeros((1, 1, 1, 4)))
    assert float(jnp.abs(q0).max()) == 0 and float(s0.max()) == 0


def test_ring_buffer_keeps_last_chunk():
    # layout (llama4_jax.cache): k [B, K, d, S], v [B, K, S, d]; B=2 rows, S=4 slots, K=1, d=2
    entry = {"k": jnp.zeros((2, 1, 2, 4)), "v": jnp.zeros((2, 1, 4, 2)), "pos": jnp.full((2, 4), INVALID_POS)}
    k = jnp.arange(2 * 10 * 2, dtype=jnp.float32).reshape(2, 10, 1, 2)
    pos = jnp.tile(jnp.arange(10), (2, 1))
    pos = pos.at[1, :3].set(INVALID_POS)  # row 1: three padding tokens, then 7 real ones
    out = write_cache(entry, k, -k, pos, ring=True)
    assert sorted(np.asarray(out["pos"][0]).tolist()) == [6, 7, 8, 9]
    assert sorted(np.asarray(out["pos"][1]).tolist()) == [6, 7, 8, 9]
    slot = int(np.nonzero(np.asarray(out["pos"][0]) == 9)[0][0])
    assert slot == 9 % 4
    np.testing.assert_array_equal(out["k"][0, :, :, slot], k[0, 9])
    np.testing.assert_array_equal(out["v"][0, :, slot], -k[0, 9])
    keys, vals = read_cache(out, jnp.float32)  # the backends' [B, S, K, d] layout
    np.testing.assert_array_equal(keys[1, slot], k[1, 9])
    np.testing.assert_array_equal(vals[1, slot], -k[1, 9])


def test_cache_shapes_and_bytes():
    t = CFG.text
    assert cache_slots(CFG, 100) == (4, 4, 4, 100)  # chunked layers keep one chunk only
    assert cache_slots(CFG, 3) == (3, 3, 3, 3)
    tree = abstract_cache(CFG, 5, 100)
    K, d = t.num_key_value_heads, t.head_dim
    assert tree["layer_3"]["k"].shape == (t.num_groups, 5, K, d, 100)  # keys transposed: [K, d, S] per row
    assert tree["layer_3"]["v"].shape == (t.num_groups, 5, K, 100, d)
    assert tree["layer_0"]["pos"].shape == (t.num_groups, 5, 4)
    f32 = cache_bytes(CFG, 5, 100)
    i8 = cache_bytes(CFG, 5, 100, kv_dtype="int8")
    slots = 5 * t.num_groups * (4 * 3 + 100)
    kv = 2 * slots * t.num_key_value_heads * t.head_dim
    assert f32 == kv * 4 + slots * 4
    assert i8 == kv + 2 * slots * t.num_key_value_heads * 4 + slots * 4
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        init_cache(CFG, 1, 8, kv_dtype="int4")


# ---- cached_attention: the decode read, in the cache's own layout ----

def _cache_case(seed, B, S, K, G, d, T, fill, ring_chunk=None, int8=False, groups=None):
    """A cache entry ([G?, B, ...] in the cache layout) with rows of lengths `fill` written by
    `write_cache`, queries at the next T positions, and the same keys/values in the
    backends' layout (via `read_cache`) for the reference."""
    rng = np.random.default_rng(seed)
    n = max(fill) + T
    entry = {"k": jnp.zeros((B, K, d, S)), "v": jnp.zeros((B, K, S, d)), "pos": jnp.full((B, S), INVALID_POS)}
    if int8:
        entry = {**{k: x.astype(jnp.int8) for k, x in entry.items() if k in "kv"}, "pos": entry["pos"],
                 "k_scale": jnp.zeros((B, K, S)), "v_scale": jnp.zeros((B, K, S))}
    kv = jnp.asarray(rng.standard_normal((2, B, n, K, d)), jnp.float32)
    pos = np.tile(np.arange(n, dtype=np.int32), (B, 1))
    for b, f in enumerate(fill):
        pos[b, f:] = INVALID_POS  # row b holds f tokens
    entry = write_cache(entry, kv[0], kv[1], jnp.asarray(pos), ring=ring_chunk is not None)
    q = jnp.asarray(rng.standard_normal((B, T, K * G, d)), jnp.float32)
    q_pos = jnp.asarray(np.array(fill)[:, None] - 1 + np.arange(1, T + 1), jnp.int32)
    keys, vals = read_cache(entry, jnp.float32)
    ref = xla_attention(q, keys, vals, q_pos, entry["pos"], chunk_size=ring_chunk)
    if groups is not None:  # stack the entry as group `groups[0]` of `groups[1]`
        g, ng = groups
        # the other groups hold other values, and positions every query may see
        entry = {k: jnp.stack([x if i == g else (x * 0 + i + 1).astype(x.dtype) for i in range(ng)])
                 if k != "pos" else jnp.stack([x if i == g else jnp.zeros_like(x) for i in range(ng)])
                 for k, x in entry.items()}
    return q, q_pos, entry, ref


@pytest.mark.parametrize("case", [
    dict(B=3, S=37, K=2, G=3, d=6, T=1, fill=(5, 30, 1), block=8),  # ragged rows; last block shifted back
    dict(B=2, S=40, K=1, G=2, d=4, T=1, fill=(3, 9), block=8),  # blocks past slot 9 skipped
    dict(B=2, S=12, K=2, G=2, d=6, T=1, fill=(29, 12), ring_chunk=12, block=5),  # ring buffers, wrapped
    dict(B=2, S=33, K=2, G=3, d=6, T=3, fill=(20, 6), block=8),  # three queries per row
    dict(B=3, S=37, K=2, G=3, d=6, T=1, fill=(5, 30, 1), block=8, int8=True),
    dict(B=2, S=12, K=2, G=2, d=6, T=1, fill=(29, 12), ring_chunk=12, block=5, int8=True),
    dict(B=3, S=37, K=2, G=3, d=6, T=1, fill=(5, 30, 1), block=None),
    dict(B=3, S=37, K=2, G=3, d=6, T=1, fill=(5, 30, 1), block=8, groups=(1, 3)),
    dict(B=3, S=37, K=2, G=3, d=6, T=1, fill=(5, 30, 1), block=None, groups=(2, 3)),
    # The default on a float cache of >= 2 * SPARSE_BLOCK slots: at most half of them
    # occupied, read in blocks (the last shifted back); more, in one pass.
    dict(B=2, S=1100, K=2, G=2, d=8, T=1, fill=(300, 40), block=0),
    dict(B=2, S=1100, K=2, G=2, d=8, T=1, fill=(800, 40), block=0),
    dict(B=2, S=600, K=2, G=2, d=8, T=1, fill=(100, 30), ring_chunk=600, block=0),
    dict(B=2, S=600, K=2, G=2, d=8, T=1, fill=(700, 30), ring_chunk=600, block=0),  # wrapped: whole
])
def test_cached_attention_equals_reference(case):
    """`cached_attention` on the cache layout equals `xla_attention` on the same keys in
    the backends' layout (int8: the dequantized keys), fp32: summation order only."""
    case = dict(case)
    block, groups = case.pop("block"), case.get("groups")
    q, q_pos, entry, ref = _cache_case(0, **case)
    out = cached.cached_attention(q, entry["k"], entry["v"], q_pos, entry["pos"],
                                  chunk_size=case.get("ring_chunk"), k_scale=entry.get("k_scale"),
                                  v_scale=entry.get("v_scale"), block=block,
                                  group=None if groups is None else jnp.int32(groups[0]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)
    assert np.abs(np.asarray(ref)).max() > 0.3  # the check has teeth


def test_half_empty_cache_is_read_in_blocks():
    """By default a float cache of >= 2 * SPARSE_BLOCK slots in its own buffers is read
    in one pass or, while at most half of its slots are occupied, in blocks up to the
    last occupied one: a conditional whose branch loops. Smaller caches: one pass only."""
    def program(S):
        q = jnp.zeros((2, 1, 4, 8))
        k, v = jnp.zeros((2, 2, 8, S)), jnp.zeros((2, 2, S, 8))
        f = lambda q, k, v, kp: cached.cached_attention(q, k, v, jnp.zeros((2, 1), jnp.int32), kp,  # noqa: E731
                                                        chunk_size=None)
        return str(jax.make_jaxpr(f)(q, k, v, jnp.zeros((2, S), jnp.int32)))

    big, small = program(2 * cached.SPARSE_BLOCK), program(2 * cached.SPARSE_BLOCK - 1)
    assert "cond[" in big and "while[" in big
    assert "cond[" not in small and "while[" not in small


def _decode_step(S, *, scan, kv_dtype=None, B=2):
    """The compiled engine decode loop of a cache of S slots (B rows, the CFG model;
    unrolled: per-group weights and cache, as the engine runs it on CPU)."""
    from llama4_jax import engine

    params = llama4_jax.abstract_params(CFG, dtype="float32")
    if not scan:
        params = jax.eval_shape(unstack_layers, params)
    samp = dict(temperature=jnp.zeros(B), top_k=jnp.zeros(B, jnp.int32), top_p=jnp.ones(B), min_p=jnp.zeros(B),
                seed=jnp.zeros(B, jnp.uint32), stop_ids=jnp.zeros((B, 1), jnp.int32))
    cache = abstract_cache(CFG, B, S, kv_dtype=kv_dtype, per_group=not scan)
    state = {"tokens": jax.ShapeDtypeStruct((B, 16), jnp.int32), "logprobs": jax.ShapeDtypeStruct((B, 16), jnp.float32),
             **{k: jax.ShapeDtypeStruct((B,), jnp.int32) for k in ("last", "pos", "step")},
             **{k: jax.ShapeDtypeStruct((B,), jnp.bool_) for k in ("done", "stopped")}, "cache": cache}
    return engine.decode.lower(params, state, samp, jnp.zeros(B, jnp.int32), jnp.int32(1),
                               text=CFG.text, attn_impl="auto", moe_impl="ragged", scan_layers=scan).compile()


def _ride_step(S, *, scan, B=2, piece=4):
    """The compiled engine loop of decode steps with prefill pieces riding along
    (`engine.ride`), lowered like `_decode_step`'s."""
    from llama4_jax import engine

    params = llama4_jax.abstract_params(CFG, dtype="float32")
    if not scan:
        params = jax.eval_shape(unstack_layers, params)
    samp = dict(temperature=jnp.zeros(B), top_k=jnp.zeros(B, jnp.int32), top_p=jnp.ones(B), min_p=jnp.zeros(B),
                seed=jnp.zeros(B, jnp.uint32), stop_ids=jnp.zeros((B, 1), jnp.int32))
    cache = abstract_cache(CFG, B, S, per_group=not scan)
    state = {"tokens": jax.ShapeDtypeStruct((B, 16), jnp.int32), "logprobs": jax.ShapeDtypeStruct((B, 16), jnp.float32),
             **{k: jax.ShapeDtypeStruct((B,), jnp.int32) for k in ("last", "pos", "step")},
             **{k: jax.ShapeDtypeStruct((B,), jnp.bool_) for k in ("done", "stopped")}, "cache": cache}
    prompt = {"ids": jax.ShapeDtypeStruct((1, 64), jnp.int32),
              **{k: jax.ShapeDtypeStruct((1,), jnp.int32) for k in ("length", "row", "cursor")}}
    return engine.ride.lower(params, state, samp, jnp.zeros(B, jnp.int32), jnp.int32(1),
                             prompt, text=CFG.text, attn_impl="auto", moe_impl="ragged", piece=piece,
                             scan_layers=scan).compile()


@pytest.mark.parametrize("scan", [True, False])
def test_ride_step_makes_no_cache_sized_copies(scan):
    """Decode steps with a prefill piece riding along write every new key in place and
    then read: no copy, transpose or slice of one layer's keys/values in the compiled
    loop (reading the piece's row before writing made XLA copy each layer's cache
    twice per step)."""
    t = CFG.text
    copies = cache_copies(_ride_step(4096, scan=scan), 2 * t.num_key_value_heads * t.head_dim * 4096)
    assert not copies, copies


def cache_copies(compiled, slice_elems: int) -> list[str]:
    """Instructions of a compiled program that copy, transpose or slice out an array of at
    least `slice_elems` elements (one layer's keys or values), outside in-place updates."""
    pat = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*\w+\[([\d,]*)\]\{[^}]*\}\s+(copy|transpose|slice|dynamic-slice)\(")
    found = []
    for line in compiled.as_text().splitlines():
        m = pat.match(line)
        if m and np.prod([int(x) for x in m.group(1).split(",") if x]) >= slice_elems:
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("scan,kv_dtype,B", [(True, None, 2), (False, None, 2), (False, "int8", 2), (False, None, 1)])
def test_decode_step_makes_no_cache_sized_copies(scan, kv_dtype, B):
    """The compiled decode loop updates the cache in place and reads it where it lies: no
    copy, transpose or slice of one layer's keys/values (B * K * d * S elements) in its
    HLO, and its temporary memory grows with the cache by per-slot arrays no larger than
    one layer's fp32 logits ([B, H] per slot; the one-pass read of a float per-group
    cache keeps them, with their exponentials) and positions, not by the keys and values
    ([B, 2 K d] per slot). Scanned (stacked weights: blocked read) and unrolled decode,
    float and int8 (blocked read) caches, and batch 1 (a single-row update, which XLA
    rewrote into a copy of the whole cache)."""
    t = CFG.text
    small, big = (_decode_step(S, scan=scan, kv_dtype=kv_dtype, B=B) for S in (1024, 4096))
    copies = cache_copies(big, B * t.num_key_value_heads * t.head_dim * 4096)
    assert not copies, copies
    growth = big.memory_analysis().temp_size_in_bytes - small.memory_analysis().temp_size_in_bytes
    logits_growth = B * t.num_attention_heads * (4096 - 1024) * 4
    # Two logits-sized arrays (the logits and their exponentials) and one of positions.
    assert growth <= 3 * logits_growth, (growth, logits_growth)


def test_cache_copy_detector_has_teeth():
    """The detector flags the read the decode step no longer makes: the cache turned into
    the backends' layout (a transposed copy) and attended with the reference."""
    S, t = 4096, CFG.text
    cache = abstract_cache(CFG, 2, S)["layer_3"]
    q = jax.ShapeDtypeStruct((2, 1, t.num_attention_heads, t.head_dim), jnp.float32)
    old = jax.jit(lambda q, e: xla_attention(q, *read_cache(e, jnp.float32, 0), jnp.zeros((2, 1), jnp.int32),
                                             e["pos"][0])).lower(q, cache).compile()
    assert cache_copies(old, 2 * t.num_key_value_heads * t.head_dim * S)


@pytest.mark.parametrize("scan", [True, False])
def test_piece_riding_a_decode_step_equals_both_alone(params, scan):
    """`TextModel(piece=...)`: a decode step of rows 0 and 1 and two prefill pieces of
    row 2 (positions 0-3, then 4-7: chunk-aligned), each run as one row of tokens,
    equal the decode step alone and the 8-token prompt prefilled alone: logits within
    1e-5 (fp32) and the same cache. Row 2 first holds a stale 12-token prompt, whose
    keys the new one must never see (a riding prompt reuses a finished row as it is)."""
    t = CFG.text
    p = params if scan else unstack_layers(params)
    model = TextModel(t, jnp.float32, "xla", "ragged", scan_layers=scan)
    apply = jax.jit(functools.partial(model.apply, p))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(3, t.vocab_size, (3, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (3, 12))
    mask = jnp.arange(12) < jnp.asarray([[9], [6], [12]])  # rows of 9, 6 and (stale) 12 tokens, right-padded
    cache0 = init_cache(CFG, 3, 24, per_group=not scan)
    _, cache0, _ = apply(ids, pos, mask, cache0)
    new = jnp.asarray(rng.integers(3, t.vocab_size, (1, 8)), jnp.int32)  # row 2's new prompt
    dec_ids = jnp.asarray([[7], [8], [0]], jnp.int32)
    dec_pos, dec_valid = jnp.asarray([[9], [6], [0]]), jnp.asarray([[True], [True], [False]])

    cache = cache0
    for k in range(2):
        piece = {"ids": new[:, 4 * k:4 * k + 4], "positions": jnp.arange(4 * k, 4 * k + 4)[None],
                 "valid": jnp.ones((1, 4), bool), "rows": jnp.asarray([2]), "last": jnp.asarray([3])}
        v = dec_valid if k == 0 else jnp.zeros_like(dec_valid)  # the second piece rides alone
        logits, cache, _ = apply(dec_ids, dec_pos, v, cache, piece=piece)
        assert logits.shape == (4, 1, t.vocab_size)
        if k == 0:
            dec_alone, dec_cache, _ = apply(dec_ids, dec_pos, dec_valid, cache0)
            np.testing.assert_allclose(logits[:2], dec_alone[:2], atol=1e-5)  # row 2: not decoding
    fresh = init_cache(CFG, 1, 24, per_group=not scan)
    alone, alone_cache, _ = apply(new, jnp.arange(8)[None], jnp.ones((1, 8), bool), fresh)
    np.testing.assert_allclose(logits[3], alone[:, -1], atol=1e-5)

    # Rows 0 and 1 hold what the decode step alone wrote; row 2 the new prompt's keys
    # wherever its slots are valid (ring slots: its last chunk).
    for got, want, ref_row in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(dec_cache),
                                  jax.tree_util.tree_leaves(alone_cache)):
        np.testing.assert_allclose(got[:, :2], want[:, :2], atol=1e-5)
    for name in cache:
        entries = cache[name] if not scan else (cache[name],)
        refs = alone_cache[name] if not scan else (alone_cache[name],)
        for e, r in zip(entries, refs):
            S = r["pos"].shape[-1]
            live = np.asarray(r["pos"][:, 0] < INVALID_POS)  # [G, S]: the new prompt's slots
            np.testing.assert_array_equal(np.asarray(e["pos"][:, 2])[live], np.asarray(r["pos"][:, 0])[live])
            k_got = np.moveaxis(np.asarray(e["k"][:, 2]), -1, 1)[live]  # [G, K, d, S] -> slots first
            k_ref = np.moveaxis(np.asarray(r["k"][:, 0]), -1, 1)[live]
            np.testing.assert_allclose(k_got, k_ref, atol=1e-5)
            assert S >= live.shape[-1]


def test_piece_size_divides_the_chunk():
    from llama4_jax import engine

    assert engine.piece_size(CFG.text, 256) == 4  # chunk 4
    assert engine.piece_size(dataclasses.replace(CFG.text, attention_chunk_size=12), 8) == 4
    assert engine.piece_size(dataclasses.replace(CFG.text, no_rope_layers=(0,) * 8), 100) == 100  # no chunked layers
    with pytest.raises(ValueError, match="piece size"):
        engine.piece_size(CFG.text, 0)


def test_piece_needs_a_decode_step_and_a_cache(params):
    model = TextModel(CFG.text, jnp.float32, "xla", "ragged")
    piece = {"ids": jnp.ones((1, 4), jnp.int32), "positions": jnp.arange(4)[None], "valid": jnp.ones((1, 4), bool),
             "rows": jnp.asarray([0]), "last": jnp.asarray([3])}
    ids, pos, valid = jnp.ones((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), bool)
    with pytest.raises(ValueError, match="piece rides along a decode step"):
        model.apply(params, ids, pos, valid, init_cache(CFG, 2, 8), piece=piece)  # two tokens a row
    with pytest.raises(ValueError, match="piece rides along a decode step"):
        model.apply(params, ids[:, :1], pos[:, :1], valid[:, :1], None, piece=piece)  # no cache
