"""Mixture of experts (`Llama4TextMoe`): router, routed experts, shared expert.

Routing (exactly as transformers and Meta):
  * router logits = h W_r in the model dtype; top-k on the RAW logits;
  * score = sigmoid(top-k logit) in fp32, cast to the dtype; no softmax, no
    renormalisation; other experts get exactly 0;
  * the score multiplies the expert INPUT (SwiGLU is not linear, so scaling the
    output instead would be wrong): y_e = down((silu(g) * u)) with [g|u] = (s*h) W_gu.
  * out = shared_expert(h) + sum_e y_e.

Implementations behind `moe_impl`, all tested equal to `dense`:
  * `dense`: every expert on every token (zero-scaled inputs give zero outputs), the
    reference; what transformers does.
  * `ragged`: the T*k (token, expert) pairs sorted by expert and run through a grouped
    matmul, so only the chosen experts are computed.
Further strategies (expert parallelism) register themselves with `register_moe`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import TextConfig
from .layers import MLP, param

_MOE_IMPLS: dict = {}


def register_moe(name: str, fn) -> None:
    """Make an expert computation selectable as `moe_impl=name`.

    fn(h [T, D], experts {'gate','up': [E, D, F], 'down': [E, F, D]},
       idx [T, k] int32, score [T, k] dtype) -> [T, D]
    """
    _MOE_IMPLS[name] = fn


def moe_impls() -> tuple[str, ...]:
    return tuple(_MOE_IMPLS)


def route(h, router, k: int):
    """Top-k expert indices [T, k] and sigmoid scores [T, k] (fp32 sigmoid, cast back)."""
    logits = jnp.einsum("td,de->te", h, router)
    top, idx = jax.lax.top_k(logits, k)
    score = jax.nn.sigmoid(top.astype(jnp.float32)).astype(h.dtype)
    return logits, idx.astype(jnp.int32), score


def _swiglu_experts(x_etd, w):
    g = jnp.einsum("etd,edf->etf", x_etd, w["gate"])
    u = jnp.einsum("etd,edf->etf", x_etd, w["up"])
    return jnp.einsum("etf,efd->etd", u * jax.nn.silu(g), w["down"])


def dense_moe(h, w, idx, score):
    """Reference: all experts on all tokens, inputs scaled by the (mostly zero) score."""
    E = w["gate"].shape[0]
    s_te = jnp.zeros((h.shape[0], E), h.dtype).at[jnp.arange(h.shape[0])[:, None], idx].set(score)
    x_etd = h[None] * s_te.T[:, :, None]
    return _swiglu_experts(x_etd, w).sum(axis=0)


def sort_by_expert(idx, num_experts: int):
    """Order the flattened (token, slot) pairs by expert.

    Returns (order [T*k], token_of_row [T*k], group_sizes [E]) where row r of the
    sorted batch is pair order[r], i.e. token token_of_row[r].
    """
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of_row = order // idx.shape[1]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token_of_row, group_sizes


def ragged_moe(h, w, idx, score):
    """Grouped-matmul MoE: only the top-k experts per token are computed."""
    E = w["gate"].shape[0]
    order, tok, sizes = sort_by_expert(idx, E)
    x = h[tok] * score.reshape(-1)[order][:, None]
    g = jax.lax.ragged_dot(x, w["gate"], sizes)
    u = jax.lax.ragged_dot(x, w["up"], sizes)
    y = jax.lax.ragged_dot(u * jax.nn.silu(g), w["down"], sizes)
    return jnp.zeros_like(h).at[tok].add(y)


register_moe("dense", dense_moe)
register_moe("ragged", ragged_moe)


class MoE(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    impl: str = "ragged"

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.dtype
        D, E, F = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        router = param(self, "router", (D, E), ("embed", "router"), dt)
        experts = {
            "gate": param(self, "gate", (E, D, F), ("expert", "embed", "expert_mlp"), dt),
            "up": param(self, "up", (E, D, F), ("expert", "embed", "expert_mlp"), dt),
            "down": param(self, "down", (E, F, D), ("expert", "expert_mlp", "embed"), dt),
        }
        B, T, _ = x.shape
        h = x.reshape(B * T, D)
        logits, idx, score = route(h, router, cfg.num_experts_per_tok)
        self.sow("intermediates", "router_logits", logits)
        try:
            fn = _MOE_IMPLS[self.impl]
        except KeyError:
            raise ValueError(f"unknown moe_impl {self.impl!r}; available: {sorted(_MOE_IMPLS)}") from None
        routed = fn(h, experts, idx, score).reshape(B, T, D)
        return MLP(F, dt, name="shared")(x) + routed
