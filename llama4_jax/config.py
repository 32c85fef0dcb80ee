"""Frozen, hashable configuration for the Llama 4 family.

`Llama4Config` is the top-level object every public function takes. It holds a
`TextConfig` (the decoder) and, for conditional-generation checkpoints, a
`VisionConfig`. Configs are frozen dataclasses made only of scalars and tuples, so
they are hashable and can be passed to `jax.jit` as static arguments.

`from_hf` reads a Hugging Face `config.json` (either `Llama4Config` with a nested
`text_config`, or a bare `Llama4TextConfig`), including real-world variants of the
published files; `to_hf` writes a dict that transformers loads.

Per-layer flags (`uses_rope`, `is_chunked`, `is_moe`) are computed once, here, in
`TextConfig.layer_flags`; everything else reads them from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

__all__ = [
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "Llama4Config",
    "LayerFlags",
    "ConfigError",
    "from_hf",
    "to_hf",
    "load_config",
    "preset",
    "PRESETS",
]


class ConfigError(ValueError):
    """A config.json (or a config value) that this library does not support."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling (the only scaling Llama 4 uses)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LayerFlags:
    """What a decoder layer does, derived once from the config.

    uses_rope: the layer applies RoPE (and QK norm when enabled) and attends within
        its `attention_chunk_size` chunk. `no_rope_layers[i] == 1` means RoPE.
    is_chunked: the layer uses the chunked causal mask. Equal to `uses_rope` in every
        published config; kept separate because `layer_types` may say otherwise.
    is_moe: the feed-forward is the mixture of experts (else the dense MLP).
    """

    uses_rope: bool
    is_chunked: bool
    is_moe: bool


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text decoder. Field names and meanings follow `Llama4TextConfig`."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # routed experts and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] = tuple(range(48))
    no_rope_layers: tuple[int, ...] = (1, 1, 1, 0) * 12  # 1 = RoPE + chunked, 0 = NoPE + global
    chunked_layers: tuple[int, ...] | None = None  # from layer_types; None = same as RoPE layers
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 200000
    eos_token_id: tuple[int, ...] = (200001, 200007, 200008)
    pad_token_id: int | None = 200018

    def __post_init__(self):
        L = self.num_hidden_layers
        if len(self.no_rope_layers) != L:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {L} layers")
        bad = [i for i in self.moe_layers if not 0 <= i < L]
        if bad:
            raise ConfigError(f"moe_layers {bad} are outside 0..{L - 1}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        # A dense model (moe_layers empty, e.g. Llama Guard 4) routes nothing: its expert
        # counts are unused (its config.json may even say 0 experts).
        if self.moe_layers and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_local_experts={self.num_local_experts}"
            )
        if any(f.is_chunked for f in self.layer_flags) and not self.attention_chunk_size:
            raise ConfigError("chunked attention layers need attention_chunk_size")
        if self.floor_scale <= 0:
            raise ConfigError(f"floor_scale must be positive, got {self.floor_scale}")

    # ---- per-layer structure (the one place it is computed) ----
    @property
    def layer_flags(self) -> tuple[LayerFlags, ...]:
        moe = set(self.moe_layers)
        chunked = set(self.chunked_layers) if self.chunked_layers is not None else None
        return tuple(
            LayerFlags(
                uses_rope=bool(r),
                is_chunked=bool(r) if chunked is None else i in chunked,
                is_moe=i in moe,
            )
            for i, r in enumerate(self.no_rope_layers)
        )

    @property
    def scan_period(self) -> int:
        """Length of the repeating group of layers that is scanned.

        The smallest p dividing num_hidden_layers such that layer i has the same flags as
        layer i mod p (4 for Scout and Maverick). An aperiodic pattern gives p = L: one
        group, i.e. an unrolled stack.
        """
        flags = self.layer_flags
        L = len(flags)
        for p in range(1, L + 1):
            if L % p == 0 and all(flags[i] == flags[i % p] for i in range(L)):
                return p
        return L

    @property
    def num_groups(self) -> int:
        return self.num_hidden_layers // self.scan_period

    @property
    def group_flags(self) -> tuple[LayerFlags, ...]:
        return self.layer_flags[: self.scan_period]

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The early-fusion vision encoder (`Llama4VisionConfig`)."""

    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632
    vision_output_dim: int = 4096
    image_size: int = 336
    patch_size: int = 14
    norm_eps: float = 1e-5
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    """A whole checkpoint: text decoder, optional vision tower, special tokens.

    `architecture` records the Hugging Face class the checkpoint was saved from
    ("Llama4ForCausalLM" or "Llama4ForConditionalGeneration"), which decides the
    tensor-name prefixes on export.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = None
    architecture: str = "Llama4ForCausalLM"
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    image_token_index: int = 200092

    def replace(self, **kw) -> "Llama4Config":
        return dataclasses.replace(self, **kw)

    def replace_text(self, **kw) -> "Llama4Config":
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **kw))


# --------------------------------------------------------------------------------------
# Hugging Face config.json
# --------------------------------------------------------------------------------------

# Generic PretrainedConfig bookkeeping and training-only fields: accepted and ignored.
_IGNORED_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "_name_or_path",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range",
    "output_router_logits", "router_aux_loss_coef", "tie_word_embeddings", "attention_dropout",
    "router_jitter_noise", "projector_dropout", "vision_feature_select_strategy", "vision_feature_layer",
    "multi_modal_projector_bias", "quantization_config", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "torchscript", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "add_cross_attention", "tokenizer_class", "prefix", "decoder_start_token_id", "sep_token_id",
    "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "is_decoder",
    "unsloth_fixed", "layer_types", "no_rope_layer_interval", "interleave_moe_layer_step",
    "rope_scaling", "rope_parameters", "rope_theta", "hidden_act",
}
# Fields we read but only support with one value.
_FIXED = {"hidden_act": "silu", "attention_bias": False}
_FIXED_VISION = {"hidden_act": "gelu"}


def _check_unknown(d: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(k for k in d if k not in known and k not in _IGNORED_KEYS and d[k] not in (None, False, [], {}))
    if unknown:
        shown = ", ".join(f"{k}={d[k]!r}" for k in unknown)
        raise ConfigError(f"{where}: unsupported config field(s) with non-default values: {shown}")


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE theta and scaling from `rope_parameters` or the legacy keys."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = float(params.get("rope_theta", d.get("rope_theta", 500000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"unsupported rope_type {rope_type!r}: Llama 4 uses 'default' or 'llama3'")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    if scaling.high_freq_factor < scaling.low_freq_factor:
        raise ConfigError("llama3 rope scaling needs high_freq_factor >= low_freq_factor")
    return theta, scaling


def _as_tuple_ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _text_from_hf(d: Mapping[str, Any]) -> TextConfig:
    fields = {f.name for f in dataclasses.fields(TextConfig)} - {"chunked_layers", "rope_scaling"}
    _check_unknown(d, fields | set(_FIXED) | {"head_dim"}, "text_config")
    for k, v in _FIXED.items():
        if k in d and d[k] != v:
            raise ConfigError(f"text_config: {k}={d[k]!r} is not supported (only {v!r})")
    kw: dict[str, Any] = {}
    defaults = TextConfig()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
              "num_attention_heads", "num_local_experts", "num_experts_per_tok", "floor_scale",
              "max_position_embeddings"):
        if d.get(k) is not None:
            kw[k] = int(d[k])
    hf_defaults = {"vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40}
    for k, v in hf_defaults.items():
        kw.setdefault(k, v)
    L, H = kw["num_hidden_layers"], kw["num_attention_heads"]
    kw["num_key_value_heads"] = int(d.get("num_key_value_heads") or H)
    kw["head_dim"] = int(d.get("head_dim") or kw["hidden_size"] // H)
    for k in ("rms_norm_eps", "attn_scale"):
        if d.get(k) is not None:
            kw[k] = float(d[k])
    if "use_qk_norm" in d:
        kw["use_qk_norm"] = bool(d["use_qk_norm"])
    # Early Scout configs wrote attn_temperature_tuning as the integer 4: non-zero means on.
    if "attn_temperature_tuning" in d:
        kw["attn_temperature_tuning"] = bool(d["attn_temperature_tuning"])
    kw["attention_chunk_size"] = d.get("attention_chunk_size", defaults.attention_chunk_size)
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(d)

    step = int(d.get("interleave_moe_layer_step") or 1)
    moe = d.get("moe_layers")
    kw["moe_layers"] = tuple(int(i) for i in moe) if moe is not None else tuple(range(step - 1, L, step))
    interval = int(d.get("no_rope_layer_interval") or 4)
    no_rope = d.get("no_rope_layers")
    kw["no_rope_layers"] = (
        tuple(int(bool(x)) for x in no_rope) if no_rope else tuple(int((i + 1) % interval != 0) for i in range(L))
    )
    layer_types = d.get("layer_types")
    if layer_types:
        if len(layer_types) != L:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {L} layers")
        bad = sorted(set(layer_types) - {"chunked_attention", "full_attention"})
        if bad:
            raise ConfigError(f"unsupported layer_types {bad}")
        chunked = tuple(i for i, t in enumerate(layer_types) if t == "chunked_attention")
        rope = tuple(i for i, r in enumerate(kw["no_rope_layers"]) if r)
        kw["chunked_layers"] = None if chunked == rope else chunked

    if "eos_token_id" in d:
        kw["eos_token_id"] = _as_tuple_ids(d["eos_token_id"])
    for k in ("bos_token_id", "pad_token_id"):
        if k in d:
            kw[k] = None if d[k] is None else int(d[k])
    if d.get("tie_word_embeddings"):
        kw["tie_word_embeddings"] = True
    return TextConfig(**kw)


def _vision_from_hf(d: Mapping[str, Any]) -> VisionConfig:
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    _check_unknown(d, fields | set(_FIXED_VISION), "vision_config")
    for k, v in _FIXED_VISION.items():
        if k in d and d[k] != v:
            raise ConfigError(f"vision_config: {k}={d[k]!r} is not supported (only {v!r})")
    kw = {f.name: d[f.name] for f in dataclasses.fields(VisionConfig) if d.get(f.name) is not None}
    theta, scaling = _rope_from_hf({**d, "rope_theta": d.get("rope_theta", 10000.0)})
    if scaling is not None:
        raise ConfigError("vision_config: RoPE scaling is not supported for the vision encoder")
    kw["rope_theta"] = theta
    return VisionConfig(**kw)


def from_hf(d: Mapping[str, Any]) -> Llama4Config:
    """Build a `Llama4Config` from a parsed Hugging Face `config.json` dict.

    Accepts `model_type` "llama4" (with `text_config` and `vision_config`) and
    "llama4_text". Raises `ConfigError` naming any unsupported field.
    """
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type == "llama4":
        top_known = {"text_config", "vision_config", "boi_token_index", "eoi_token_index", "image_token_index",
                     "image_token_id", "boi_token_id", "eoi_token_id", "pad_token_id"}
        _check_unknown(d, top_known, "config")
        text = _text_from_hf(d.get("text_config") or {})
        vision = _vision_from_hf(d["vision_config"]) if d.get("vision_config") is not None else VisionConfig()
        return Llama4Config(
            text=text,
            vision=vision,
            architecture=archs[0] if archs else "Llama4ForConditionalGeneration",
            boi_token_index=int(d.get("boi_token_index", d.get("boi_token_id", 200080))),
            eoi_token_index=int(d.get("eoi_token_index", d.get("eoi_token_id", 200081))),
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", 200092))),
        )
    if model_type == "llama4_text":
        return Llama4Config(text=_text_from_hf(d), vision=None, architecture=archs[0] if archs else "Llama4ForCausalLM")
    raise ConfigError(f"unsupported model_type {model_type!r}: expected 'llama4' or 'llama4_text'")


def _text_to_hf(t: TextConfig) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model_type": "llama4_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "intermediate_size_mlp": t.intermediate_size_mlp,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "num_local_experts": t.num_local_experts,
        "num_experts_per_tok": t.num_experts_per_tok,
        "moe_layers": list(t.moe_layers),
        "no_rope_layers": list(t.no_rope_layers),
        "layer_types": ["chunked_attention" if f.is_chunked else "full_attention" for f in t.layer_flags],
        "attention_chunk_size": t.attention_chunk_size,
        "use_qk_norm": t.use_qk_norm,
        "attn_temperature_tuning": t.attn_temperature_tuning,
        "floor_scale": t.floor_scale,
        "attn_scale": t.attn_scale,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if len(t.eos_token_id) != 1 else t.eos_token_id[0],
        "pad_token_id": t.pad_token_id,
        "attention_bias": False,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": t.rope_theta, **dataclasses.asdict(t.rope_scaling)}
    d["rope_parameters"] = rope
    return d


def to_hf(config: Llama4Config) -> dict[str, Any]:
    """The `config.json` dict transformers loads for this config."""
    if config.vision is None:
        return {"architectures": [config.architecture], **_text_to_hf(config.text)}
    v = config.vision
    vision = {
        "model_type": "llama4_vision_model",
        **dataclasses.asdict(v),
        "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
    }
    vision.pop("rope_theta")
    return {
        "architectures": [config.architecture],
        "model_type": "llama4",
        "text_config": _text_to_hf(config.text),
        "vision_config": vision,
        "boi_token_index": config.boi_token_index,
        "eoi_token_index": config.eoi_token_index,
        "image_token_index": config.image_token_index,
        "tie_word_embeddings": config.text.tie_word_embeddings,
    }


def load_config(path: str | os.PathLike) -> Llama4Config:
    """Read `config.json` from a checkpoint directory (or a path to the file)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no config.json at {p}")
    with open(p) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
    return from_hf(d)


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

_SCOUT_TEXT = TextConfig(
    rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192),  # Meta's code and the corrected hub config
    max_position_embeddings=10485760,
)
_MAVERICK_TEXT = dataclasses.replace(
    _SCOUT_TEXT,
    num_local_experts=128,
    moe_layers=tuple(range(1, 48, 2)),
    use_qk_norm=False,
    rope_scaling=None,
    max_position_embeddings=1048576,
)
# Behemoth: Meta announced ~2T total / 288B active parameters with 16 experts (top-1
# plus a shared expert) but never published the dimensions. This is an ESTIMATE: Scout's
# layer pattern widened to hidden 16384 (128 heads, 8 KV heads) with expert width 20480
# and deepened to 112 layers, which gives 1.99T total / 296B active in `abstract_params`.
# Use it for memory planning and sharding experiments only.
_BEHEMOTH_TEXT = dataclasses.replace(
    _SCOUT_TEXT,
    hidden_size=16384,
    intermediate_size=20480,
    intermediate_size_mlp=40960,
    num_hidden_layers=112,
    num_attention_heads=128,
    num_key_value_heads=8,
    head_dim=128,
    moe_layers=tuple(range(112)),
    no_rope_layers=(1, 1, 1, 0) * 28,
)

# Llama Guard 4 (12B): Meta's safety classifier, pruned from Scout. Scout's attention and
# layer pattern (48 layers, width 5120, 40 query / 8 KV heads of 128, chunked RoPE layers
# with a global NoPE layer every 4th, llama3 RoPE scaling) with every routed expert removed:
# each layer is dense, its SwiGLU the width of Scout's shared expert (8192); the vision
# tower is Scout's. `abstract_params` gives 12.0B parameters (11.1B without the vision tower).
_LLAMA_GUARD_4_TEXT = dataclasses.replace(_SCOUT_TEXT, moe_layers=(), intermediate_size_mlp=8192)

_TINY_TEXT = TextConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=48,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    moe_layers=tuple(range(1, 8, 2)),
    no_rope_layers=(1, 1, 1, 0) * 2,
    attention_chunk_size=16,
    floor_scale=16,
    rope_scaling=RopeScaling(16.0, 1.0, 1.0, 64),
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=(2,),
    pad_token_id=0,
)
_TINY_VISION = VisionConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vision_output_dim=64,
    image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64,
)

PRESETS: dict[str, Llama4Config] = {
    "scout": Llama4Config(text=_SCOUT_TEXT, vision=VisionConfig(), architecture="Llama4ForConditionalGeneration"),
    "maverick": Llama4Config(
        text=_MAVERICK_TEXT, vision=VisionConfig(), architecture="Llama4ForConditionalGeneration"
    ),
    "behemoth-estimate": Llama4Config(
        text=_BEHEMOTH_TEXT, vision=VisionConfig(), architecture="Llama4ForConditionalGeneration"
    ),
    "llama-guard-4": Llama4Config(
        text=_LLAMA_GUARD_4_TEXT, vision=VisionConfig(), architecture="Llama4ForConditionalGeneration"
    ),
    "tiny": Llama4Config(text=_TINY_TEXT),
    "tiny-vision": Llama4Config(text=_TINY_TEXT, vision=_TINY_VISION, architecture="Llama4ForConditionalGeneration"),
}


def preset(name: str) -> Llama4Config:
    """A named preset: scout, maverick, behemoth-estimate, llama-guard-4, tiny, tiny-vision."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def rope_inv_freq(t: TextConfig):
    """RoPE inverse frequencies [head_dim/2] in float32, llama3-scaled when configured.

    Computed in float32 numpy in the same operation order as transformers, so the
    table is bitwise what the reference model uses (an ulp here is 1e-3 rad of phase
    at 10^4 tokens).
    """
    import numpy as np

    d = t.head_dim
    # torch evaluates `theta ** e` for a Python-float theta in double and rounds it to
    # fp32; the reciprocal is then fp32. Doing the same here gives the identical table.
    e = (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
    inv = np.float32(1.0) / (np.float64(t.rope_theta) ** e).astype(np.float32)
    s = t.rope_scaling
    if s is None:
        return inv
    L = float(s.original_max_position_embeddings)
    low_wl, high_wl = L / s.low_freq_factor, L / s.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wl, inv / np.float32(s.factor), inv).astype(np.float32)
    # With low == high the middle band is empty; the where keeps the 0/0 out.
    denom = s.high_freq_factor - s.low_freq_factor
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (np.float32(L) / wavelen - np.float32(s.low_freq_factor)) / np.float32(denom if denom else 1.0)
        smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)
