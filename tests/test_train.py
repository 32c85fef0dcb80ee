"""Training: loss and gradients equal transformers', every MoE differentiable, the optax
step, distillation, resumable checkpoints.

fp32, matmul precision highest. Tolerances: the loss within 2e-5 of transformers'
(observed ~1e-6 on a loss of ~6.4); each parameter's gradient within 5e-5 of the
largest entry of transformers' gradient of that tensor (observed <= 3.5e-6: fp32
summation order); MoE implementations' gradients within 1e-5 of `dense` (observed
~3e-6 on entries of size ~10).
"""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as L
from llama4_jax import sharding, train, trainer
from llama4_jax.checkpoint import save_hf
from llama4_jax.config import TextConfig
from llama4_jax.model import moe

LOSS_ATOL = 2e-5
GRAD_RTOL = 5e-5


def _hf_loss_and_grads(model, ids, mask):
    """transformers' loss over the real tokens of each row (each row run unpadded, so
    its positions are its own) weighted by target count, and every parameter's gradient."""
    import torch

    model.zero_grad()
    total, n_all = 0.0, 0
    for r in range(ids.shape[0]):
        row = ids[r][mask[r].astype(bool)]
        n = len(row) - 1
        out = model(input_ids=torch.tensor(row[None]), labels=torch.tensor(row[None]), use_cache=False)
        total = total + out.loss * n
        n_all += n
    loss = total / n_all
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}


def _our_grads_by_hf_name(config, grads):
    """Our gradient tree written with the checkpoint name map, read back by HF name."""
    from safetensors.numpy import load_file

    d = os.path.join(tempfile.mkdtemp(), "grads")
    save_hf(config, grads, d)
    return load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("name", ["scout_like", "maverick_like"])
def test_loss_and_gradients_equal_transformers(name, request):
    ck = request.getfixturevalue(name)
    config, params = L.load(ck.path, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.text.vocab_size, (3, 27))
    mask = np.ones_like(ids, dtype=np.int32)
    mask[1, -6:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    (loss, _), g = jax.jit(jax.value_and_grad(
        lambda p: train.loss_fn(config, p, {"input_ids": ids, "attention_mask": mask}), has_aux=True))(params)
    ref_loss, ref = _hf_loss_and_grads(ck.hf_model, ids, mask)
    assert abs(float(loss) - ref_loss) <= LOSS_ATOL, (float(loss), ref_loss)
    ours = _our_grads_by_hf_name(config, g)
    assert set(ours) == set(ref)
    for n, r in ref.items():
        err = np.abs(ours[n] - r).max()
        assert err <= GRAD_RTOL * np.abs(r).max(), f"{n}: max abs gradient difference {err:.3g}"


@pytest.fixture(scope="module")
def moe_problem():
    E, D, F, T, k = 6, 20, 12, 37, 2
    ks = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(ks[0], (T, D))
    w = {"gate": 0.3 * jax.random.normal(ks[1], (E, D, F)), "up": 0.3 * jax.random.normal(ks[2], (E, D, F)),
         "down": 0.3 * jax.random.normal(ks[3], (E, F, D))}
    router = jax.random.normal(ks[4], (D, E))

    def loss(h, w, router, impl):
        _, idx, score = moe.route(h, router, k)
        return (moe._MOE_IMPLS[impl](h, w, idx, score) * jnp.sin(jnp.arange(D))).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    return (h, w, router), grad


@pytest.mark.parametrize("impl", ["ragged", "blocked", "ragged_dot", "rowwise", "ep"])
def test_moe_gradients_equal_dense(impl, moe_problem):
    args, grad = moe_problem
    ref = jax.tree_util.tree_leaves(grad(*args, "dense"))
    if impl == "ep":
        with sharding.activate(sharding.make_mesh("data=2,expert=2,tensor=2")):
            got = grad(*args, "ep")
    else:
        got = grad(*args, impl)
    for a, b in zip(jax.tree_util.tree_leaves(got), ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_blocked_gradient_with_every_token_on_one_expert():
    """Groups of every size (empty experts, one expert holding all rows, blocks that
    overlap the next group) give the dense gradient."""
    E, D, F, T = 4, 8, 6, 45
    ks = jax.random.split(jax.random.key(3), 4)
    h = jax.random.normal(ks[0], (T, D))
    w = {n: 0.3 * jax.random.normal(k, s) for n, k, s in
         (("gate", ks[1], (E, D, F)), ("up", ks[2], (E, D, F)), ("down", ks[3], (E, F, D)))}
    score = jnp.linspace(0.2, 0.9, T)[:, None]
    for idx in (jnp.full((T, 1), 2, jnp.int32), (jnp.arange(T) % 3)[:, None].astype(jnp.int32)):
        f = lambda impl: jax.grad(lambda h, w, s: moe._MOE_IMPLS[impl](h, w, idx, s).sum() ** 2,  # noqa: E731
                                  argnums=(0, 1, 2))(h, w, score)
        for a, b in zip(jax.tree_util.tree_leaves(f("blocked")), jax.tree_util.tree_leaves(f("dense"))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


TINY = TextConfig(vocab_size=61, hidden_size=24, intermediate_size=16, intermediate_size_mlp=20, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_local_experts=4,
                  num_experts_per_tok=1, moe_layers=(1, 3), no_rope_layers=(1, 1, 1, 0), attention_chunk_size=8,
                  floor_scale=8, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)


@pytest.fixture(scope="module")
def tiny():
    params = L.init_params(TINY, jax.random.key(0))
    ids = np.random.default_rng(0).integers(3, TINY.vocab_size, (4, 24)).astype(np.int32)
    return params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_steps_lower_the_loss(tiny):
    params, batch = tiny
    tc = train.TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=30)
    step = train.make_train_step(TINY, tc)
    state = train.init_state(TINY, params, tc)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(np.isfinite(losses))
    assert step._cache_size() == 1  # one compilation for the whole run


def test_loaded_params_compile_once(tiny):
    """Parameters committed to a device (as `load` returns them) give one compilation."""
    params, batch = tiny
    tc = train.TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=3)
    step = train.make_train_step(TINY, tc)
    state = train.init_state(TINY, jax.device_put(params, jax.devices()[0]), tc)
    for _ in range(3):
        state, _ = step(state, batch)
    assert step._cache_size() == 1
    # The caller's params were copied, not donated.
    assert np.isfinite(np.asarray(params["params"]["embed"])).all()


def test_expert_parallel_step_equals_single_device(tiny):
    params, batch = tiny
    tc = train.TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4)
    ref_state = train.init_state(TINY, params, tc)
    ref_state, ref_m = train.make_train_step(TINY, tc, moe_impl="dense")(ref_state, batch)
    mesh = sharding.make_mesh("data=2,expert=4")
    state = train.init_state(TINY, params, tc)
    state = jax.device_put(state, train.state_shardings(TINY, state, mesh, train_config=tc))
    sharded = {k: jax.device_put(v, sharding.batch_sharding(mesh, None, v.shape)) for k, v in batch.items()}
    state, m = train.make_train_step(TINY, tc, moe_impl="ep", mesh=mesh)(state, sharded)
    assert abs(float(m["loss"]) - float(ref_m["loss"])) < 1e-5
    assert abs(float(m["grad_norm"]) - float(ref_m["grad_norm"])) < 1e-4 * float(ref_m["grad_norm"])
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_remat_and_bf16_compute(tiny):
    params, batch = tiny
    g = lambda tc: jax.jit(jax.grad(lambda p: train.loss_fn(TINY, p, batch, train_config=tc)[0]))(params)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(g(train.TrainConfig(remat=True))),
                    jax.tree_util.tree_leaves(g(train.TrainConfig()))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    tc = train.TrainConfig(compute_dtype="bfloat16", warmup_steps=1, total_steps=2)
    state = train.init_state(TINY, params, tc)
    state, m = train.make_train_step(TINY, tc)(state, batch)
    assert np.isfinite(float(m["loss"]))
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("float32")}
    fp32 = train.loss_fn(TINY, params, batch)[0]
    assert abs(float(m["loss"]) - float(fp32)) < 0.05  # bf16 rounding only


def test_distillation(tiny):
    params, batch = tiny
    for w in (0.5, "dynamic"):
        tc = train.TrainConfig(distill_weight=w)
        loss, m = train.loss_fn(TINY, params, batch, train_config=tc, teacher=(TINY, params))
        assert abs(float(m["distill"])) < 1e-6  # the student is the teacher
        assert 0 <= float(m["alpha"]) <= 1
    tc = train.TrainConfig(distill_weight=1.0)
    other = L.init_params(TINY, jax.random.key(7))
    t_logits = L.forward(TINY, other, batch["input_ids"])
    loss, m = train.loss_fn(TINY, params, batch, train_config=tc, teacher_logits=t_logits)
    assert float(m["distill"]) > 1e-3 and abs(float(loss) - float(m["distill"])) < 1e-6
    with pytest.raises(ValueError, match="vocabularies must match"):
        train.loss_fn(TINY, params, batch, train_config=tc, teacher_logits=t_logits[..., :-1])


def test_router_auxiliary_losses(tiny):
    params, batch = tiny
    _, m0 = train.loss_fn(TINY, params, batch)
    loss, m = train.loss_fn(TINY, params, batch, train_config=train.TrainConfig(router_aux_coef=0.1,
                                                                                router_z_coef=0.01))
    assert float(m["router_aux"]) >= 1.0 - 1e-6  # E * sum f P >= 1, with equality when balanced
    assert float(m["router_z"]) > 0
    np.testing.assert_allclose(float(loss), float(m0["loss"]) + 0.1 * float(m["router_aux"])
                               + 0.01 * float(m["router_z"]), rtol=1e-6)


def test_resume_equals_uninterrupted(tiny, tmp_path):
    params, _ = tiny
    rng = np.random.default_rng(5)
    data = rng.integers(3, TINY.vocab_size, (12, 4, 16)).astype(np.int32)
    batches = lambda s: {"input_ids": data[s], "attention_mask": np.ones_like(data[s])}  # noqa: E731
    tc = train.TrainConfig(learning_rate=5e-3, warmup_steps=2, total_steps=6)
    _, full = trainer.fit(TINY, params, batches, train_config=tc, steps=6, progress=False)
    ck = str(tmp_path / "ck")
    trainer.fit(TINY, params, batches, train_config=tc, steps=3, ckpt_dir=ck, save_every=3, progress=False)
    state, rest = trainer.fit(TINY, params, batches, train_config=tc, steps=6, ckpt_dir=ck, save_every=3,
                              progress=False, log_every=1)
    assert [m["step"] for m in rest] == [4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in rest], [m["loss"] for m in full[3:]], rtol=1e-6)
    logged = [json.loads(line)["step"] for line in open(os.path.join(ck, "metrics.jsonl"))]
    assert logged[-3:] == [4, 5, 6]


def test_time_limit_stops_with_a_checkpoint_and_resumes(tiny, tmp_path):
    params, batch = tiny
    ck = str(tmp_path / "ck")
    tc = train.TrainConfig(learning_rate=5e-3, warmup_steps=1, total_steps=4)
    state, hist = trainer.fit(TINY, params, lambda s: batch, train_config=tc, steps=4, ckpt_dir=ck,
                              save_every=100, progress=False, time_limit_s=0.0)
    assert int(state.step) == 1 and [m["step"] for m in hist] == [1]
    assert trainer._manager(ck, 2).latest_step() == 1  # stopped with a checkpoint
    state, hist = trainer.fit(TINY, params, lambda s: batch, train_config=tc, steps=4, ckpt_dir=ck,
                              save_every=100, progress=False)
    assert int(state.step) == 4 and [m["step"] for m in hist] == [2, 3, 4]


def test_prefetch_returns_the_steps_batches_in_and_out_of_order():
    import functools

    from llama4_jax.data import Prefetch

    with Prefetch(functools.partial(np.full, 3), workers=1, depth=2) as fetch:
        assert [fetch(s).tolist() for s in (0, 1, 2)] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
        assert fetch(7).tolist() == [7, 7, 7] and fetch(8).tolist() == [8, 8, 8]  # a resumed run
    with pytest.raises(ValueError, match="workers"):
        Prefetch(np.zeros, workers=0)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    params, batch = tiny
    ck = str(tmp_path / "ck")
    bad = jax.tree_util.tree_map(lambda p: p * jnp.nan, params)
    with pytest.raises(trainer.TrainingDiverged, match="at step 1"):
        trainer.fit(TINY, bad, lambda s: batch, train_config=train.TrainConfig(), steps=3, ckpt_dir=ck,
                    save_every=1, progress=False)
    assert trainer._manager(ck, 2).latest_step() is None  # nothing bad was written
    trainer.fit(TINY, params, lambda s: batch, train_config=train.TrainConfig(), steps=2, ckpt_dir=ck,
                save_every=1, progress=False)
    assert trainer._manager(ck, 2).latest_step() == 2


def test_train_config_validation():
    for bad in ({"learning_rate": 0}, {"warmup_steps": 20, "total_steps": 10}, {"distill_weight": 2},
                {"distill_weight": "sometimes"}, {"compute_dtype": "float16"}):
        with pytest.raises(ValueError):
            train.TrainConfig(**bad)


@pytest.fixture(scope="module")
def packed_model():
    """Scout-like, text only (chunk 8: examples longer than a chunk), fp32."""
    from tests.hf_models import TEXT

    config = L.Llama4Config(text=TEXT["scout_like"])
    return config, L.init_params(config, jax.random.key(5))


def _right_padded(exs):
    """Examples as rows of one batch, right-padded (a row's tokens never see its padding)."""
    ids = np.zeros((len(exs), max(map(len, exs))), np.int32)
    mask = np.zeros_like(ids)
    for i, x in enumerate(exs):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return ids, mask


_ALONE: dict = {}


def _alone_logits(config, params, exs):
    """Each example's logits alone (its own row of a right-padded batch, `xla`), once per process."""
    key = str([x.tolist() for x in exs])
    if key not in _ALONE:
        _ALONE[key] = np.asarray(jax.jit(lambda p, i, m: train.model_logits(config, p, i, m)[0])(
            params, *_right_padded(exs)))
    return _ALONE[key]


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas"])
def test_packed_rows_equal_examples_alone(packed_model, impl):
    """Examples packed into one row (`segment_ids`, as `data.pack` makes them) give the
    logits each gives alone, on every attention backend: a token sees only its own
    example, RoPE, the chunks (8 tokens, aligned to each example's first token) and the
    NoPE temperature (floor_scale 6: it moves from position 6 on) follow its position
    in the example. fp32: within 2e-5 (observed ~1e-6)."""
    from llama4_jax.model.text import TextModel

    config, params = packed_model
    rng = np.random.default_rng(4)
    lens = (5, 13, 10)
    exs = [rng.integers(3, config.text.vocab_size, n) for n in lens]
    T = 32
    ids, mask, seg = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32), np.zeros((2, T), np.int32)
    ids[0, :28], mask[0, :28] = np.concatenate(exs), 1
    seg[0, :28] = np.repeat([1, 2, 3], lens)
    ids[1, :13], mask[1, :13], seg[1, :13] = exs[1], 1, 1  # one example, then padding
    logits, _ = jax.jit(lambda p: train.model_logits(config, p, ids, mask, segment_ids=seg,
                                                     attention_impl=impl))(params)
    alone = _alone_logits(config, params, exs)
    start = 0
    for x, a in zip(exs, alone):
        np.testing.assert_allclose(logits[0, start:start + len(x)], a[:len(x)], atol=2e-5, rtol=0)
        start += len(x)
    np.testing.assert_allclose(logits[1, :13], logits[0, 5:18], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="positions=None"):
        TextModel(config.text).apply(params, ids, ids, mask.astype(bool), segment_ids=seg)


def test_packed_loss_and_gradients_equal_examples_alone(packed_model):
    """The loss of a packed row is the target-weighted mean of its examples' losses
    alone, and so are the gradients; the token after an example's end (the next one's
    BOS) is not a target. Gradients within 1e-5 of the largest entry (observed ~1e-7)."""
    config, params = packed_model
    rng = np.random.default_rng(6)
    lens = (9, 14)
    exs = [rng.integers(3, config.text.vocab_size, n) for n in lens]
    batch = {"input_ids": np.concatenate(exs)[None], "attention_mask": np.ones((1, sum(lens)), np.int32),
             "segment_ids": np.repeat([1, 2], lens)[None]}
    grad = jax.jit(jax.value_and_grad(lambda p, b: train.loss_fn(config, p, b), has_aux=True))
    (loss, m), g = grad(params, batch)
    assert float(m["tokens"]) == sum(n - 1 for n in lens)
    # The examples alone, each its own row of a right-padded batch: the batch's loss is
    # the target-weighted mean of the rows' losses, its gradient that of the mean.
    ids, mask = _right_padded(exs)
    (ref_loss, ref_m), ref = grad(params, {"input_ids": ids, "attention_mask": mask})
    assert float(ref_m["tokens"]) == float(m["tokens"])
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(float(np.abs(want).max()), 1e-6), rtol=0)
