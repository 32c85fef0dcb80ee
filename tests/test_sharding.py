"""Meshes, rules, sharded forward and the expert-parallel MoE on 8 fake CPU devices.

Tolerances: everything runs in fp32 with HIGHEST matmul precision, so a sharded run
differs from the single-device one only in summation order (tensor-parallel partial
sums, per-device blocks, expert outputs summed in another order). On the 12-layer
models below (residual stream ~5-15, logits up to ~4) that is measured at <= 6e-6,
the same size as `ragged` vs `dense` on one device (3e-6); ATOL = 5e-5 keeps an 8x
margin and is still far below a misrouted token or a wrong mask (>= 1e-2). The MoE
layer alone (no depth to accumulate through) is compared at 1e-5.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama4_jax import sharding
from llama4_jax.config import Llama4Config, preset
from llama4_jax.model.moe import dense_moe
from llama4_jax.model.moe_ep import ep_moe
from llama4_jax.model.text import abstract_params, forward
from tests.hf_models import TEXT
from tests.lowering import lower_for_tpu_or_skip

ATOL = 5e-5  # whole model, see the module docstring
MOE_ATOL = 1e-5  # one MoE layer, O(1) values

# The parity configs of tests/hf_models.py with 8 or 16 experts, and a model width
# that 8 divides (so fsdp=8 really splits); heads, vocab and FFN widths stay odd or
# prime, so the rules' fallback for non-dividing dimensions is exercised too.
CONFIGS = {
    "scout16": Llama4Config(text=dataclasses.replace(TEXT["scout_like"], num_local_experts=16, hidden_size=64)),
    "maverick8": Llama4Config(text=dataclasses.replace(TEXT["maverick_like"], num_local_experts=8, hidden_size=48)),
}
MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2", "fsdp=8"]


def random_params(cfg, seed):
    """fp32 parameters drawn in numpy from the abstract tree (no init compile), scaled
    as tests/hf_models.randomize_ does: matrices N(0, 1/fan_in) over their input
    dimensions, so activations stay O(1) through the layers; norm scales near 1."""
    rng = np.random.RandomState(seed)

    def draw(path, box):
        names, shape = box.names, box.value.shape
        key = getattr(path[-1], "key", None)
        if key == "scale":
            return (1.0 + 0.2 * rng.randn(*shape)).astype(np.float32)
        dims = [n for n, s in zip(names, shape) if n not in ("layers", "expert")]
        sizes = [s for n, s in zip(names, shape) if n not in ("layers", "expert")]
        if key == "embed":  # the embedding table [V, D]: as HF, N(0, 1/D)
            fan_in = sizes[-1]
        elif dims[-1] == "embed":  # output projections (o, down): every other dim is an input
            fan_in = int(np.prod(sizes[:-1]))
        else:  # q, k, v, gate, up, router, lm_head: the embed dim is the input
            fan_in = sizes[0]
        return (rng.randn(*shape) / np.sqrt(fan_in)).astype(np.float32)

    boxed = abstract_params(cfg, dtype="float32", boxed=True)
    return jax.tree_util.tree_map_with_path(draw, boxed, is_leaf=lambda x: hasattr(x, "names"))


@pytest.fixture(scope="session")
def models():
    """{name: (config, params, ids, mask, single-device logits)}."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        params = random_params(cfg, i)
        rng = np.random.RandomState(i)
        ids = rng.randint(3, cfg.text.vocab_size, (4, 24))
        mask = np.ones_like(ids)
        mask[1, :5] = 0  # one left-padded row: positions, chunks and temperature follow it
        out[name] = (cfg, params, ids, mask, np.asarray(forward(cfg, params, ids, attention_mask=mask)))
    return out


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_equals_single_device(models, spec):
    name = "scout16"
    cfg, params, ids, mask, ref = models[name]
    mesh = sharding.make_mesh(spec)
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh, dtype="float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default mesh path itself must not warn
        logits = forward(cfg, placed, ids, attention_mask=mask, mesh=mesh)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL, rtol=0)
    if "expert" in spec:  # the default MoE on an expert axis is the expert-parallel one
        assert sharding.splits_experts(mesh, None, cfg.text)


def test_explicit_mesh_from_jax_make_mesh(models):
    """`jax.make_mesh` gives Explicit axes in recent jax; forward must accept them.
    (Maverick-like: top-2 over 8 experts, dense layers between MoE layers, 1 KV head.)"""
    cfg, params, ids, mask, ref = models["maverick8"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh, dtype="float32"))
    logits = forward(cfg, placed, ids, attention_mask=mask, mesh=mesh)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL, rtol=0)
    assert logits.sharding.spec[0] == ("data", "expert")  # batch stays split on the way out


def test_sharded_prefill_then_decode_equals_full_forward(models):
    """Prefill 20 tokens into a sharded KV cache (ring buffers of 8 slots on the chunked
    layers, so the prefill overflows them), then decode 4 tokens one at a time with the
    expert-parallel MoE on 4 tokens over 8 shards: every logit equals the single-device
    full forward at the same position."""
    from llama4_jax.cache import init_cache
    from llama4_jax.model.text import TextModel, positions_from_mask

    cfg, params, ids, mask, ref = models["scout16"]
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    rules = sharding.default_rules(mesh)
    model = TextModel(cfg.text, jnp.float32, "xla", "ep")
    n_prefill = 20

    def run(params, ids, mask, cache):
        with sharding.activate(mesh, rules):
            pos, valid = positions_from_mask(mask)
            head = slice(0, n_prefill)
            logits, cache, _ = model.apply(params, ids[:, head], pos[:, head], valid[:, head], cache)

            def step(cache, tok_pos):
                tok, p = tok_pos
                lg, cache, _ = model.apply(params, tok[:, None], p[:, None], jnp.ones_like(tok, bool)[:, None], cache)
                return cache, lg[:, 0]

            _, decoded = jax.lax.scan(step, cache, (ids[:, n_prefill:].T, pos[:, n_prefill:].T))
        return jnp.concatenate([logits, decoded.transpose(1, 0, 2)], axis=1)

    cache = init_cache(cfg, ids.shape[0], ids.shape[1], dtype="float32")
    cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh, rules))
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh, rules, dtype="float32"))
    out = np.asarray(jax.jit(run)(placed, jnp.asarray(ids), jnp.asarray(mask), cache))
    real = mask.astype(bool)  # padding queries are not compared (no token to predict from)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_fsdp_rules_split_every_weight():
    """The FSDP rule set splits every weight with an embed dimension over all 8 devices.
    (Its forward is the fsdp=8 case above: default rules on an fsdp axis are FSDP.)"""
    cfg = CONFIGS["scout16"]
    mesh = sharding.abstract_mesh("data=2,expert=2,tensor=2")
    rules = sharding.fsdp_rules(mesh)
    layer = sharding.param_shardings(cfg, mesh, rules, dtype="float32")["params"]["layers"]["layer_0"]
    assert layer["moe"]["gate"].spec == P(None, None, ("data", "expert", "tensor"))
    assert layer["attn"]["o"].spec == P(None, None, None, ("data", "expert", "tensor"))
    assert layer["attn_norm"]["scale"].spec == P()


# --------------------------------------------------------------------------------------
# Expert parallelism against the dense reference
# --------------------------------------------------------------------------------------

def _experts(E, D, F, seed=0):
    rng = np.random.RandomState(seed)
    return {"gate": rng.randn(E, D, F).astype(np.float32) / np.sqrt(D),
            "up": rng.randn(E, D, F).astype(np.float32) / np.sqrt(D),
            "down": rng.randn(E, F, D).astype(np.float32) / np.sqrt(F)}


def _routing(kind, T, E, k, rng):
    if kind == "random":
        idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    elif kind == "one_expert":  # every token on the same expert(s): one device gets all rows
        idx = np.tile(np.arange(E - k, E), (T, 1))
    elif kind == "empty_experts":  # only experts 1 and 6 are used; the rest, and some devices, get nothing
        idx = np.stack([rng.permutation([1, 6])[:k] for _ in range(T)])
    return idx.astype(np.int32)


_EP_JIT = {}


def _run_ep(mesh, h, w, idx, score):
    rules = sharding.default_rules(mesh)
    wspec = {"gate": P("expert", None, "tensor"), "up": P("expert", None, "tensor"), "down": P("expert", "tensor")}
    if "tensor" not in mesh.axis_names:
        wspec = {k: P("expert") for k in wspec}
    w = {k: jax.device_put(v, NamedSharding(mesh, wspec[k])) for k, v in w.items()}
    key = (mesh, rules)
    if key not in _EP_JIT:
        def run(h, w, idx, score):
            with sharding.activate(mesh, rules):
                return ep_moe(h, w, idx, score)
        _EP_JIT[key] = jax.jit(run)
    return np.asarray(_EP_JIT[key](h, w, idx, score))


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_ep_equals_dense(spec):
    E, D, F, T = 8, 16, 12, 13  # T = 13 tokens: not a multiple of the 8 token shards (padding path)
    mesh = sharding.make_mesh(spec)
    rng = np.random.RandomState(1)
    h = rng.randn(T, D).astype(np.float32)
    w = _experts(E, D, F)
    for kind, k in [("random", 2), ("one_expert", 1), ("one_expert", 2), ("empty_experts", 2)]:
        idx = _routing(kind, T, E, k, rng)
        score = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
        ref = np.asarray(dense_moe(h, w, idx, score))
        out = _run_ep(mesh, h, w, idx, score)
        np.testing.assert_allclose(out, ref, atol=MOE_ATOL, rtol=0, err_msg=f"{kind} top-{k}")


def test_ep_128_experts_top1():
    """Maverick's expert count over 8 devices: 16 local experts each."""
    E, D, F, T = 128, 8, 6, 40
    rng = np.random.RandomState(2)
    h = rng.randn(T, D).astype(np.float32)
    w = _experts(E, D, F, seed=3)
    idx = rng.randint(0, E, (T, 1)).astype(np.int32)
    score = rng.uniform(0.1, 1.0, (T, 1)).astype(np.float32)
    out = _run_ep(sharding.make_mesh("expert=8"), h, w, idx, score)
    np.testing.assert_allclose(out, np.asarray(dense_moe(h, w, idx, score)), atol=MOE_ATOL, rtol=0)


def test_ep_refuses_experts_that_do_not_divide():
    mesh = sharding.make_mesh("expert=4,tensor=2")
    w = _experts(6, 8, 4)
    h = np.zeros((8, 8), np.float32)
    idx = np.zeros((8, 1), np.int32)
    with sharding.activate(mesh):
        with pytest.raises(ValueError, match=r"num_local_experts=6 does not divide evenly .*size 4"):
            jax.eval_shape(ep_moe, h, w, idx, idx.astype(np.float32))


def test_ep_needs_a_mesh():
    w = _experts(8, 8, 4)
    idx = np.zeros((8, 1), np.int32)
    with pytest.raises(ValueError, match="needs a device mesh"):
        jax.eval_shape(ep_moe, np.zeros((8, 8), np.float32), w, idx, idx.astype(np.float32))


# ---- the ragged all-to-all variant of `ep` (GPU/TPU; its layout and a gather-based
# ---- stand-in for the collective run here, the real collective only lowers) -----------


def _simulate_ragged_all_to_all(operands, outputs, args):
    """jax.lax.ragged_all_to_all's documented semantics, in numpy, over n devices:
    args[i] = (input_offsets, send_sizes, output_offsets, recv_sizes) of device i, one
    slice per destination; slice j of device i lands at output_offsets[j] on device j."""
    outs = [o.copy() for o in outputs]
    n = len(operands)
    for i in range(n):
        io, ss, oo, _ = (np.asarray(a) for a in args[i])
        for j in range(n):
            outs[j][oo[j]:oo[j] + ss[j]] = operands[i][io[j]:io[j] + ss[j]]
    return outs


@pytest.mark.parametrize("n,E,R,kind", [(8, 16, 10, "random"), (4, 4, 7, "random"), (8, 8, 6, "one_expert"),
                                        (4, 8, 9, "empty_experts")])
def test_ragged_layout_matches_all_to_all(n, E, R, kind):
    """`moe_ep.ragged_layout` against the dense all-to-all layout, for every device: the
    ragged dispatch delivers exactly the rows the dense one does (device i's rows for
    device j, in the sender's expert order), packed by source; its sizes obey
    ragged_all_to_all's contract (send_sizes == all_to_all(recv_sizes)) and its receive
    offsets are all_to_all(output_offsets); every slot's local expert is right; the
    combine arguments return every row to the slot it left from."""
    from llama4_jax.model.moe_ep import ragged_layout

    rng = np.random.RandomState(n * E + R)
    E_l = E // n
    experts = []  # each device's routed rows, sorted by expert (as `_route` sorts them)
    for i in range(n):
        if kind == "random":
            e = rng.randint(0, E, R)
        elif kind == "one_expert":
            e = np.full(R, E - 1)  # every row of every device on the last device
        else:
            e = rng.choice([1, 6], R)  # devices holding no used expert receive nothing
        experts.append(np.sort(e))
    counts = np.stack([np.bincount(e, minlength=E) for e in experts]).astype(np.int32)
    lays = [ragged_layout(jnp.asarray(counts), i, R) for i in range(n)]
    ids = [np.stack([np.full(R, i), np.arange(R)], axis=1) for i in range(n)]  # row r of device i: (i, r)
    empty = np.full((n * R, 2), -1)
    recv = _simulate_ragged_all_to_all(
        ids, [empty] * n, [(l.input_offsets, l.send_sizes, l.output_offsets, l.recv_sizes) for l in lays])
    for j in range(n):
        lay = lays[j]
        # The dense layout: block i of device j holds device i's rows with dest j, in order.
        dense = np.concatenate([ids[i][experts[i] // E_l == j] for i in range(n)])
        m = len(dense)
        np.testing.assert_array_equal(recv[j][:m], dense)
        assert np.all(recv[j][m:] == -1)
        np.testing.assert_array_equal(np.asarray(lay.recv_valid), np.arange(n * R) < m)
        src_expert = np.asarray([experts[i][r] for i, r in dense])
        np.testing.assert_array_equal(np.asarray(lay.recv_expert)[:m], src_expert % E_l)
        for i in range(n):
            assert int(lays[i].send_sizes[j]) == int(lay.recv_sizes[i])  # the collective's contract
            assert int(lays[i].output_offsets[j]) == int(lay.recv_offsets[i])  # all_to_all(output_offsets)
    back = _simulate_ragged_all_to_all(
        recv, [np.full((R, 2), -1)] * n, [(l.recv_offsets, l.recv_sizes, l.return_offsets, l.send_sizes) for l in lays])
    for i in range(n):
        np.testing.assert_array_equal(back[i], ids[i])


def test_ragged_all_to_all_by_gather_follows_the_documented_example():
    """The gather-based stand-in reproduces jax.lax.ragged_all_to_all's docstring example
    (an axis of size 2)."""
    from llama4_jax.model.moe_ep import ragged_all_to_all_by_gather

    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    operand = np.array([[1, 2, 2], [3, 4, 0]], np.float32)
    meta = np.array([[[0, 1], [1, 2], [0, 0], [1, 1]],  # input_offsets, send_sizes, output_offsets, recv_sizes
                     [[0, 1], [1, 1], [1, 2], [2, 1]]], np.int32)

    def body(op, m):
        out = ragged_all_to_all_by_gather(op[0], jnp.zeros(4, op.dtype), *m[0], axis_name="x")
        return out[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
    np.testing.assert_array_equal(np.asarray(f(operand, meta)), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ep_collective_choice():
    from llama4_jax.kernels import platform
    from llama4_jax.model.moe_ep import ep_collective

    assert ep_collective("cpu") == "all_to_all"  # XLA:CPU has no ragged all-to-all
    for p in ("gpu", "cuda", "rocm", "tpu"):
        assert ep_collective(p) == "ragged_all_to_all"
    assert ep_collective() == "all_to_all"  # this host
    with platform.tracing_for("cuda"):
        assert ep_collective() == "ragged_all_to_all"


def _ep_fn(mesh, collective, local=None):
    from llama4_jax.model.moe import ragged_moe

    def run(h, w, idx, score):
        with sharding.activate(mesh):
            return ep_moe(h, w, idx, score, collective=collective, local=local or ragged_moe)
    return run


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_ep_ragged_layout_equals_dense(spec):
    """The ragged variant end to end on CPU (`ragged_layout`'s offsets with the gather-based
    stand-in for the collective) equals `dense` and the all-to-all variant, for random,
    skewed and empty-expert routings."""
    E, D, F, T = 8, 16, 12, 13
    mesh = sharding.make_mesh(spec)
    rng = np.random.RandomState(4)
    h = rng.randn(T, D).astype(np.float32)
    w = _experts(E, D, F, seed=5)
    ragged, dense_a2a = jax.jit(_ep_fn(mesh, "ragged_all_gather")), jax.jit(_ep_fn(mesh, "all_to_all"))
    for kind, k in [("random", 2), ("one_expert", 1), ("one_expert", 2), ("empty_experts", 2)]:
        idx = _routing(kind, T, E, k, rng)
        score = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
        ref = np.asarray(dense_moe(h, w, idx, score))
        out = np.asarray(ragged(h, w, idx, score))
        np.testing.assert_allclose(out, ref, atol=MOE_ATOL, rtol=0, err_msg=f"{kind} top-{k}")
        np.testing.assert_allclose(out, np.asarray(dense_a2a(h, w, idx, score)), atol=MOE_ATOL, rtol=0)


def test_ep_ragged_layout_gradients():
    """Gradients through the ragged variant (w.r.t. the input, every expert weight and the
    scores) equal `dense`'s, tensor-parallel partial sums included."""
    E, D, F, T, k = 8, 16, 12, 13, 2
    mesh = sharding.make_mesh("expert=4,tensor=2")
    rng = np.random.RandomState(6)
    h = rng.randn(T, D).astype(np.float32)
    w = _experts(E, D, F, seed=7)
    idx = _routing("random", T, E, k, rng)
    score = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    ct = rng.randn(T, D).astype(np.float32)
    ep = _ep_fn(mesh, "ragged_all_gather")
    grad = lambda f: jax.grad(lambda h, w, s: jnp.sum(f(h, w, idx, s) * ct), argnums=(0, 1, 2))  # noqa: E731
    out = jax.jit(grad(ep))(h, w, score)
    ref = grad(dense_moe)(h, w, score)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, atol=4 * MOE_ATOL, rtol=0)


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2"])
def test_ep_ragged_all_to_all_lowers_for_gpu_and_tpu(spec):
    """The variant GPUs and TPUs run (`jax.lax.ragged_all_to_all`, which XLA:CPU cannot
    execute) lowers with `jax.export` on this host's 8 CPU devices: for `cuda` with
    `ragged_dot` as the local experts, for `tpu` with megablox `gmm` (abstract TPU mesh
    of the same axes), forward and gradient. The forward holds no dense all-to-all."""
    from jax import export

    from llama4_jax.kernels import platform
    from llama4_jax.model.moe import ragged_dot_moe

    S = jax.ShapeDtypeStruct
    E, D, F, T, k = 8, 128, 256, 32, 2
    w = {"gate": S((E, D, F), jnp.bfloat16), "up": S((E, D, F), jnp.bfloat16), "down": S((E, F, D), jnp.bfloat16)}
    args = (S((T, D), jnp.bfloat16), w, S((T, k), jnp.int32), S((T, k), jnp.bfloat16))
    mesh = sharding.make_mesh(spec)
    checks = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    for target in ("cuda", "tpu"):
        fwd = _ep_fn(mesh, None, local=ragged_dot_moe if target == "cuda" else None)  # None: the platform's choice
        grad = jax.grad(lambda h, w, i, s: fwd(h, w, i, s).astype(jnp.float32).sum(), argnums=(0, 1, 3))
        for fn in (fwd, grad):
            if target == "cuda":
                with platform.tracing_for("cuda"):
                    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
            else:
                exp = lower_for_tpu_or_skip(fn, *args, axes=dict(zip(mesh.axis_names, mesh.axis_sizes)),
                                            disabled_checks=checks)
            module = exp.mlir_module()
            assert exp.platforms == (target,) and "ragged_all_to_all" in module, (target, fn)
            if fn is fwd:
                assert "stablehlo.all_to_all" not in module, target
                assert ("ragged_dot_experts" if target == "cuda" else "gmm_experts") in module, target


# --------------------------------------------------------------------------------------
# Meshes and rules
# --------------------------------------------------------------------------------------

def test_mesh_spec_parsing():
    assert sharding.parse_mesh_spec("data=2, expert=4") == (("data", 2), ("expert", 4))
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    assert mesh.axis_names == ("data", "expert", "tensor") and mesh.devices.shape == (2, 2, 2)
    for bad, msg in [("model=8", "unknown axis 'model'"), ("data=2,data=4", "given twice"),
                     ("expert", "expected 'axis=size'"), ("expert=x", "must be an integer"),
                     ("expert=0", "must be >= 1")]:
        with pytest.raises(sharding.ShardingError, match=msg):
            sharding.parse_mesh_spec(bad)
    with pytest.raises(sharding.ShardingError, match="needs 4 devices, found 8"):
        sharding.make_mesh("expert=4")


def test_rules_collisions_and_missing_axes():
    rules = sharding.Rules.of({"embed": "tensor", "mlp": "tensor"})
    with pytest.raises(sharding.ShardingError, match="'tensor' is mapped from both logical axes 'embed' and 'mlp'"):
        rules.spec(("embed", "mlp"))
    with pytest.raises(sharding.ShardingError, match="appears twice"):
        sharding.Rules((("embed", ("tensor",)), ("embed", ())))
    with pytest.raises(sharding.ShardingError, match=r"mesh axes \['tensor'\]"):
        sharding.Rules.of({"mlp": "tensor"}).check(sharding.abstract_mesh("expert=8"))
    mesh = sharding.abstract_mesh("expert=4,tensor=2")
    spec, dropped = sharding.default_rules(mesh).spec(("vocab", "embed"), (331, 64), mesh)
    assert spec == P() and "vocab=331" in dropped[0]  # 331 is prime: cannot split, reported


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_no_silent_replication_of_real_weights(name):
    """Every weight of the real configs is split exactly as its rule says (no fallback),
    and nothing big is left whole where the mesh could split it."""
    cfg = preset(name)
    boxed = abstract_params(cfg, boxed=True)
    boxes = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    for spec in ["expert=8", "tensor=8", "expert=4,tensor=2", "fsdp=8"]:
        mesh = sharding.abstract_mesh(spec)
        rules = sharding.default_rules(mesh)
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            shardings = sharding.param_shardings(cfg, mesh, rules)
        for box, sh in zip(boxes, jax.tree_util.tree_leaves(shardings)):
            ways = np.prod([sizes[a] for n in box.names for a in rules.mesh_axes(n)])
            assert np.prod(sh.shard_shape(box.value.shape)) * ways == np.prod(box.value.shape), (box.names, spec)
            nbytes = np.prod(box.value.shape) * 2
            # Expert weights always split; with a tensor or fsdp axis every weight over 64 MiB
            # splits too (with an expert axis alone, attention and embeddings are replicated
            # by rule: data-parallel attention).
            if "expert" in box.names or (spec != "expert=8" and nbytes > 64 << 20):
                assert ways > 1, (box.names, spec)


def test_large_weight_that_cannot_split_warns():
    mesh = sharding.abstract_mesh("tensor=16")  # Scout has 8 KV heads and 40 query heads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharding.param_shardings(preset("scout").replace(vision=None), mesh)
    messages = [str(w.message) for w in caught]
    assert any("['layer_0']['attn']['k']" in m and "kv_heads=8) not divisible by tensor=16" in m for m in messages)
    assert any("['layer_0']['attn']['q']" in m and "q_heads=40) not divisible by tensor=16" in m for m in messages)
    assert not any("moe" in m for m in messages)  # 16 experts' widths split fine


def test_load_straight_into_the_mesh(maverick_like):
    """`load(path, mesh=...)` places each parameter on its rule's sharding, same values."""
    import llama4_jax

    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    cfg, sharded = llama4_jax.load(maverick_like.path, dtype="float32", mesh=mesh)
    _, plain = llama4_jax.load(maverick_like.path, dtype="float32")
    expected = sharding.param_shardings(cfg, mesh, dtype="float32")
    for a, b, sh in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain),
                        jax.tree_util.tree_leaves(expected)):
        assert a.sharding.is_equivalent_to(sh, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    experts = sharded["params"]["layers"]["layer_1"]["moe"]["gate"]  # [G, E=6, D, F=26]: 6/2 experts, 26/2 wide
    assert experts.addressable_shards[0].data.shape == (2, 3, 45, 13)
    with pytest.raises(ValueError, match="either mesh .* or shardings"):
        llama4_jax.load(maverick_like.path, mesh=mesh, shardings=expected)


def test_every_parameter_axis_is_known_to_the_rules_table():
    """A logical name the rules table has never heard of would be replicated silently."""
    import flax.linen as nn

    from llama4_jax.sharding import LOGICAL_AXES

    tree = abstract_params(preset("scout"), boxed=True)
    names = {n for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
             for n in x.names if n is not None}
    assert names and names <= set(LOGICAL_AXES), sorted(names - set(LOGICAL_AXES))


@pytest.mark.parametrize("shape, names", [((4, 2), ("expert", "tensor")), ((4, 2), ("data", "tensor"))])
def test_forward_takes_the_mesh_from_the_params(models, shape, names):
    """Params placed on a `jax.make_mesh` mesh (Explicit axes) run without mesh=."""
    cfg, params, ids, mask, ref = models["maverick8"]
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh, dtype="float32"))
    assert sharding.params_mesh(placed) is mesh
    np.testing.assert_allclose(np.asarray(forward(cfg, placed, ids, attention_mask=mask)), ref, atol=ATOL, rtol=0)


def test_mesh_over_other_devices_than_the_params_is_refused(models):
    """Params on one device (as a plain `load(path)` gives them) and a mesh over 8."""
    cfg, params, ids, mask, _ = models["maverick8"]
    params = jax.device_put(params, jax.devices()[0])
    with pytest.raises(ValueError, match=r"load\(path, mesh=mesh\)"):
        forward(cfg, params, ids, attention_impl="ring", mesh=sharding.make_mesh("seq=8"))
    with pytest.raises(ValueError, match=r"load\(path, mesh=mesh\)"):
        forward(cfg, params, ids, mesh=jax.make_mesh((4, 2), ("expert", "tensor")))


def test_generate_takes_the_mesh_from_the_params(models):
    import llama4_jax

    cfg, params, ids, mask, _ = models["maverick8"]
    prompts = [list(map(int, row[:9])) for row in np.asarray(ids)]
    ref = [o.token_ids for o in llama4_jax.generate(cfg, params, prompts, max_new_tokens=4, batch_size=4)]
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh, dtype="float32"))
    got = [o.token_ids for o in llama4_jax.generate(cfg, placed, prompts, max_new_tokens=4, batch_size=4)]
    assert got == ref


def test_forward_checks_token_ids(models):
    cfg, params, ids, _, _ = models["maverick8"]
    V = cfg.text.vocab_size
    ids = np.asarray(ids)
    with pytest.raises(TypeError, match="integer token ids"):
        forward(cfg, params, ids.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        forward(cfg, params, ids[:, :0])
    with pytest.raises(ValueError, match=rf"token id {V} at \[0, 3\] is outside the vocabulary \[0, {V}\)"):
        forward(cfg, params, np.where(np.arange(ids.shape[1]) == 3, V, ids))
    with pytest.raises(ValueError, match="token id -1"):
        forward(cfg, params, np.where(np.arange(ids.shape[1]) == 5, -1, ids))


def test_experts_the_expert_axis_does_not_divide():
    """5 experts on expert=8: the default MoE runs them replicated (`ragged`); asking for
    expert parallelism is refused with the sizes."""
    cfg = Llama4Config(text=dataclasses.replace(TEXT["scout_like"], num_hidden_layers=4, moe_layers=(1, 3),
                                                no_rope_layers=(1, 1, 1, 0)))
    assert cfg.text.num_local_experts == 5
    mesh = sharding.make_mesh("expert=8")
    import llama4_jax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts stay replicated: the rules warn about that
        params = jax.device_put(llama4_jax.init_params(cfg, jax.random.key(0)),
                                sharding.param_shardings(cfg, mesh, dtype="float32"))
    ids = np.arange(16).reshape(2, 8) + 3
    assert not sharding.splits_experts(mesh, None, cfg.text)
    ref = np.asarray(forward(cfg, jax.device_get(params), ids))
    np.testing.assert_allclose(np.asarray(forward(cfg, params, ids)), ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="num_local_experts=5 does not divide evenly over the expert mesh axes"):
        forward(cfg, params, ids, moe_impl="ep")
