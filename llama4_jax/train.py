"""Training: the loss (next-token, router auxiliary terms, distillation) and the optax step.

    state = train.init_state(config, params, tcfg)
    step = train.make_train_step(config, tcfg, moe_impl="ragged")
    state, metrics = step(state, batch)          # jitted; donates `state`

The plain loss (`TrainConfig()` defaults: no auxiliary terms, no teacher) is exactly
transformers' `Llama4ForCausalLM(input_ids, labels=...)` loss: the mean next-token
cross entropy over the target tokens. `batch["loss_mask"][b, t] = 1` makes token t a
target (predicted from the tokens before it); the default is every real token after
the first (`attention_mask` with its first column zeroed).

Distillation adds `KL(teacher || student)` at a temperature tau (times tau^2, so its
gradient scale does not depend on tau), from teacher logits or a teacher
`(config, params)`. The weight alpha between the data term and the teacher term is
either fixed, `loss = (1 - alpha) CE + alpha KL`, or `"dynamic"`: per target token,
alpha_t = p_teacher(true token) (at temperature 1, no gradient), so the student
follows the teacher's whole distribution where the teacher is right and confident,
and the data where the teacher is wrong.

Train state checkpoints (orbax, atomic, resumable) live in `llama4_jax.trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from . import sharding
from .config import Llama4Config, TextConfig
from .kernels.reference import segment_starts
from .model.text import TextModel, input_embeddings, positions_from_mask


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loss settings (frozen: a static argument of the step).

    The learning rate warms up linearly from 0 over `warmup_steps`, then follows a
    cosine to `learning_rate * min_lr_ratio` at `total_steps`. AdamW decays only the
    matrices (embeddings, projections, experts), not norms. Gradients are clipped to
    global norm `grad_clip` (0 disables clipping).

    compute_dtype "bfloat16" runs the model in bf16 from fp32 master weights: the
    state keeps fp32 parameters and fp32 optimizer moments, the loss casts them, and
    the gradient of the cast brings fp32 gradients back. remat recomputes each layer
    group's activations in the backward pass (`jax.checkpoint`), trading compute for
    activation memory.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    router_aux_coef: float = 0.0  # Switch load balancing: E * sum_e f_e P_e, per MoE layer
    router_z_coef: float = 0.0  # mean logsumexp(router logits)^2
    distill_weight: float | str = 0.5  # alpha in [0, 1], or "dynamic"
    distill_temperature: float = 1.0
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                             f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.distill_weight != "dynamic" and not (isinstance(self.distill_weight, (int, float))
                                                     and 0 <= self.distill_weight <= 1):
            raise ValueError(f"distill_weight must be a number in [0, 1] or 'dynamic', got {self.distill_weight!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.router_aux_coef < 0 or self.router_z_coef < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("router_aux_coef, router_z_coef, grad_clip and weight_decay must be >= 0")


def _text(config) -> Llama4Config:
    return Llama4Config(text=config) if isinstance(config, TextConfig) else config


def default_loss_mask(attention_mask):
    """Every real token after the first of its row is a target."""
    m = jnp.asarray(attention_mask, jnp.int32)
    first = jnp.cumsum(m, axis=1) == 1
    return m * (1 - first.astype(jnp.int32))


def model_logits(config, params, input_ids, attention_mask, *, pixel_values=None, moe_impl="ragged",
                 attention_impl="xla", remat=False, segment_ids=None):
    """(logits f32 [B, T, V], router logits: a list of [N, E] per MoE layer).

    segment_ids [B, T]: packed rows, each example attending only to itself
    (`TextModel`'s segment_ids)."""
    config = _text(config)
    t = config.text
    dtype = params["params"]["embed"].dtype
    model = TextModel(t, dtype, attention_impl, moe_impl, remat=remat)
    positions, valid = positions_from_mask(attention_mask)
    if segment_ids is not None:
        positions = None  # derived from the segments
    embeds = input_embeddings(config, params, input_ids, pixel_values)
    (logits, _, _), state = model.apply(params, input_ids, positions, valid, embeds=embeds,
                                        segment_ids=segment_ids, mutable=["intermediates"])
    router = []
    for leaf in jax.tree_util.tree_leaves(state.get("intermediates", {})):
        # Scanned groups stack the sown logits on a leading [G] axis.
        router.extend(leaf if leaf.ndim == 3 else [leaf])
    return logits, router


def router_losses(router_logits, valid, k: int):
    """(load-balancing loss, z-loss), averaged over MoE layers and real tokens.

    Load balancing is the Switch Transformer's E * sum_e f_e * P_e with f_e the share
    of the top-k assignments that go to expert e and P_e the mean softmax probability
    of e (Llama 4 scores with a sigmoid; the softmax here only measures balance).
    """
    if not router_logits:
        return jnp.float32(0), jnp.float32(0)
    w = valid.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    aux, z = [], []
    for logits in router_logits:
        logits = logits.astype(jnp.float32)
        E = logits.shape[-1]
        _, idx = jax.lax.top_k(logits, k)
        f = (jax.nn.one_hot(idx, E).sum(1) * w[:, None]).sum(0) / (n * k)
        p = (jax.nn.softmax(logits) * w[:, None]).sum(0) / n
        aux.append(E * jnp.sum(f * p))
        z.append((jax.nn.logsumexp(logits, axis=-1) ** 2 * w).sum() / n)
    return jnp.mean(jnp.stack(aux)), jnp.mean(jnp.stack(z))


def distill_terms(student_logits, teacher_logits, targets, temperature: float):
    """Per-position KL(teacher || student) at `temperature` (times temperature^2), and
    the teacher's probability of the target at temperature 1."""
    ls = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    lt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1) * temperature**2
    p_true = jnp.exp(jnp.take_along_axis(jax.nn.log_softmax(teacher_logits, axis=-1), targets[..., None], -1)[..., 0])
    return kl, p_true


def loss_fn(config, params, batch, *, train_config: TrainConfig = TrainConfig(), moe_impl: str = "ragged",
            attention_impl: str = "xla", teacher_logits=None, teacher=None):
    """Training loss and metrics of `batch` (a dict of arrays).

    batch: input_ids int [B, T]; optional attention_mask (0/1 [B, T], default all 1),
    loss_mask (0/1 [B, T]: which tokens are targets, see the module docstring),
    segment_ids (int [B, T]: packed rows, `data.pack`: each example attends only to
    itself, and the first token of an example is never a target, having nothing of
    its example before it) and pixel_values [N, 3, S, S] (tiles for the `<|patch|>`
    tokens in batch order; extra tiles beyond the placeholders are ignored, so batches
    can pad to a fixed count).
    teacher_logits: [B, T, V] logits of a teacher for the same inputs, or teacher:
    a (config, params) pair run here without gradient. Returns (loss, metrics).
    """
    tc = train_config
    config = _text(config)
    V = config.text.vocab_size
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch.get("attention_mask", jnp.ones_like(ids)), jnp.int32)
    loss_mask = batch.get("loss_mask")
    loss_mask = default_loss_mask(mask) if loss_mask is None else jnp.asarray(loss_mask, jnp.int32) * mask
    segments = batch.get("segment_ids")
    if segments is not None:
        segments = jnp.asarray(segments, jnp.int32)
        # An example's first token is predicted from the example before it, which it
        # cannot see: never a target.
        loss_mask = jnp.where(segment_starts(segments), 0, loss_mask)
    pixels = batch.get("pixel_values")
    if tc.compute_dtype != "float32":
        params = jax.tree_util.tree_map(lambda p: p.astype(tc.compute_dtype), params)
        pixels = None if pixels is None else pixels.astype(tc.compute_dtype)
    logits, router = model_logits(config, params, ids, mask, pixel_values=pixels, moe_impl=moe_impl,
                                  attention_impl=attention_impl, remat=tc.remat, segment_ids=segments)

    # Position t predicts token t + 1.
    pred, targets, w = logits[:, :-1], ids[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
    n_tok = w.sum()
    denom = jnp.maximum(n_tok, 1.0)
    logp = jax.nn.log_softmax(pred, axis=-1)
    ce_t = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce = (ce_t * w).sum() / denom
    metrics = {"ce": ce, "tokens": n_tok,
               "accuracy": ((jnp.argmax(pred, -1) == targets) * w).sum() / denom}

    if teacher is not None:
        if teacher_logits is not None:
            raise ValueError("pass teacher_logits or teacher, not both")
        t_config, t_params = teacher
        teacher_logits, _ = model_logits(t_config, t_params, ids, mask, pixel_values=batch.get("pixel_values"),
                                         moe_impl=moe_impl, attention_impl=attention_impl, segment_ids=segments)
    if teacher_logits is not None:
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher logits have shape {tuple(teacher_logits.shape)}, the student's "
                             f"{tuple(logits.shape)} (vocabularies must match: student V={V})")
        t_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))[:, :-1]
        kl_t, p_true = distill_terms(pred, t_logits, targets, tc.distill_temperature)
        alpha = jax.lax.stop_gradient(p_true) if tc.distill_weight == "dynamic" else jnp.float32(tc.distill_weight)
        alpha = jnp.broadcast_to(alpha, ce_t.shape)
        loss = (((1 - alpha) * ce_t + alpha * kl_t) * w).sum() / denom
        metrics["distill"] = (kl_t * w).sum() / denom
        metrics["alpha"] = (alpha * w).sum() / denom
    else:
        loss = ce

    if tc.router_aux_coef or tc.router_z_coef:
        aux, z = router_losses(router, mask.astype(bool), config.text.num_experts_per_tok)
        loss = loss + tc.router_aux_coef * aux + tc.router_z_coef * z
        metrics["router_aux"], metrics["router_z"] = aux, z
    metrics["loss"] = loss
    return loss, metrics


# --------------------------------------------------------------------------------------
# Optimizer and state
# --------------------------------------------------------------------------------------

def schedule(tc: TrainConfig):
    """Linear warm-up to `learning_rate`, cosine decay to `learning_rate * min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.total_steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.min_lr_ratio)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on matrices only) on the schedule."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip else adamw


@flax.struct.dataclass
class TrainState:
    """step (int32 scalar), params (fp32 master weights), opt_state (optax)."""

    step: Any
    params: Any
    opt_state: Any


def init_state(config, params, train_config: TrainConfig = TrainConfig()) -> TrainState:
    """A fresh train state from `params` (cast to fp32 master weights)."""
    params = jax.tree_util.tree_map(lambda p: jnp.array(p, jnp.float32), params)  # a copy: the step donates it
    opt_state = optimizer(train_config).init(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
    # Loaded parameters are committed to their device, the fresh step counter and
    # optimizer moments are not; the step's outputs all are, so its second call would
    # see other input shardings and compile again. Commit every leaf to the one device.
    devices = {d for x in jax.tree_util.tree_leaves(params) for d in x.sharding.device_set}
    return jax.device_put(state, devices.pop()) if len(devices) == 1 else state


def state_shardings(config, state: TrainState, mesh, rules=None, train_config: TrainConfig = TrainConfig()):
    """Shardings of a train state on `mesh`: the parameters and the optimizer's
    moments by the parameters' rules, the step and counters replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    pshard = sharding.param_shardings(_text(config), mesh, rules, dtype="float32")
    opt_shard = optax.tree_map_params(optimizer(train_config), lambda _, s: s, state.opt_state, pshard,
                                      transform_non_params=lambda _: replicated)
    return TrainState(replicated, pshard, opt_shard)


def make_train_step(config, train_config: TrainConfig = TrainConfig(), *, moe_impl: str = "ragged",
                    attention_impl: str = "xla", mesh=None, rules=None, teacher_config=None):
    """A jitted `step(state, batch[, teacher_params]) -> (state, metrics)` that donates state.

    teacher_config: distil from a teacher of this config, whose parameters are the
    step's third argument. On a mesh (`llama4_jax.sharding.make_mesh`) place the state
    by `state_shardings` and split the batch by `sharding.batch_sharding`; the model
    runs under the same rules table as inference (data/fsdp/expert/tensor), with
    moe_impl="ep" for expert parallelism.
    """
    config = _text(config)
    tc = train_config
    opt = optimizer(tc)

    def step(state: TrainState, batch, teacher_params=None):
        teacher = None if teacher_config is None else (teacher_config, teacher_params)

        def loss(p):
            return loss_fn(config, p, batch, train_config=tc, moe_impl=moe_impl, attention_impl=attention_impl,
                           teacher=teacher)

        with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
            (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(tc)(state.step)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, donate_argnums=0)
