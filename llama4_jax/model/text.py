"""The Llama 4 text decoder and the functional `forward`.

    x = embed[ids]
    for each layer i (pre-norm residual):
        x += Attention_i(RMSNorm(x))      RoPE + QK norm + chunk mask   (RoPE layers)
                                          temperature-scaled q, global   (NoPE layers)
        x += FFN_i(RMSNorm(x))            MoE or dense SwiGLU
    logits = RMSNorm(x) @ lm_head        (float32)

Layers are scanned in repeating groups of `cfg.scan_period` layers (4 for Scout and
Maverick), so compile time does not grow with depth; group member j is layer
`g * period + j`, and its parameters are stacked on a leading `layers` axis. An
aperiodic pattern is one group of all layers (an unrolled stack) with a leading
axis of 1, so the parameter tree always has the same shape. On CPU, large weights
run unrolled on per-group views of that tree instead (`views.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import LayerFlags, Llama4Config, TextConfig, rope_inv_freq
from ..kernels import default_attention_impl, ring
from ..kernels.reference import segment_positions
from .attention import INVALID_POS, Attention, temperature_scale
from .layers import MLP, RMSNorm, param, rope_angles
from .. import quant, sharding
from .moe import MoE
from .vision import check_image_tokens, image_features, init_vision_params, merge_image_features
from . import views


class DecoderLayer(nn.Module):
    cfg: TextConfig
    flags: LayerFlags
    dtype: Any
    attn_impl: str
    moe_impl: str
    segment_span: int | None = None  # packed rows: the global layers' chunk (`segment_positions`)
    fresh_cache: bool = False  # the cache holds no key yet (`TextModel`)

    @nn.compact
    def __call__(self, x, ctx, cache, group=None):
        cfg = self.cfg
        with jax.named_scope("attention"):
            h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x)
            a, cache = Attention(cfg, self.flags, self.dtype, self.attn_impl, self.segment_span, self.fresh_cache,
                                 name="attn")(h, ctx, cache, group)
            x = x + a
        with jax.named_scope("moe" if self.flags.is_moe else "mlp"):
            h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="ffn_norm")(x)
            if self.flags.is_moe:
                f = MoE(cfg, self.dtype, self.moe_impl, name="moe")(h)
            else:
                f = MLP(cfg.intermediate_size_mlp, self.dtype, name="mlp")(h)
        # The residual stream stays split by batch/sequence only (no-op without a mesh).
        return sharding.constrain(x + f, ("batch", "length", None)), cache


class DecoderGroup(nn.Module):
    """One period of the layer pattern: layers layer_0 .. layer_{p-1}.

    Called on the carry (x, cache, g): the residual stream, the whole cache stacked
    over groups ([G, ...] leaves, or None) and this group's index, so each layer updates
    its slice of the cache in place (a scatter into the carried buffer). Returning the
    cache as a scan output instead would restack a new copy of it on every call. The
    unrolled model passes the group's own entries of a per-group cache ([1, ...]
    leaves) with index 0.
    """

    cfg: TextConfig
    dtype: Any
    attn_impl: str
    moe_impl: str
    with_hidden: bool = False
    segment_span: int | None = None
    fresh_cache: bool = False

    @nn.compact
    def __call__(self, carry, ctx):
        x, cache, g = carry
        new_cache, hidden = {}, []
        for j, flags in enumerate(self.cfg.group_flags):
            name = f"layer_{j}"
            layer = DecoderLayer(self.cfg, flags, self.dtype, self.attn_impl, self.moe_impl, self.segment_span,
                                 self.fresh_cache, name=name)
            x, c = layer(x, ctx, cache.get(name) if cache else None, g)
            if c is not None:
                new_cache[name] = c
            hidden.append(x if self.with_hidden else None)
        return (x, new_cache if cache else None, g + 1), (tuple(hidden) if self.with_hidden else ())


class TextModel(nn.Module):
    """The decoder. `__call__` returns (logits f32 [B, T, V], new cache, hidden states)."""

    cfg: TextConfig
    dtype: Any = jnp.float32
    attn_impl: str = "xla"
    moe_impl: str = "ragged"
    with_hidden: bool = False
    scan_layers: bool = True  # False: groups unrolled, weights per group (see `views.unstack_layers`)
    remat: bool = False  # recompute each layer group's activations in the backward pass (training)

    @nn.compact
    def __call__(self, input_ids=None, positions=None, valid=None, cache_layers=None, *, embeds=None,
                 last_only: bool = False, segment_ids=None, piece=None, fresh_cache: bool = False):
        """last_only: logits of the last position only, [B, 1, V] (prefill of a
        left-padded batch, where that is every row's last real token).
        fresh_cache: `cache_layers` holds no key yet (a prefill's only or first call):
        each layer writes its new keys into it and attends over those alone, not over
        the whole allocation (see `Attention`). Wrong, silently, on a cache that holds
        keys.
        segment_ids int [B, T]: packed rows (training), a new example wherever the id
        changes; each token attends only to its own example, which is computed as if
        alone (`kernels.reference.segment_positions`): `positions` are then derived
        from the ids (pass None), and there is no cache.
        piece: prefill pieces riding along a decode step (`engine.ride`), a dict of
        "ids", "positions", "valid" [L, C], "rows" [L], the cache rows they extend
        (rows whose decode token is invalid), and "last" [L], the index in its piece of
        the token whose logits are returned. A piece must not cross a multiple of the
        attention chunk (see `Attention._attend_with_piece`). The decode step's tokens
        [B, 1] (one per cache row) and the pieces' L x C tokens run as one row through
        every projection, norm and FFN (one read of the weights for both); attention is
        each part's own. Returns logits [B + L, 1, V]: the decode rows', then the
        pieces' "last" tokens'."""
        cfg, dt = self.cfg, self.dtype
        embed = param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
        x = embed[input_ids] if embeds is None else embeds.astype(dt)
        if piece is not None:
            if x.shape[1] != 1 or segment_ids is not None or self.with_hidden or not cache_layers:
                raise ValueError("piece rides along a decode step: input_ids [B, 1], a cache, no segment_ids "
                                 "and no hidden states")
            B, (L, C) = x.shape[0], piece["ids"].shape
            x = jnp.concatenate([embed[piece["ids"]].reshape(1, L * C, -1), x.reshape(1, B, -1)], axis=1)
        x = sharding.constrain(x, ("batch", "length", None))

        span = None
        mask_positions = positions
        if segment_ids is not None:
            if positions is not None or cache_layers:
                raise ValueError("segment_ids (packed rows) derive the positions and run without a cache: "
                                 "pass positions=None and no cache")
            chunk = cfg.attention_chunk_size if any(f.is_chunked for f in cfg.layer_flags) else None
            positions, mask_positions, span = segment_positions(jnp.asarray(segment_ids), valid, chunk)
        ctx = {
            "q_pos": mask_positions,
            "k_pos": jnp.where(valid, mask_positions, INVALID_POS),
        }
        ctx["cos"], ctx["sin"] = rope_angles(positions, rope_inv_freq(cfg))
        ctx["temp"] = temperature_scale(positions, cfg)
        if piece is not None:
            pp = piece["positions"]
            ctx["piece"] = {"q_pos": pp, "k_pos": jnp.where(piece["valid"], pp, INVALID_POS),
                            "temp": temperature_scale(pp, cfg), "rows": piece["rows"]}
            ctx["piece"]["cos"], ctx["piece"]["sin"] = rope_angles(pp, rope_inv_freq(cfg))

        if fresh_cache and (not cache_layers or piece is not None):
            raise ValueError("fresh_cache is for a prefill into an empty cache: pass the cache, and no piece")
        group_args = (cfg, dt, self.attn_impl, self.moe_impl, self.with_hidden, span, fresh_cache)
        cache_in = cache_layers if cache_layers else None
        # jax.checkpoint per group: the backward pass keeps only each group's input.
        group_cls = nn.remat(DecoderGroup) if self.remat else DecoderGroup
        per_group = bool(cache_in) and isinstance(next(iter(cache_in.values())), tuple)
        if self.scan_layers:
            if per_group:
                raise ValueError("a per-group cache (init_cache(per_group=True)) is for the unrolled model "
                                 "(scan_layers=False); the scanned layers take the stacked cache")
            Group = nn.scan(
                group_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=cfg.num_groups,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, new_cache, _), hidden = Group(*group_args, name="layers")((x, cache_in, jnp.int32(0)), ctx)
        else:
            # Unrolled groups whose weights are separate arrays (`layers_{g}`): a scan
            # slices each step's weights out of the stacked array, and XLA on CPU copies
            # that slice before every matmul (3x the memory traffic of a decode step).
            # The cache is per group (`cache.split_groups`) for the same reason: group g
            # reads and writes its own buffers (index 0 of [1, ...] arrays).
            if cache_in and not per_group:
                raise ValueError("the unrolled model (scan_layers=False) takes a per-group cache: "
                                 "init_cache(per_group=True) or cache.split_groups(cache)")
            new_cache, hiddens = cache_in, []
            for g in range(cfg.num_groups):
                mine = {name: entry[g] for name, entry in new_cache.items()} if new_cache else None
                (x, mine, _), h = group_cls(*group_args, name=f"layers_{g}")((x, mine, 0), ctx)
                if new_cache:
                    new_cache = {name: entry[:g] + (mine[name],) + entry[g + 1:] for name, entry in new_cache.items()}
                hiddens.append(h)
            hidden = tuple(jnp.stack(h) for h in zip(*hiddens))
        if piece is not None:  # the decode rows' tokens, then each piece's last one
            last = jnp.take_along_axis(x[0, :L * C].reshape(L, C, -1), piece["last"][:, None, None], axis=1)
            x = jnp.concatenate([x[0, L * C:], last[:, 0]])[:, None]
        elif last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, dt, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed, preferred_element_type=jnp.float32)
        else:
            head = param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)
            logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
        if self.with_hidden:
            # [G, B, T, D] per group member -> layer order (layer = g * period + j).
            stacked = jnp.stack(hidden, axis=1)  # [G, p, B, T, D]
            hidden = stacked.reshape(-1, *stacked.shape[2:])
        return logits, (new_cache if cache_layers is not None else None), hidden


def positions_from_mask(attention_mask, offset=None):
    """Per-row positions [B, T] and validity from a 0/1 mask (left or right padding).

    positions = offset + cumsum(mask) - 1 for real tokens; padding gets the position
    of the row's next real token clipped to >= 0 (never used: its key is invalid).
    """
    valid = attention_mask.astype(bool)
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    pos = jnp.maximum(pos, 0)
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.astype(jnp.int32), valid


def input_embeddings(config, params, input_ids, pixel_values=None):
    """Token embeddings with image features in the `<|patch|>` positions, or None
    without images (the decoder then embeds `input_ids` itself)."""
    if pixel_values is None:
        return None
    feats = image_features(config, params, pixel_values)
    return merge_image_features(params["params"]["embed"][input_ids], input_ids, feats, config.image_token_index)


def _forward_body(config, params, input_ids, attention_mask, attn_impl, moe_impl, with_hidden, pixel_values=None,
                  mesh=None, scan_layers=True):
    t = config.text
    dtype = params["params"]["embed"].dtype
    model = TextModel(t, dtype, attn_impl, moe_impl, with_hidden, scan_layers=scan_layers)
    positions, valid = positions_from_mask(attention_mask)
    embeds = input_embeddings(config, params, input_ids, pixel_values)
    if attn_impl.startswith("ring"):  # zigzag sequence layout over the mesh's `seq` axis

        apply = lambda ids, pos, val, emb: model.apply(params, ids, pos, val, embeds=emb)[::2]  # noqa: E731
        return ring.zigzag_call(apply, mesh, input_ids, positions, valid, embeds)
    logits, _, hidden = model.apply(params, input_ids, positions, valid, embeds=embeds)
    return logits, hidden


@functools.partial(jax.jit, static_argnames=("config", "attn_impl", "moe_impl", "with_hidden", "mesh", "rules",
                                             "scan_layers"))
def _forward(config, params, input_ids, attention_mask, attn_impl, moe_impl, with_hidden, pixel_values=None,
             mesh=None, rules=None, scan_layers=True):
    body = functools.partial(_forward_body, config, attn_impl=attn_impl, moe_impl=moe_impl, with_hidden=with_hidden,
                             mesh=mesh, scan_layers=scan_layers)
    if mesh is None:
        return body(params, input_ids, attention_mask, pixel_values=pixel_values)
    B, T = input_ids.shape
    t = config.text
    out_axes = (sharding.OutAxes(("batch", "length", "vocab"), (B, T, t.vocab_size)),
                sharding.OutAxes((None, "batch", "length", None), (t.num_hidden_layers, B, T, t.hidden_size))
                if with_hidden else None)
    return sharding.call_on_mesh(body, mesh, rules, out_axes, params, input_ids, attention_mask,
                                 pixel_values=pixel_values)


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Raise unless input_ids is an integer [B, T] array with T >= 1 and every id in
    [0, vocab_size). Values are checked only when they are concrete: under `jax.jit`
    an out-of-range id reads a clamped embedding row (JAX's gather semantics)."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None:
        input_ids = np.asarray(input_ids)
        dtype = input_ids.dtype
    if not (jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_):
        raise TypeError(f"input_ids must be integer token ids, got dtype {dtype}")
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(shape)}): need at least one row and one token")
    if isinstance(input_ids, jax.core.Tracer) or not getattr(input_ids, "is_fully_addressable", True):
        return
    lo, hi = int(jnp.min(input_ids)), int(jnp.max(input_ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = np.argwhere(np.asarray(input_ids) == bad)[0]
        raise ValueError(f"token id {bad} at [{where[0]}, {where[1]}] is outside the vocabulary [0, {vocab_size})")


def forward(
    config: Llama4Config,
    params,
    input_ids,
    *,
    attention_mask=None,
    attention_impl: str = "auto",
    moe_impl: str | None = None,
    return_hidden_states: bool = False,
    pixel_values=None,
    mesh=None,
    rules=None,
):
    """Logits [B, T, V] float32 of the text decoder (no cache), optionally with images.

    Args:
      config: a `Llama4Config` (or a bare `TextConfig`).
      params: the parameter tree `{'params': ...}` from `load` or `init_params`.
      input_ids: int [B, T], T >= 1, ids in [0, vocab_size) (see `check_token_ids`:
        TypeError for non-integer ids, ValueError for out-of-range ids or T = 0).
      attention_mask: optional 0/1 [B, T]; left or right padding. Positions, the
        chunk boundaries and the NoPE temperature follow each row's real tokens.
      attention_impl: attention backend (see `llama4_jax.model.attention.backends()`):
        "xla" (the reference), "blockwise", "pallas", "splash", "cudnn", "ring" (needs
        a mesh with a `seq` axis), or "auto", the default
        (`llama4_jax.kernels.default_attention_impl`: on CPU xla up to 256 tokens, then
        blockwise; on GPU cudnn for bf16/fp16 weights, else xla while its scores fit
        4 GiB, then blockwise; splash on TPU).
      moe_impl: "ragged" (only the chosen experts), "dense" (the reference) or "ep"
        (expert parallel over the mesh); default: "ep" when the mesh splits the
        experts evenly, else "ragged". An expert axis that does not divide the
        expert count (5 experts on expert=8) leaves the experts replicated: "ragged"
        runs them on every device, "ep" raises ValueError.
      return_hidden_states: also return the residual stream after every layer,
        [L, B, T, D] (transformers' `hidden_states[1:]`, before the final norm).
      pixel_values: optional [N, 3, S, S] tiles of all images of the batch, in order
        (conditional-generation checkpoints). Their projected features replace the
        `<|patch|>` tokens of input_ids in batch-major order; the placeholder count
        must equal N * tokens per tile (144 for Scout/Maverick).
      mesh: optional device mesh (`llama4_jax.sharding.make_mesh` or `jax.make_mesh`,
        Auto or Explicit axes) the params are sharded on; inputs are split by batch,
        activations constrained by `rules`, and the logits equal the single-device ones.
        Default: the mesh of the params' shardings (`load(path, mesh=...)`), if any.
        A mesh over other devices than the params' raises ValueError (load them with
        `mesh=`); they are never moved silently.
      rules: `llama4_jax.sharding.Rules` (default: `default_rules(mesh)`).

    On CPU, without a mesh, concrete weights of 32 MiB or more run the layers
    unrolled on per-group views of the stacked arrays (`views.unroll_layers`), so no
    call copies the layer weights out of them; the logits equal the scanned layers'.
    """
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    check_token_ids(input_ids, config.text.vocab_size)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mesh = sharding.resolve_mesh(params, mesh, "forward")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [tiles, channels, height, width], got shape {pixel_values.shape}")
        check_image_tokens(config, input_ids, pixel_values.shape[0])
    if mesh is not None:
        rules = sharding.default_rules(mesh) if rules is None else rules
        input_ids, attention_mask = (jax.device_put(a, sharding.batch_sharding(mesh, rules, a.shape))
                                     for a in (input_ids, attention_mask))
    if attention_impl == "auto":
        attention_impl = default_attention_impl(input_ids.shape[1], mesh=mesh,
                                                batch_heads=input_ids.shape[0] * config.text.num_attention_heads,
                                                dtype=params["params"]["embed"].dtype)
    if moe_impl is None:
        moe_impl = "ep" if mesh is not None and sharding.splits_experts(mesh, rules, config.text) else "ragged"
    # On CPU, large concrete weights run on per-group views instead of the scan, which
    # would copy every layer's weights out of the stacked arrays on each call
    # (`views.py`); with at most E routed rows, each expert is read in place too.
    scan_layers = not (mesh is None and not attention_impl.startswith("ring") and views.unroll_layers(params)
                       and views.all_viewable(params))
    if not scan_layers:
        t = config.text
        rows = input_ids.size * t.num_experts_per_tok
        params = views.with_layer_views(params, split=moe_impl == "ragged" and rows <= t.num_local_experts)
    logits, hidden = _forward(config, params, input_ids, attention_mask, attention_impl, moe_impl,
                              return_hidden_states, pixel_values, mesh, rules, scan_layers)
    return (logits, hidden) if return_hidden_states else logits


def _init(config: Llama4Config, key, dtype, vision: bool | None):
    """Boxed variables of the whole model: the decoder, plus the vision tower and
    projector (`params['vision']`, `params['projector']`) for conditional-generation
    configs unless vision=False."""
    model = TextModel(config.text, dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = model.init(key, ids, ids, ids >= 0)  # the decoder's draw does not depend on vision
    if config.vision is not None and vision is not False:
        k_vision = jax.random.fold_in(key, 1)
        variables = {"params": {**variables["params"], **init_vision_params(config, k_vision, dtype)}}
    return variables


def init_params(config: Llama4Config, key, *, dtype="float32", vision: bool | None = None, quantize=None,
                group_size: int | None = None):
    """Random parameters (normal(0.02), norms at 1) with logical-axis metadata removed.

    vision: include the vision tower and projector (default: when the config has one).
    quantize: None, "int8", "int4" or "fp8" (or a `quant.QuantFormat`): the decoder
    layers' weight matrices drawn in `dtype`, then quantized (`quant.quantize_params`);
    group_size: int4 elements per scale (default 128).
    """
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    fmt = quant.as_format(quantize, group_size)
    variables = jax.jit(lambda k: quant.quantize_params(nn.meta.unbox(_init(config, k, jnp.dtype(dtype), vision)),
                                                        fmt))(key)
    return variables


def abstract_params(config: Llama4Config, *, dtype="bfloat16", boxed: bool = False, vision: bool | None = None,
                    quantize=None, group_size: int | None = None):
    """Shapes and dtypes of the parameter tree (no memory), optionally with axis names.

    vision: include the vision tower and projector (default: when the config has one;
    False gives the text decoder alone). quantize / group_size: as for `init_params`;
    the quantized weights' leaves (q, scale, offset) get axis names too (boxed).
    """
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    fmt = quant.as_format(quantize, group_size)
    tree = quant.quantize_params(jax.eval_shape(lambda: _init(config, jax.random.key(0), jnp.dtype(dtype), vision)),
                                 fmt)
    return tree if boxed else nn.meta.unbox(tree)
