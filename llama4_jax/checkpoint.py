"""Hugging Face checkpoints: the one name map, and loading.

`TEXT_LAYER_MAP` / `TEXT_GLOBAL_MAP` are the single table from Hugging Face tensor
names to our parameter tree. Each row says how an HF tensor becomes one or more of
our leaves and back:

  * "linear": an `nn.Linear` weight [out, in] -> our kernel [in..., out...]
    (transpose, then reshape to the parameter's shape; `n_in` leading dims are input);
  * "same": stored as is (norm weights, embeddings, `experts.down_proj`);
  * "split": the fused `experts.gate_up_proj` [E, D, 2F] -> gate [E, D, F], up [E, D, F].

Layer tensors are stacked on our leading `layers` axis: HF layer i is group
i // period, member `layer_{i % period}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from .config import ConfigError, Llama4Config, load_config


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF suffix (after the layer prefix for layer rules)
    ours: tuple[str, ...]  # one or more '/'-joined paths below the layer (or params) root
    kind: str  # "linear" | "same" | "split"
    n_in: int = 1  # input dims of our kernel for "linear"


TEXT_LAYER_MAP: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("attn_norm/scale",), "same"),
    Rule("post_attention_layernorm.weight", ("ffn_norm/scale",), "same"),
    Rule("self_attn.q_proj.weight", ("attn/q",), "linear"),
    Rule("self_attn.k_proj.weight", ("attn/k",), "linear"),
    Rule("self_attn.v_proj.weight", ("attn/v",), "linear"),
    Rule("self_attn.o_proj.weight", ("attn/o",), "linear", n_in=2),
    Rule("feed_forward.gate_proj.weight", ("mlp/gate",), "linear"),
    Rule("feed_forward.up_proj.weight", ("mlp/up",), "linear"),
    Rule("feed_forward.down_proj.weight", ("mlp/down",), "linear"),
    Rule("feed_forward.router.weight", ("moe/router",), "linear"),
    Rule("feed_forward.experts.gate_up_proj", ("moe/gate", "moe/up"), "split"),
    Rule("feed_forward.experts.down_proj", ("moe/down",), "same"),
    Rule("feed_forward.shared_expert.gate_proj.weight", ("moe/shared/gate",), "linear"),
    Rule("feed_forward.shared_expert.up_proj.weight", ("moe/shared/up",), "linear"),
    Rule("feed_forward.shared_expert.down_proj.weight", ("moe/shared/down",), "linear"),
)
TEXT_GLOBAL_MAP: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), "same"),
    Rule("model.norm.weight", ("final_norm/scale",), "same"),
    Rule("lm_head.weight", ("lm_head",), "linear"),
)


def text_prefix(config: Llama4Config) -> str:
    """Prefix of the text tensors: `language_model.` for conditional-generation checkpoints."""
    return "language_model." if config.architecture == "Llama4ForConditionalGeneration" else ""


def to_ours(rule: Rule, x: np.ndarray, shapes: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...]:
    """HF array -> our leaves (shapes give each leaf's per-layer shape)."""
    if rule.kind == "same":
        out = (x,)
    elif rule.kind == "linear":
        out = (x.T,)
    elif rule.kind == "split":
        F = x.shape[-1] // 2
        out = (x[..., :F], x[..., F:])
    else:  # pragma: no cover - the table is closed
        raise AssertionError(rule.kind)
    res = []
    for a, shape in zip(out, shapes):
        if int(np.prod(a.shape)) != int(np.prod(shape)):
            raise ValueError(f"found shape {tuple(x.shape)}, expected one giving {tuple(shape)}")
        res.append(np.ascontiguousarray(a).reshape(shape))
    return tuple(res)


def to_hf(rule: Rule, leaves: tuple[np.ndarray, ...]) -> np.ndarray:
    """Our leaves (one layer) -> the HF array (exact inverse of `to_ours`)."""
    if rule.kind == "same":
        return leaves[0]
    if rule.kind == "linear":
        a = leaves[0]
        n_in = int(np.prod(a.shape[: rule.n_in]))
        return np.ascontiguousarray(a.reshape(n_in, -1).T)
    if rule.kind == "split":
        return np.concatenate(leaves, axis=-1)
    raise AssertionError(rule.kind)  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor and where it goes: `group` is None for non-layer tensors."""

    hf_name: str
    rule: Rule
    paths: tuple[tuple[str, ...], ...]  # full paths in the params tree (without the layer index)
    group: int | None


def text_entries(config: Llama4Config) -> Iterator[Entry]:
    """Every text tensor of the checkpoint for this config, with its destination."""
    t = config.text
    pre = text_prefix(config)
    model_pre = pre + "model."
    for rule in TEXT_GLOBAL_MAP:
        if rule.hf == "lm_head.weight" and t.tie_word_embeddings:
            continue
        yield Entry(pre + rule.hf, rule, tuple(("params",) + tuple(p.split("/")) for p in rule.ours), None)
    p = t.scan_period
    for i, flags in enumerate(t.layer_flags):
        for rule in TEXT_LAYER_MAP:
            ffn = rule.ours[0].split("/")[0]
            if ffn == "mlp" and flags.is_moe or ffn == "moe" and not flags.is_moe:
                continue
            paths = tuple(("params", "layers", f"layer_{i % p}") + tuple(o.split("/")) for o in rule.ours)
            yield Entry(f"{model_pre}layers.{i}.{rule.hf}", rule, paths, i // p)


# --------------------------------------------------------------------------------------
# Reading safetensors
# --------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked."""


def weight_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(path, v))})
        if missing:
            raise CheckpointError(f"{path}: shard(s) named in the index are missing: {', '.join(missing)}")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights (pickled .bin weights are not read)")
    out = {}
    for fn in files:
        full = os.path.join(path, fn)
        try:
            with safe_open(full, framework="np") as f:
                out.update({k: full for k in f.keys()})
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {full}: {e}") from None
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def load_hf(path: str, *, dtype: str = "bfloat16") -> tuple[Llama4Config, dict]:
    """Read an HF Llama 4 checkpoint directory into (config, params) on the host.

    Tensors are read one at a time and written into preallocated stacked arrays.
    """
    from safetensors import safe_open

    from .model.text import abstract_params

    config = load_config(path)
    files = weight_files(path)
    np_dtype = _np_dtype(dtype)
    shapes = abstract_params(config, dtype=dtype)
    params = {}
    G = config.text.num_groups
    handles: dict[str, Any] = {}
    consumed = set()
    try:
        for e in text_entries(config):
            if e.hf_name not in files:
                raise CheckpointError(f"{path}: tensor {e.hf_name} is missing from the checkpoint")
            fn = files[e.hf_name]
            if fn not in handles:
                try:
                    handles[fn] = safe_open(fn, framework="np")
                except Exception as ex:
                    raise CheckpointError(f"cannot read {fn}: {ex}") from None
            try:
                x = handles[fn].get_tensor(e.hf_name)
            except Exception as ex:
                raise CheckpointError(f"cannot read tensor {e.hf_name} from {fn}: {ex}") from None
            leaf_shapes = tuple(_get(shapes, p).shape[1:] if e.group is not None else _get(shapes, p).shape
                                for p in e.paths)
            try:
                parts = to_ours(e.rule, x, leaf_shapes)
            except ValueError as ex:
                raise CheckpointError(f"tensor {e.hf_name}: {ex}") from None
            for p, part in zip(e.paths, parts):
                if e.group is None:
                    _set(params, p, part.astype(np_dtype))
                else:
                    try:
                        buf = _get(params, p)
                    except KeyError:
                        buf = np.empty((G, *part.shape), np_dtype)
                        _set(params, p, buf)
                    buf[e.group] = part
            consumed.add(e.hf_name)
    finally:
        handles.clear()
    leftover = sorted(k for k in files if k not in consumed and not _is_vision(k))
    if leftover:
        raise CheckpointError(f"{path}: unexpected tensors not used by the model: {leftover[:8]}"
                              + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else ""))
    return config, params


def _is_vision(name: str) -> bool:
    return name.startswith(("vision_model.", "multi_modal_projector."))


_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _np_dtype(dtype):
    import ml_dtypes

    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return ml_dtypes.bfloat16 if name == "bfloat16" else _DTYPES[name]
