"""MoE strategies: every one equals `dense`; the compiled HLO never re-lays-out an expert weight.

Dimensions are odd (D=21, F=13, E=9) so a transposed weight cannot pass, and no other
array in these tests has an expert weight's element count.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax
from llama4_jax.config import PRESETS, Llama4Config
from llama4_jax.model import moe
from tests.lowering import lower_for_tpu_or_skip

E, D, F = 9, 21, 13
STRATEGIES = ("ragged", "ragged_dot", "blocked", "rowwise", "gmm")  # gmm: megablox, interpret mode here
# fp32 at matmul precision `highest`: the strategies differ from `dense` only in how
# the same products are blocked and summed (dense adds exact zeros for the other
# experts), so differences are a few ulps of O(1) outputs.
ATOL_F32 = 1e-5


def _weights(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    # 1/sqrt(fan_in) scaling keeps every intermediate O(1).
    return {
        "gate": (jax.random.normal(k[0], (E, D, F)) / np.sqrt(D)).astype(dtype),
        "up": (jax.random.normal(k[1], (E, D, F)) / np.sqrt(D)).astype(dtype),
        "down": (jax.random.normal(k[2], (E, F, D)) / np.sqrt(F)).astype(dtype),
    }


def _routed(T, k, seed=1, dtype=jnp.float32):
    """h [T, D] and a real top-k routing of it (router logits from a random router)."""
    kh, kr = jax.random.split(jax.random.key(seed))
    h = jax.random.normal(kh, (T, D)).astype(dtype)
    _, idx, score = moe.route(h, jax.random.normal(kr, (D, E)).astype(dtype), k)
    return h, idx, score


def _forced(T, experts, seed=2):
    """h [T, D] routed top-1 to experts[t % len(experts)] with random sigmoid scores."""
    kh, ks = jax.random.split(jax.random.key(seed))
    h = jax.random.normal(kh, (T, D))
    idx = jnp.asarray([[experts[t % len(experts)]] for t in range(T)], jnp.int32)
    score = jax.nn.sigmoid(jax.random.normal(ks, (T, 1)))
    return h, idx, score


_JIT = {name: jax.jit(moe._MOE_IMPLS[name]) for name in ("dense",) + STRATEGIES}


def _strategies(idx):
    # `rowwise` unrolls one matmul chain per row; it is only ever picked for T*k <= E,
    # so larger inputs would only slow the compile down.
    return tuple(n for n in STRATEGIES if n != "rowwise" or idx.size <= 2 * E)


def _check_all(h, w, idx, score, atol=ATOL_F32):
    ref = np.asarray(_JIT["dense"](h, w, idx, score))
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    for name in _strategies(idx):
        out = np.asarray(_JIT[name](h, w, idx, score))
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out, ref, atol=atol, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def w():
    return _weights()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("T", [1, 4, 37])  # 4: T*k <= E (rowwise); 37: not a multiple of any block size
def test_strategies_equal_dense(w, T, k):
    h, idx, score = _routed(T, k)
    _check_all(h, w, idx, score)


def test_skewed_all_tokens_to_one_expert(w):
    """One group holds every row (several blocks), all other experts are empty."""
    h, idx, score = _forced(37, [7])
    _check_all(h, w, idx, score)


def test_empty_experts(w):
    """Only experts 0, 4 and 8 receive tokens (first, middle, last; the rest are skipped)."""
    h, idx, score = _forced(37, [8, 0, 4])
    _check_all(h, w, idx, score)


@pytest.mark.parametrize("block", [8, 16, 128])
def test_blocked_partial_blocks(w, block):
    """74 routed rows over 9 experts (groups of ~8) in 8-, 16- or 128-row blocks: groups
    end in a partial block that overlaps the next group(s), whose rows must not be
    overwritten (128: every block runs past the last row into the slack).
    (The skewed test above runs one 37-row group through five 8-row blocks.)"""
    h, idx, score = _routed(37, 2, seed=3)
    ref = _JIT["dense"](h, w, idx, score)
    out = jax.jit(lambda *a: moe.blocked_moe(*a, block=block))(h, w, idx, score)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL_F32, rtol=0)


def test_block_ladder():
    assert moe.block_ladder(8) == (8,)
    assert moe.block_ladder(16) == (8, 16)
    assert moe.block_ladder(32) == (8, 16, 24, 32)
    assert moe.block_ladder(128) == tuple(range(16, 129, 16))


@pytest.mark.parametrize("block", [32, 128])
def test_blocked_ladder_rungs(w, block):
    """Groups whose last rows land on every rung of the block ladder (and exactly on a
    rung, one past it, full blocks plus a remainder): the blocked forward pass and its
    gradients (input, every expert weight, scores) equal `dense`'s."""
    groups = {0: 1, 2: 8, 3: 9, 4: 23, 5: 24, 6: 33, 7: 70, 8: 2 * block + 17}  # expert 1 empty
    idx = jnp.asarray(np.random.default_rng(5).permutation([e for e, n in groups.items() for _ in range(n)]),
                      jnp.int32)[:, None]
    h = jax.random.normal(jax.random.key(6), (idx.shape[0], D))
    score = jax.nn.sigmoid(jax.random.normal(jax.random.key(7), idx.shape))
    ref = _JIT["dense"](h, w, idx, score)
    out = jax.jit(lambda *a: moe.blocked_moe(*a, block=block))(h, w, idx, score)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL_F32, rtol=0)
    cot = jax.random.normal(jax.random.key(8), ref.shape)
    grads = {name: jax.jit(jax.grad(lambda h, w, s: jnp.sum(fn(h, w, idx, s) * cot), argnums=(0, 1, 2)))(h, w, score)
             for name, fn in (("dense", moe.dense_moe), ("blocked", lambda *a: moe.blocked_moe(*a, block=block)))}
    for a, b in zip(jax.tree_util.tree_leaves(grads["blocked"]), jax.tree_util.tree_leaves(grads["dense"])):
        np.testing.assert_allclose(a, b, atol=ATOL_F32 * max(1.0, float(jnp.abs(b).max())), rtol=0)


def test_bf16(w):
    """bf16 weights and activations: every strategy is as close to the fp32 reference
    as bf16 `dense` is. Each bf16 rounding is <= 2^-9 relative; the SwiGLU chain rounds
    ~5 times on O(1) values, so errors of a few 1e-2 are expected; the bound is 2x
    the dense error plus one bf16 ulp at the output's scale (2^-8 * max|ref|)."""
    w16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), w)
    h, idx, score = _routed(37, 2, seed=4)
    ref = np.asarray(_JIT["dense"](h, w, idx, score))
    h16, s16 = h.astype(jnp.bfloat16), score.astype(jnp.bfloat16)
    dense_err = np.abs(np.asarray(_JIT["dense"](h16, w16, idx, s16), np.float32) - ref).max()
    assert dense_err < 0.05 * np.abs(ref).max()
    bound = 2 * dense_err + 2**-8 * np.abs(ref).max()
    for name in _strategies(idx):
        out = _JIT[name](h16, w16, idx, s16)
        assert out.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(out, np.float32) - ref).max()
        assert err <= bound, (name, err, bound)


def test_ragged_strategy_choice(w):
    from llama4_jax.kernels import platform as kplatform

    assert moe.ragged_strategy(8, 16, "cpu") == "rowwise"  # decode: weight reads dominate
    assert moe.ragged_strategy(17, 16, "cpu") == "blocked"
    assert moe.ragged_strategy(2048, 16, "cpu") == "blocked"
    for platform in ("gpu", "cuda", "rocm"):
        assert moe.ragged_strategy(8, 16, platform) == "ragged_dot"
        assert moe.ragged_strategy(2048, 16, platform) == "ragged_dot"
    for rows in (8, 2048):  # TPU: megablox for float experts, ragged_dot for quantized ones
        assert moe.ragged_strategy(rows, 16, "tpu") == "gmm"
        assert moe.ragged_strategy(rows, 16, "tpu", quantized=True) == "ragged_dot"
    with kplatform.tracing_for("tpu"):  # the default platform is the traced-for one
        assert moe.ragged_strategy(8, 16) == "gmm"
    # On this (CPU) backend `ragged` is exactly the strategy it names.
    for T in (4, 37):
        h, idx, score = _routed(T, 1)
        picked = moe.ragged_strategy(T, E)
        np.testing.assert_array_equal(np.asarray(_JIT["ragged"](h, w, idx, score)),
                                      np.asarray(_JIT[picked](h, w, idx, score)))


def test_gmm_several_row_tiles_and_gradients(w):
    """megablox `gmm` (interpret mode) over 200 routed rows: two 128-row tiles, groups that
    straddle a tile boundary, 56 padding rows in the last group. Forward and the
    gradients w.r.t. the input, every expert weight and the scores equal `dense`'s."""
    h, idx, score = _routed(100, 2, seed=11)
    ct = jax.random.normal(jax.random.key(12), (100, D))
    grads = {}
    for name in ("dense", "gmm"):
        f = lambda h, w, s, name=name: jnp.sum(moe._MOE_IMPLS[name](h, w, idx, s) * ct)  # noqa: E731
        grads[name] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, score)
    (v_ref, g_ref), (v, g) = grads["dense"], grads["gmm"]
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=ATOL_F32 * max(1.0, float(jnp.abs(b).max())), rtol=0)


def test_gmm_takes_float_experts_only(w):
    """`gmm` refuses quantized experts (megablox takes bf16/fp32); `ragged` on a TPU
    sends those to `ragged_dot` instead, which equals `dense` on the same quantized weights."""
    from llama4_jax import quant
    from llama4_jax.kernels import platform

    wq = {n: quant.quantize(a, "int8", n_out=1) for n, a in w.items()}
    h, idx, score = _routed(8, 1)
    with pytest.raises(ValueError, match="moe_impl='gmm' takes float"):
        moe.gmm_moe(h, wq, idx, score)
    with platform.tracing_for("tpu"):
        out = jax.jit(moe.ragged_moe)(h, wq, idx, score)  # ragged_dot (no Pallas kernel is traced)
    np.testing.assert_allclose(out, moe.dense_moe(h, wq, idx, score), atol=ATOL_F32, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_gmm_lowers_for_tpu(k):
    """`ragged` traced as for a TPU is megablox `gmm` compiled (not interpreted) and lowers
    for `tpu` on this CPU host, forward and gradient, in bf16 at Scout-like widths. Mosaic's
    own compile of the kernel needs a TPU and is not checked here."""
    S = jax.ShapeDtypeStruct
    E_, D_, F_ = 16, 512, 1024
    w = {"gate": S((E_, D_, F_), jnp.bfloat16), "up": S((E_, D_, F_), jnp.bfloat16),
         "down": S((E_, F_, D_), jnp.bfloat16)}
    args = (S((64, D_), jnp.bfloat16), w, S((64, k), jnp.int32), S((64, k), jnp.bfloat16))
    grad = jax.grad(lambda h, w, i, s: moe.ragged_moe(h, w, i, s).astype(jnp.float32).sum(), argnums=(0, 1, 3))
    for fn in (moe.ragged_moe, grad):
        exp = lower_for_tpu_or_skip(fn, *args)
        module = exp.mlir_module()
        assert exp.platforms == ("tpu",) and "tpu_custom_call" in module and "gmm_experts" in module


def test_rowwise_refuses_huge_inputs(w):
    n = moe.ROWWISE_MAX_ROWS + 1
    h, idx = jnp.zeros((n, D)), jnp.zeros((n, 1), jnp.int32)
    with pytest.raises(ValueError, match=f"T\\*k = {n}\\*1 = {n}"):
        moe.rowwise_moe(h, w, idx, jnp.ones((n, 1)))


def test_block_rows():
    assert moe.block_rows(8, 16) == 8
    assert moe.block_rows(200, 16) == 16  # mean 13 -> 16
    assert moe.block_rows(1008, 16) == 32  # mean 63: capped
    assert moe.block_rows(1024, 16) == 128  # mean 64: one block of 128
    assert moe.block_rows(8192, 16) == 128
    for n in range(1, 3000, 37):
        b = moe.block_rows(n, 16)
        assert b in ((8, 16, 32) if n <= 63 * 16 else (128,))


# ---- compiled HLO: expert weights are read in place, never transposed or re-laid-out ----

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(\w+)\[([\d,]*)\]\{([\d,]*)[^}]*\}\s+([\w-]+)\(")


def _instructions(hlo: str):
    """(dims tuple, layout tuple, opcode) of every array-valued instruction."""
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            dims = tuple(int(x) for x in m.group(2).split(",") if x)
            layout = tuple(int(x) for x in m.group(3).split(",") if x)
            out.append((dims, layout, m.group(4)))
    return out


def weight_layout_problems(hlo: str, per_layer_copy_ok: bool = True):
    """Instructions that transpose, copy or re-lay-out an expert weight (or slice of one).

    Expert-weight-sized arrays are those with D*F or E*D*F elements (unique to
    expert weights with these odd dimensions). Flags `transpose`/`copy` of them, any
    non-row-major layout, and (per_layer_copy_ok=False) any instruction other than a
    parameter/get-tuple-element/bitcast that yields a whole [E, ...] expert tensor,
    i.e. a copy of every expert's weights when only the chosen ones are needed.
    """
    problems = []
    for dims, layout, op in _instructions(hlo):
        n = int(np.prod(dims)) if dims else 1
        if n not in (D * F, E * D * F):
            continue
        rank = len(dims)
        if op in ("transpose", "copy"):
            problems.append(f"{op} of {dims}")
        if layout and layout != tuple(range(rank - 1, -1, -1)):
            problems.append(f"{op} {dims} in layout {layout}")
        whole = n == E * D * F and dims[0] == E
        if whole and not per_layer_copy_ok and op not in ("parameter", "get-tuple-element", "bitcast"):
            problems.append(f"{op} materialises all experts {dims}")
    return problems


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_hlo_checker_catches_a_relayout(w):
    """The detector must flag a transposed weight and a per-layer copy of all experts."""
    hlo = _hlo(lambda w: jnp.swapaxes(w["gate"], 1, 2) * 2.0, w)
    assert weight_layout_problems(hlo), "a transposed [E, F, D] weight went unnoticed"
    # blocked inside a scan over stacked layers: the scan slices the layer's whole
    # [E, D, F] to feed the while loop (this is why decode uses `rowwise`).
    h, idx, score = _routed(8, 1)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), w)
    scan = lambda ws: jax.lax.scan(lambda c, wl: (c + moe.blocked_moe(h, wl, idx, score), None),
                                   jnp.zeros_like(h), ws)[0]
    assert weight_layout_problems(_hlo(scan, stacked), per_layer_copy_ok=False)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("T,k", [(1, 1), (4, 2), (37, 1), (23, 2)])
def test_ragged_on_expert_list(w, T, k, quantize, fused):
    """`ragged` on `ExpertList` weights, equal to `dense` on the stacked weights (float:
    ATOL_F32; int8: the same quantized weights both ways): `rowwise` for T*k <= E
    rows; `blocked` for more (a prefill on the decode parameters). Neither makes an
    expert-sized array other than the parameters in its compiled HLO: each taken
    branch reads its expert's buffers in place, nothing is sliced or copied out.
    fused: gate and up held as one [E, D, 2F] weight (`up` None), as the CPU decode
    parameters hold them (`layers.fuse_gate_up`)."""
    from llama4_jax import quant
    from llama4_jax.model.layers import fuse_gate_up

    h, idx, score = _routed(T, k)
    ws = w if quantize is None else {n: quant.quantize(w[n], quantize, n_in=1) for n in w}
    ref = np.asarray(moe.dense_moe(h, ws, idx, score))
    split = {n: moe.ExpertList.split(ws[n]) for n in ws}
    assert split["gate"].shape == (E, D, F)
    if fused:
        split = {"gate": moe.ExpertList.split(fuse_gate_up(ws["gate"], ws["up"])), "up": None, "down": split["down"]}
        assert split["gate"].shape == (E, D, 2 * F)
    out = np.asarray(jax.jit(moe.ragged_moe)(h, split, idx, score))
    np.testing.assert_allclose(out, ref, atol=ATOL_F32, rtol=0)
    if quantize is None:
        def made(fn, ws):
            return [(dims, op) for dims, _, op in _instructions(_hlo(fn, h, ws, idx, score))
                    if int(np.prod(dims or [1])) in (D * F, 2 * D * F)  # an expert's weight, or its gate_up
                    and op not in ("parameter", "get-tuple-element", "bitcast")]

        found = made(moe.ragged_moe, split)
        assert not found, found
        strategy = moe.rowwise_moe if T * k <= E else moe.blocked_moe
        assert made(strategy, w), "the check has teeth: stacked weights are sliced out"


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "fp8"])
def test_swiglu_on_fused_gate_up(quantize):
    """`swiglu` on `fuse_gate_up(gate, up)` equals it on gate and up (the same float or
    quantized weights both ways: the fused weight's columns are theirs, so only the
    products' summation may differ, by a few ulps)."""
    from llama4_jax import quant
    from llama4_jax.model.layers import fuse_gate_up, swiglu

    gate, up, down = (_weights()[n][0] for n in ("gate", "up", "down"))
    if quantize:
        gate, up, down = (quant.quantize(x, quantize, n_in=1) for x in (gate, up, down))
    fused = fuse_gate_up(gate, up)
    assert fused.shape == (D, 2 * F) and type(fused) is type(gate)
    h = _routed(5, 1)[0]
    ref = np.asarray(swiglu(h, gate, up, down))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(swiglu(h, fused, None, down)), ref, atol=ATOL_F32, rtol=0)


def test_stacked_gate_up_refused():
    """A stacked [E, D, 2F] gate_up (only the per-expert `ExpertList` form is made, by
    `views.split_expert_layers(fuse=True)`) gets a clear error, not a strategy's crash."""
    from llama4_jax.model.layers import fuse_gate_up

    t = PRESETS["tiny"].text
    module = moe.MoE(t, jnp.float32, impl="ragged")
    params = module.init(jax.random.key(0), jnp.zeros((1, 2, t.hidden_size)))
    inner = {n: v.unbox() if hasattr(v, "unbox") else v for n, v in params["params"].items()}
    inner["gate_up"] = fuse_gate_up(inner.pop("gate"), inner.pop("up"))
    with pytest.raises(ValueError, match="gate_up is taken per expert only"):
        module.apply({"params": inner}, jnp.zeros((1, 2, t.hidden_size)))
    inner["gate_up"] = moe.ExpertList.split(inner["gate_up"])
    inner["down"] = moe.ExpertList.split(inner["down"])
    assert module.apply({"params": inner}, jnp.zeros((1, 2, t.hidden_size))).shape == (1, 2, t.hidden_size)


def test_expert_list_refused_by_stacked_strategies():
    t = PRESETS["tiny"].text
    module = moe.MoE(t, jnp.float32, impl="dense")
    params = module.init(jax.random.key(0), jnp.zeros((1, 2, t.hidden_size)))
    inner = dict(params["params"])
    for n in ("gate", "up", "down"):
        inner[n] = moe.ExpertList.split(inner[n].unbox() if hasattr(inner[n], "unbox") else inner[n])
    with pytest.raises(ValueError, match="ExpertList"):
        module.apply({"params": inner}, jnp.zeros((1, 2, t.hidden_size)))


@pytest.mark.parametrize("name,T", [("blocked", 37), ("rowwise", 8), ("dense", 8)])
def test_hlo_no_weight_relayout(w, name, T):
    h, idx, score = _routed(T, 1)
    problems = weight_layout_problems(_hlo(moe._MOE_IMPLS[name], h, w, idx, score))
    assert not problems, problems


@pytest.fixture(scope="module")
def scanned_model():
    """8 layers, all MoE, scanned in 2 groups of 4; E=9 experts of (D, F) = (21, 13)."""
    t = dataclasses.replace(
        PRESETS["tiny"].text, hidden_size=D, intermediate_size=F, intermediate_size_mlp=17,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, num_local_experts=E,
        moe_layers=tuple(range(8)), vocab_size=101,
    )
    config = Llama4Config(text=t)
    assert t.num_groups == 2
    # Random parameters from the abstract tree (cheaper than compiling `init`); norms
    # near 1, matrices scaled by 1/sqrt(fan_in) so activations stay O(1).
    shapes = llama4_jax.abstract_params(config, dtype="float32")
    rng = np.random.default_rng(5)

    def draw(path, s):
        if len(s.shape) <= 2 and "scale" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 1), jnp.float32)

    return config, jax.tree_util.tree_map_with_path(draw, shapes)


def test_decode_step_reads_only_chosen_experts(scanned_model):
    """A decode-sized forward (8 rows of 1 token, top-1 of 9 experts) of the scanned model:
    `ragged` picks `rowwise`, whose expert slices come straight from the stacked
    [G, E, D, F] parameter; no layer's whole expert tensor is copied or re-laid-out
    (the failure mode where XLA re-lays-out every expert weight every step). Its
    logits equal `dense` (fp32, ATOL_F32 scaled by the logit size)."""
    config, params = scanned_model
    ids = jnp.arange(8, dtype=jnp.int32)[:, None] * 11 % 101
    assert moe.ragged_strategy(8, E) == "rowwise"
    compiled = jax.jit(lambda p, i: llama4_jax.forward(config, p, i, moe_impl="ragged")).lower(params, ids).compile()
    problems = weight_layout_problems(compiled.as_text(), per_layer_copy_ok=False)
    assert not problems, problems
    ref = np.asarray(llama4_jax.forward(config, params, ids, moe_impl="dense"))
    out = np.asarray(compiled(params, ids))
    np.testing.assert_allclose(out, ref, atol=ATOL_F32 * np.abs(ref).max(), rtol=0)
