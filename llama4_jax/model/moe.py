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
  * `ragged`: only the chosen experts are computed. `ragged_strategy` picks, at trace
    time, one of these (each also selectable by name):
      - `ragged_dot`: rows sorted by expert, `jax.lax.ragged_dot`; native on GPU/TPU,
        a dense fallback on CPU;
      - `gmm` (TPU): rows sorted by expert, jax's megablox grouped matmul (a Pallas TPU
        kernel; interpret mode elsewhere), float weights only;
      - `blocked` (CPU prefill and training): rows sorted by expert; a loop over the
        experts that received tokens, block matmuls on each expert's weight slice,
        with a custom VJP (`grouped_swiglu`) so it trains;
      - `rowwise` (CPU decode, T*k <= E): each row times its own expert's slice,
        unrolled, so only the chosen experts' weights are read; on `ExpertList`
        weights (the CPU decode parameters, `views.unstack_layers(split_experts=True)`) a
        loop over the rows, whose `lax.switch` reads the row's expert's own buffer,
        never a copy out of a stacked array (`ragged` sends more rows to `blocked`,
        which takes `ExpertList` weights too).
Expert weights are stored as the matmul consumes them (gate/up [E, D, F], down
[E, F, D]: `x @ w[e]`), so no strategy transposes or re-lays-out a weight;
tests/test_moe.py checks the compiled HLO for that. Every strategy also takes
quantized experts (`llama4_jax.quant.QuantizedWeight`, through `quant.matmul`,
`quant.take` and `quant.ragged_dot`); only the backward pass of `blocked` needs float
weights.
The strategies live in `experts.py` and expert parallelism (`ep`) in `moe_ep.py`;
the table below names them all, and `register_moe` adds a user's own.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ..config import TextConfig
from .experts import (  # noqa: F401  (re-exported: every strategy is also reachable as moe.<name>)
    GMM_TILING, ROWWISE_MAX_ROWS, block_ladder, block_rows, blocked_moe, dense_moe, gmm_moe, grouped_swiglu,
    ragged_dot_moe, ragged_moe, ragged_strategy, route, rowwise_moe, sort_by_expert,
)
from .layers import MLP, ExpertList, gate_up_params, param
from .moe_ep import ep_moe

_MOE_IMPLS: dict = {
    "dense": dense_moe,
    "ragged": ragged_moe,
    "ragged_dot": ragged_dot_moe,
    "blocked": blocked_moe,
    "rowwise": rowwise_moe,
    "gmm": gmm_moe,
    "ep": ep_moe,
}


def register_moe(name: str, fn) -> None:
    """Make an expert computation selectable as `moe_impl=name`.

    fn(h [T, D], experts {'gate','up': [E, D, F], 'down': [E, F, D]},
       idx [T, k] int32, score [T, k] dtype) -> [T, D]
    """
    _MOE_IMPLS[name] = fn


def moe_impls() -> tuple[str, ...]:
    return tuple(_MOE_IMPLS)


class MoE(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    impl: str = "ragged"

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.dtype
        D, E, F = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        router = param(self, "router", (D, E), ("embed", "router"), dt)
        gate, up = gate_up_params(self, (E, D, F), ("expert", "embed", "expert_mlp"), dt)
        experts = {
            "gate": gate,
            "up": up,  # None: gate holds both (the CPU decode parameters, `layers.fuse_gate_up`)
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
        if isinstance(experts["gate"], ExpertList) and fn not in (ragged_moe, rowwise_moe, blocked_moe):
            raise ValueError(f"moe_impl {self.impl!r} takes stacked expert weights; these are an ExpertList "
                             "(unstack_layers(split_experts=True)): use 'ragged', 'rowwise' or 'blocked'")
        if up is None and not isinstance(gate, ExpertList):
            raise ValueError("routed experts' gate_up is taken per expert only (an ExpertList, as "
                             "views.split_expert_layers(fuse=True) makes it); hold gate and up stacked")
        routed = fn(h, experts, idx, score).reshape(B, T, D)
        return MLP(F, dt, name="shared")(x) + routed
