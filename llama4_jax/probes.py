"""Looking inside the decoder: router choices, the MoE's two halves, attention weights.

    trace = probes.moe_trace(config, params, input_ids)
    trace.experts          # [M, B, T, k] experts each token was sent to, per MoE layer
    trace.router_logits    # [M, B, T, E] raw router logits (top-k is taken on these)
    trace.shared, trace.routed   # [M, B, T, D] the shared expert's and the routed experts' output
    probs = probes.attention_weights(config, params, input_ids, layers=(0, 3))   # {layer: [B, H, T, S]}

Both run the same decoder `forward` runs (the scanned `TextModel`), with Flax's
`capture_intermediates` recording the outputs of the modules named here, so what they
report is what the forward pass computed. Attention weights are not an intermediate of
any backend (the fast ones never form them), so `attention_weights` recomputes the
softmax of one layer from its captured normed input and the layer's own q/k weights,
exactly as the reference `xla` backend does (tests/test_probes.py checks them against
transformers' eager attention and checks that weights @ V @ W_o give the layer's output).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import Llama4Config, TextConfig, rope_inv_freq
from .kernels.reference import INVALID_POS, NEG, visible
from .model.attention import temperature_scale
from .model.layers import apply_rope, rms_norm, rope_angles
from .model.text import TextModel, check_token_ids, input_embeddings, positions_from_mask

__all__ = ["MoETrace", "moe_trace", "attention_weights"]


@dataclasses.dataclass(frozen=True)
class MoETrace:
    """What the MoE layers did, stacked over the M MoE layers in layer order.

    layers: the decoder layer index of each entry (`config.text.moe_layers`, sorted).
    router_logits f32 [M, B, T, E]; experts int32 [M, B, T, k] (top-k of the logits,
    best first); scores f32 [M, B, T, k] (sigmoid of those logits: the scale of each
    expert's input); shared, routed f32 [M, B, T, D]: the shared expert's output and
    the sum of the routed experts' outputs (their sum is the layer's feed-forward).
    """

    layers: tuple[int, ...]
    router_logits: np.ndarray
    experts: np.ndarray
    scores: np.ndarray
    shared: np.ndarray
    routed: np.ndarray


def _layer_of(t: TextConfig, g: int, j: int) -> int:
    return g * t.scan_period + j


def _capture(config: Llama4Config, params, input_ids, attention_mask, pixel_values, want, moe_impl: str):
    """Run the decoder, returning {(layer, module path): value [B, T, ...]} for the
    captured modules `want(module) -> bool` (plus the MoE's sown router logits)."""
    t = config.text
    dtype = params["params"]["embed"].dtype
    model = TextModel(t, dtype, "xla", moe_impl)
    positions, valid = positions_from_mask(attention_mask)
    embeds = input_embeddings(config, params, input_ids, pixel_values)
    _, state = model.apply(params, input_ids, positions, valid, embeds=embeds,
                           capture_intermediates=lambda mdl, _: want(mdl), mutable=["intermediates"])
    B, T = input_ids.shape
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        # ['layers', 'layer_j', <module path...>, '__call__' | 'router_logits', tuple index]
        j = int(keys[1].split("_")[1])
        name = "/".join(k for k in keys[2:-1] if k != "__call__")
        for g in range(leaf.shape[0]):  # scanned groups are stacked on the leading axis
            out[(_layer_of(t, g, j), name)] = leaf[g].reshape(B, T, -1)
    return out


def _prepare(config, params, input_ids, attention_mask):
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    if "layers" not in params["params"]:
        raise ValueError("probes need the scanned parameter tree (params['params']['layers']) that load and "
                         "init_params return")
    check_token_ids(input_ids, config.text.vocab_size)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    return config, input_ids, mask


@functools.partial(jax.jit, static_argnames=("config", "moe_impl"))
def _moe_trace(config, params, input_ids, mask, pixel_values, moe_impl):
    from .model.layers import MLP
    from .model.moe import MoE

    got = _capture(config, params, input_ids, mask, pixel_values,
                   lambda m: isinstance(m, MoE) or (isinstance(m, MLP) and m.name == "shared"), moe_impl)
    layers = sorted(config.text.moe_layers)
    stack = lambda name: jnp.stack([got[(i, name)] for i in layers]).astype(jnp.float32)  # noqa: E731
    logits = stack("moe/router_logits")
    shared = stack("moe/shared")
    top, experts = jax.lax.top_k(logits, config.text.num_experts_per_tok)
    return logits, experts.astype(jnp.int32), jax.nn.sigmoid(top), shared, stack("moe") - shared


def moe_trace(config: Llama4Config, params, input_ids, *, attention_mask=None, pixel_values=None,
              moe_impl: str = "ragged") -> MoETrace:
    """Router logits, chosen experts and both halves of every MoE layer's output.

    Arguments as for `llama4_jax.forward` (input_ids int [B, T], optional 0/1
    attention_mask and pixel_values). Padding positions are included; mask them out
    with attention_mask when counting tokens per expert.
    """
    config, input_ids, mask = _prepare(config, params, input_ids, attention_mask)
    if not config.text.moe_layers:
        raise ValueError("this config has no MoE layers (moe_layers is empty): nothing is routed")
    out = _moe_trace(config, params, input_ids, mask, None if pixel_values is None else jnp.asarray(pixel_values),
                     moe_impl)
    logits, experts, scores, shared, routed = (np.asarray(x) for x in out)
    return MoETrace(tuple(sorted(config.text.moe_layers)), logits, experts, scores, shared, routed)


def _softmax_weights(t: TextConfig, flags, attn, h, positions, valid):
    """Attention weights [B, H, T, S] of one layer from its normed input h [B, T, D].

    The same steps as `Attention` + `xla_attention`: projections, RoPE and QK norm on
    RoPE layers or the fp32 temperature scale on NoPE layers, logits in fp32 over
    sqrt(head_dim), the chunked causal mask from positions, softmax in fp32.
    """
    q = jnp.einsum("btd,dhe->bthe", h, attn["q"])
    k = jnp.einsum("btd,dke->btke", h, attn["k"])
    if flags.uses_rope:
        cos, sin = rope_angles(positions, rope_inv_freq(t))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if t.use_qk_norm:
            q, k = rms_norm(q, None, t.rms_norm_eps), rms_norm(k, None, t.rms_norm_eps)
    elif t.attn_temperature_tuning:
        q = (q.astype(jnp.float32) * temperature_scale(positions, t)[:, :, None, None]).astype(q.dtype)
    B, T, H, d = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
    chunk = t.attention_chunk_size if flags.is_chunked else None
    mask = visible(positions, jnp.where(valid, positions, INVALID_POS), chunk)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG), axis=-1)
    return probs.reshape(B, H, T, -1)


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _attention_weights(config, params, input_ids, mask, pixel_values, layers):
    from .model.layers import RMSNorm

    t = config.text
    got = _capture(config, params, input_ids, mask, pixel_values,
                   lambda m: isinstance(m, RMSNorm) and m.name == "attn_norm", "ragged")
    positions, valid = positions_from_mask(mask)
    out = {}
    for i in layers:
        g, j = divmod(i, t.scan_period)
        attn = jax.tree_util.tree_map(lambda w: w[g], params["params"]["layers"][f"layer_{j}"]["attn"])
        out[i] = _softmax_weights(t, t.layer_flags[i], attn, got[(i, "attn_norm")], positions, valid)
    return out


def attention_weights(config: Llama4Config, params, input_ids, *, layers=None, attention_mask=None,
                      pixel_values=None) -> dict[int, np.ndarray]:
    """Softmax attention weights {layer: f32 [B, H, T, T]} (query rows, key columns).

    layers: decoder layer indices (default: all). Each row sums to 1 over the keys the
    query may see: within its chunk on chunked (RoPE) layers, every earlier real token
    on global (NoPE) layers. Memory is B * H * T^2 floats per layer: for inspection at
    notebook lengths, not for long contexts.
    """
    config, input_ids, mask = _prepare(config, params, input_ids, attention_mask)
    L = config.text.num_hidden_layers
    layers = tuple(range(L)) if layers is None else tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{L - 1}")
    out = _attention_weights(config, params, input_ids, mask,
                             None if pixel_values is None else jnp.asarray(pixel_values), layers)
    return {i: np.asarray(v) for i, v in out.items()}
