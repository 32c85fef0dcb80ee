"""The early-fusion image path: vision encoder, pixel-shuffle adapter, projector, merge.

    pixel_values [N, C, H, W]          every tile of every image, batch-major
      -> unfold patches (c, ky, kx)    [N, P, C*p*p] @ patch_embed -> [N, P, Dv]
      -> append CLS LAST, + pos emb    [N, P+1, Dv], LayerNorm (pre)
      -> encoder layers                bidirectional attention, 2D RoPE, biased, exact GELU
      -> LayerNorm (post), drop CLS    [N, P, Dv]
      -> pixel shuffle (ratio r)       [N, P*r^2, Dv/r^2]
      -> adapter fc1, GELU, fc2, GELU  [N, P*r^2, Dp]       (HF's `last_hidden_state`)
      -> projector (no bias)           [N*P*r^2, D]
      -> scattered into the `<|patch|>` positions of the text embeddings

Dimension letters: N tiles, P patches per tile, Dv vision width, Hv vision heads,
e vision head dim, F vision MLP width, Dp adapter width, D text width.

Parameters live next to the text decoder's in one tree:
`params['params']['vision']` (the tower and adapter, encoder layers stacked on a
leading `layers` axis) and `params['params']['projector']`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Llama4Config, VisionConfig
from .attention import attend
from .layers import apply_rope, param

__all__ = [
    "VisionModel",
    "Projector",
    "vision_rope_angles",
    "pixel_shuffle",
    "tokens_per_tile",
    "image_features",
    "merge_image_features",
    "check_image_tokens",
]


def tokens_per_tile(v: VisionConfig) -> int:
    """`<|patch|>` tokens one tile becomes: (image_size/patch_size)^2 * ratio^2 (144 for 336/14/0.5)."""
    grid = v.image_size // v.patch_size
    return int(round(grid * grid * v.pixel_shuffle_ratio**2))


def vision_rope_angles(v: VisionConfig) -> np.ndarray:
    """RoPE angles [P+1, e/2] float32 of the 2D (axial) vision rotary embedding.

    Patch n sits at x = n mod g, y = n div g on the g x g grid. Pair j < e/4 rotates by
    (x+1) * f_j, pair j >= e/4 by (y+1) * f_{j-e/4}, with f_k = theta^(-2k/(e/2)).
    Row P is the CLS token: angle 0 (identity). Computed in float32 in the order
    transformers uses, so the table matches its `freqs_ci` to the ulp.
    """
    e = v.hidden_size // v.num_attention_heads
    if e % 4:
        raise ValueError(
            f"vision head_dim = hidden_size/num_attention_heads = {e} must be a multiple of 4 for the 2D RoPE"
        )
    g = v.image_size // v.patch_size
    half = e // 2
    f = (np.float32(1.0) / (np.float32(v.rope_theta) ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2]
                                                          / np.float32(half)))).astype(np.float32)
    n = np.arange(g * g)
    x = (n % g + 1).astype(np.float32)[:, None] * f[None, :]
    y = (n // g + 1).astype(np.float32)[:, None] * f[None, :]
    ang = np.concatenate([x, y], axis=-1).astype(np.float32)
    return np.concatenate([ang, np.zeros((1, half), np.float32)], axis=0)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis with statistics in fp32, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        scale = param(self, "scale", (D,), ("norm",), self.dtype, nn.initializers.ones)
        bias = param(self, "bias", (D,), ("norm",), self.dtype, nn.initializers.zeros)
        return layer_norm(x, scale, bias, self.eps)


def _dense(module, name, x, n_in, n_out, axes, dtype, bias: bool):
    """x @ W (+ b): W [n_in, n_out] is the transposed `nn.Linear` weight."""
    w = param(module, name, (n_in, n_out), axes, dtype)
    y = jnp.einsum("...i,io->...o", x, w)
    if bias:
        y = y + param(module, name + "_bias", (n_out,), axes[1:], dtype, nn.initializers.zeros)
    return y


def gelu(x):
    """Exact (erf) GELU, as `torch.nn.GELU()`; computed in fp32."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class VisionEncoderLayer(nn.Module):
    """x += o(attn(LN(x))); x += fc2(gelu(fc1(LN(x)))). q/k/v/o and the MLP have biases."""

    cfg: VisionConfig
    dtype: Any
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, ctx):
        v, dt = self.cfg, self.dtype
        N, T, Dv = x.shape
        H = v.num_attention_heads
        e = Dv // H
        with jax.named_scope("vision_attention"):
            h = LayerNorm(v.norm_eps, dt, name="attn_norm")(x)
            ax = ("vision_embed", "vision_heads")
            q = _dense(self, "q", h, Dv, Dv, ax, dt, True).reshape(N, T, H, e)
            k = _dense(self, "k", h, Dv, Dv, ax, dt, True).reshape(N, T, H, e)
            val = _dense(self, "v", h, Dv, Dv, ax, dt, True).reshape(N, T, H, e)
            q = apply_rope(q, ctx["cos"], ctx["sin"])
            k = apply_rope(k, ctx["cos"], ctx["sin"])
            # Bidirectional: every key has position 0 and every query position 0, so the
            # causal test k_pos <= q_pos passes everywhere (no chunking).
            o = attend(q, k, val, ctx["pos"], ctx["pos"], chunk_size=None, impl=self.attn_impl)
            x = x + _dense(self, "o", o.reshape(N, T, Dv), Dv, Dv, ("vision_heads", "vision_embed"), dt, True)
        with jax.named_scope("vision_mlp"):
            h = LayerNorm(v.norm_eps, dt, name="mlp_norm")(x)
            h = gelu(_dense(self, "fc1", h, Dv, v.intermediate_size, ("vision_embed", "vision_mlp"), dt, True))
            x = x + _dense(self, "fc2", h, v.intermediate_size, Dv, ("vision_mlp", "vision_embed"), dt, True)
        return x, None


def pixel_shuffle(x, ratio: float):
    """[N, P, C] on a square g x g grid -> [N, P*r^2, C/r^2] with s = 1/r.

    Output token (h', w') (row-major) concatenates x[s*h'+dh, s*w'+dw] over dh, dw,
    at channel dh*s*C + dw*C + c: transformers' two view/permute steps exactly.
    """
    N, P, C = x.shape
    g = int(round(P**0.5))
    s = int(round(1.0 / ratio))
    if g * g != P or g % s or abs(s * ratio - 1.0) > 1e-9:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by 1/ratio; got {P} patches, ratio {ratio}")
    x = x.reshape(N, g // s, s, g // s, s, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, (g // s) ** 2, s * s * C)


class VisionModel(nn.Module):
    """The vision tower and adapter: pixel_values [N, C, H, W] -> [N, P*r^2, Dp].

    The output equals transformers' `Llama4VisionModel(...).last_hidden_state`.
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, pixel_values):
        v, dt = self.cfg, self.dtype
        N, C, Hh, Ww = pixel_values.shape
        p, Dv = v.patch_size, v.hidden_size
        if (C, Hh, Ww) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(
                f"pixel_values must be [tiles, {v.num_channels}, {v.image_size}, {v.image_size}], "
                f"got {tuple(pixel_values.shape)}"
            )
        g = v.image_size // p
        P = g * g
        with jax.named_scope("patch_embed"):
            # Unfold: patch (gy, gx) in row-major order, values in (channel, ky, kx) order.
            x = pixel_values.astype(dt).reshape(N, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
            x = x.reshape(N, P, C * p * p)
            w = param(self, "patch_embed", (C * p * p, Dv), ("vision_patch", "vision_embed"), dt)
            x = jnp.einsum("npk,kd->npd", x, w)
            cls = param(self, "class_embedding", (Dv,), ("vision_embed",), dt)
            x = jnp.concatenate([x, jnp.broadcast_to(cls, (N, 1, Dv))], axis=1)  # CLS goes LAST
            x = x + param(self, "pos_embed", (P + 1, Dv), ("vision_pos", "vision_embed"), dt)
            x = LayerNorm(v.norm_eps, dt, name="pre_norm")(x)

        ang = jnp.asarray(vision_rope_angles(v))[None]  # [1, P+1, e/2]
        ctx = {"cos": jnp.cos(ang), "sin": jnp.sin(ang), "pos": jnp.zeros((N, P + 1), jnp.int32)}
        Layers = nn.scan(
            VisionEncoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=v.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        with jax.named_scope("vision_encoder"):
            x, _ = Layers(v, dt, self.attn_impl, name="layers")(x, ctx)

        x = LayerNorm(v.norm_eps, dt, name="post_norm")(x)[:, :P]  # drop CLS
        with jax.named_scope("vision_adapter"):
            x = pixel_shuffle(x, v.pixel_shuffle_ratio)
            if x.shape[-1] != v.intermediate_size:
                raise ValueError(
                    f"vision intermediate_size={v.intermediate_size} must equal hidden_size/ratio^2="
                    f"{x.shape[-1]} (it is also the adapter's input width)"
                )
            x = gelu(_dense(self, "adapter_fc1", x, x.shape[-1], v.projector_input_dim,
                            ("vision_mlp", "adapter"), dt, False))
            x = gelu(_dense(self, "adapter_fc2", x, v.projector_input_dim, v.projector_output_dim,
                            ("adapter", "adapter_out"), dt, False))
        return x


class Projector(nn.Module):
    """`multi_modal_projector.linear_1`: [..., vision_output_dim] -> [..., D], no bias."""

    vision_output_dim: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = param(self, "kernel", (self.vision_output_dim, self.hidden_size), ("adapter_out", "embed"), self.dtype)
        return jnp.einsum("...i,id->...d", x.astype(self.dtype), w)


def _check_vision(config: Llama4Config) -> VisionConfig:
    if config.vision is None:
        raise ValueError("this config has no vision tower (a text-only Llama4ForCausalLM checkpoint); "
                         "images need a Llama4ForConditionalGeneration checkpoint")
    v = config.vision
    if v.projector_output_dim != v.vision_output_dim:
        raise ValueError(f"vision projector_output_dim={v.projector_output_dim} must equal "
                         f"vision_output_dim={v.vision_output_dim} (the projector's input width)")
    return v


def image_features(config: Llama4Config, params, pixel_values, *, attn_impl: str = "xla"):
    """Projected image tokens [N * P*r^2, D] in the text dtype, in tile order.

    params: the full tree `{'params': {..., 'vision': ..., 'projector': ...}}`.
    """
    v = _check_vision(config)
    p = params["params"]
    dt = p["vision"]["patch_embed"].dtype
    feats = VisionModel(v, dt, attn_impl).apply({"params": p["vision"]}, pixel_values)
    feats = feats.reshape(-1, feats.shape[-1])
    proj = Projector(v.vision_output_dim, config.text.hidden_size, p["projector"]["kernel"].dtype)
    return proj.apply({"params": p["projector"]}, feats)


def merge_image_features(embeds, input_ids, features, image_token_index: int):
    """Scatter image rows into the `<|patch|>` positions of `embeds`.

    embeds [B, T, D], input_ids [B, T], features [M, D]. The k-th `<|patch|>` in
    batch-major, then sequence order, receives row k (transformers' `masked_scatter`).
    The counts must agree (see `check_image_tokens`); inside jit a surplus of
    placeholders would read the last row, so callers check first.
    """
    B, T, D = embeds.shape
    if features.shape[0] == 0:  # no images: nothing to place
        return embeds
    mask = (input_ids == image_token_index).reshape(-1)
    idx = jnp.clip(jnp.cumsum(mask.astype(jnp.int32)) - 1, 0, max(features.shape[0] - 1, 0))
    flat = embeds.reshape(B * T, D)
    rows = features.astype(embeds.dtype)[idx]
    return jnp.where(mask[:, None], rows, flat).reshape(B, T, D)


def check_image_tokens(config: Llama4Config, input_ids, n_tiles: int) -> None:
    """Raise unless the `<|patch|>` count equals n_tiles * tokens_per_tile (host-side check)."""
    v = _check_vision(config)
    n_tok = int(np.sum(np.asarray(input_ids) == config.image_token_index))
    per = tokens_per_tile(v)
    if n_tok != n_tiles * per:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {n_tok} <|patch|> tokens "
            f"(id {config.image_token_index}) but pixel_values hold {n_tiles} tiles x {per} = {n_tiles * per} "
            f"image features"
        )


def init_vision_params(config: Llama4Config, key, dtype):
    """Boxed (logical-axis) parameters of the vision tower and projector."""
    v = _check_vision(config)
    k1, k2 = jax.random.split(key)
    px = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), dtype)
    vis = VisionModel(v, dtype).init(k1, px)["params"]
    proj = Projector(v.vision_output_dim, config.text.hidden_size, dtype).init(
        k2, jnp.zeros((1, v.vision_output_dim), dtype))["params"]
    return {"vision": vis, "projector": proj}
