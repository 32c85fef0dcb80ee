"""The one Hugging Face name map, and the HF <-> our-layout transforms.

`TEXT_GLOBAL_MAP` / `TEXT_LAYER_MAP` (and `TEXT_EXPERT_MAP`, the per-expert spelling of
the routed experts used by FP8 checkpoints) are the single table from Hugging Face
tensor names to our parameter tree. A second table (the vision tower) plugs into
`checkpoint_entries` the same way. Each row says how an HF tensor becomes one or more
of our leaves and back:

  * "linear": an `nn.Linear` weight [out, in] -> our kernel [in..., out...]
    (transpose, then reshape to the parameter's shape; `n_in` leading dims are input);
  * "same": stored as is (norm weights, embeddings, `experts.down_proj`);
  * "split": the fused `experts.gate_up_proj` [E, D, 2F] -> gate [E, D, F], up [E, D, F].

Layer tensors are stacked on our leading `layers` axis: HF layer i is group
i // period, member `layer_{i % period}`. A row whose name holds `{e}` is one tensor per
expert, stacked on our `expert` axis. `plan_leaves` pairs every parameter leaf with
the entries producing it and checks the table is complete in both directions.

Nothing here reads a file: regions of our leaves are mapped to regions of HF tensors
(`_region_to_hf`), which the readers (`hf.py`) then fetch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..config import Llama4Config
from .base import _flatten


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF suffix (after the layer prefix for layer rules); "{e}" = one tensor per expert
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
# The routed experts spelled one Linear per expert (compressed-tensors FP8 checkpoints,
# transformers' `SequentialLlama4TextExperts`); replaces the two fused `experts.*` rows.
TEXT_EXPERT_MAP: tuple[Rule, ...] = (
    Rule("feed_forward.experts.{e}.gate_proj.weight", ("moe/gate",), "linear"),
    Rule("feed_forward.experts.{e}.up_proj.weight", ("moe/up",), "linear"),
    Rule("feed_forward.experts.{e}.down_proj.weight", ("moe/down",), "linear"),
)
TEXT_GLOBAL_MAP: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), "same"),
    Rule("model.norm.weight", ("final_norm/scale",), "same"),
    Rule("lm_head.weight", ("lm_head",), "linear"),
)
_FUSED_EXPERT_RULES = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")

# The vision tower (`params['vision']`; encoder layers stacked on its leading `layers`
# axis, HF vision layer i at index i) and the projector (`params['projector']`).
VISION_LAYER_MAP: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("attn_norm/scale",), "same"),
    Rule("input_layernorm.bias", ("attn_norm/bias",), "same"),
    Rule("post_attention_layernorm.weight", ("mlp_norm/scale",), "same"),
    Rule("post_attention_layernorm.bias", ("mlp_norm/bias",), "same"),
    Rule("self_attn.q_proj.weight", ("q",), "linear"),
    Rule("self_attn.q_proj.bias", ("q_bias",), "same"),
    Rule("self_attn.k_proj.weight", ("k",), "linear"),
    Rule("self_attn.k_proj.bias", ("k_bias",), "same"),
    Rule("self_attn.v_proj.weight", ("v",), "linear"),
    Rule("self_attn.v_proj.bias", ("v_bias",), "same"),
    Rule("self_attn.o_proj.weight", ("o",), "linear"),
    Rule("self_attn.o_proj.bias", ("o_bias",), "same"),
    Rule("mlp.fc1.weight", ("fc1",), "linear"),
    Rule("mlp.fc1.bias", ("fc1_bias",), "same"),
    Rule("mlp.fc2.weight", ("fc2",), "linear"),
    Rule("mlp.fc2.bias", ("fc2_bias",), "same"),
)
VISION_GLOBAL_MAP: tuple[Rule, ...] = (
    Rule("vision_model.patch_embedding.linear.weight", ("vision/patch_embed",), "linear"),
    Rule("vision_model.class_embedding", ("vision/class_embedding",), "same"),
    Rule("vision_model.positional_embedding_vlm", ("vision/pos_embed",), "same"),
    Rule("vision_model.layernorm_pre.weight", ("vision/pre_norm/scale",), "same"),
    Rule("vision_model.layernorm_pre.bias", ("vision/pre_norm/bias",), "same"),
    Rule("vision_model.layernorm_post.weight", ("vision/post_norm/scale",), "same"),
    Rule("vision_model.layernorm_post.bias", ("vision/post_norm/bias",), "same"),
    Rule("vision_model.vision_adapter.mlp.fc1.weight", ("vision/adapter_fc1",), "linear"),
    Rule("vision_model.vision_adapter.mlp.fc2.weight", ("vision/adapter_fc2",), "linear"),
    Rule("multi_modal_projector.linear_1.weight", ("projector/kernel",), "linear"),
)


def text_prefix(config: Llama4Config) -> str:
    """Prefix of the text tensors: `language_model.` for conditional-generation checkpoints."""
    return "language_model." if config.architecture == "Llama4ForConditionalGeneration" else ""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor (or, for `{e}` rules, one per expert) and where it goes.

    `paths` are full paths in the params tree (without the layer index); `group` is the
    index on the stacked `layers` axis, None for non-layer tensors.
    """

    hf_name: str
    rule: Rule
    paths: tuple[tuple[str, ...], ...]
    group: int | None

    def hf_names(self, num_experts: int) -> list[str]:
        if "{e}" in self.hf_name:
            return [self.hf_name.format(e=e) for e in range(num_experts)]
        return [self.hf_name]


def text_entries(config: Llama4Config, *, experts: str = "fused") -> Iterator[Entry]:
    """Every text tensor of the checkpoint for this config, with its destination.

    experts: "fused" (`experts.gate_up_proj` / `experts.down_proj`, the bf16 layout and
      fbgemm FP8) or "unfused" (`experts.{e}.*_proj.weight`, compressed-tensors FP8).
    """
    t = config.text
    pre = text_prefix(config)
    for rule in TEXT_GLOBAL_MAP:
        if rule.hf == "lm_head.weight" and t.tie_word_embeddings:
            continue
        yield Entry(pre + rule.hf, rule, tuple(("params",) + tuple(p.split("/")) for p in rule.ours), None)
    layer_rules = TEXT_LAYER_MAP
    if experts == "unfused":
        layer_rules = tuple(r for r in TEXT_LAYER_MAP if r.hf not in _FUSED_EXPERT_RULES) + TEXT_EXPERT_MAP
    elif experts != "fused":
        raise ValueError(f"experts must be 'fused' or 'unfused', got {experts!r}")
    p = t.scan_period
    for i, flags in enumerate(t.layer_flags):
        for rule in layer_rules:
            ffn = rule.ours[0].split("/")[0]
            if ffn == "mlp" and flags.is_moe or ffn == "moe" and not flags.is_moe:
                continue
            paths = tuple(("params", "layers", f"layer_{i % p}") + tuple(o.split("/")) for o in rule.ours)
            yield Entry(f"{pre}model.layers.{i}.{rule.hf}", rule, paths, i // p)


def vision_entries(config: Llama4Config) -> Iterator[Entry]:
    """Every vision-tower and projector tensor (none for text-only configs)."""
    if config.vision is None:
        return
    for rule in VISION_GLOBAL_MAP:
        yield Entry(rule.hf, rule, tuple(("params",) + tuple(p.split("/")) for p in rule.ours), None)
    for i in range(config.vision.num_hidden_layers):
        for rule in VISION_LAYER_MAP:
            paths = tuple(("params", "vision", "layers") + tuple(o.split("/")) for o in rule.ours)
            yield Entry(f"vision_model.model.layers.{i}.{rule.hf}", rule, paths, i)


def checkpoint_entries(config: Llama4Config, *, experts: str = "fused") -> list[Entry]:
    """All entries of the name map for this config: the text decoder, then the vision tower."""
    return list(text_entries(config, experts=experts)) + list(vision_entries(config))


# --------------------------------------------------------------------------------------
# Layout transforms: HF array <-> our leaves, whole arrays and regions
# --------------------------------------------------------------------------------------

def hf_shape(rule: Rule, leaf_shape: Sequence[int]) -> tuple[int, ...]:
    """The HF tensor shape that produces our leaf of `leaf_shape` (per layer, per expert)."""
    s = tuple(int(n) for n in leaf_shape)
    if rule.kind == "same":
        return s
    if rule.kind == "linear":
        return (math.prod(s[rule.n_in:]), math.prod(s[: rule.n_in]))
    if rule.kind == "split":
        return s[:-1] + (2 * s[-1],)
    raise AssertionError(rule.kind)  # pragma: no cover - the table is closed


def to_hf(rule: Rule, leaves: tuple[np.ndarray, ...]) -> np.ndarray:
    """Our leaves (one layer) -> the HF array (exact inverse of the reading transform)."""
    if rule.kind == "same":
        return leaves[0]
    if rule.kind == "linear":
        a = leaves[0]
        n_in = int(np.prod(a.shape[: rule.n_in]))
        return np.ascontiguousarray(a.reshape(n_in, -1).T)
    if rule.kind == "split":
        return np.concatenate(leaves, axis=-1)
    raise AssertionError(rule.kind)  # pragma: no cover


def from_hf(rule: Rule, k: int, a: np.ndarray, leaf_shape: Sequence[int]) -> np.ndarray:
    """A whole HF array -> output `k` of `rule` in our layout (the inverse of `to_hf`).

    The readers map regions instead (`_region_to_hf`); this whole-array form serves
    small companions of a weight, such as an FP8 tensor's per-channel scale.
    """
    if rule.kind == "same":
        return a.reshape(tuple(leaf_shape))
    if rule.kind == "linear":
        return np.ascontiguousarray(a.T).reshape(tuple(leaf_shape))
    if rule.kind == "split":
        n = int(leaf_shape[-1])
        return np.ascontiguousarray(a[..., k * n:(k + 1) * n]).reshape(tuple(leaf_shape))
    raise AssertionError(rule.kind)  # pragma: no cover


def _hf_view(rule: Rule, k: int, leaf_shape: Sequence[int]):
    """How HF axes map onto leaf axes for output `k` of a rule.

    Returns (perm, groups, offsets): HF axis `perm[j]` becomes the leaf axes `groups[j]`
    (a contiguous run, in order, whose product is that HF axis' extent); `offsets[j]` is
    added to indices on that HF axis (the gate/up halves of `gate_up_proj`).
    """
    n = len(leaf_shape)
    if rule.kind == "same":
        return tuple(range(n)), tuple((a,) for a in range(n)), (0,) * n
    if rule.kind == "linear":  # HF [out, in] -> ours [in..., out...]
        return (1, 0), (tuple(range(rule.n_in)), tuple(range(rule.n_in, n))), (0, 0)
    if rule.kind == "split":
        offs = (0,) * (n - 1) + (k * int(leaf_shape[-1]),)
        return tuple(range(n)), tuple((a,) for a in range(n)), offs
    raise AssertionError(rule.kind)  # pragma: no cover


def _region_to_hf(rule: Rule, k: int, leaf_shape, region):
    """Map a leaf region to (HF region, per-HF-axis gather indices or None, perm).

    The HF region is the bounding box of the requested elements; the gather indices
    (relative to the box) are only needed when the leaf region does not map onto a
    contiguous HF range (e.g. a slice of `head_dim` inside the fused heads axis).
    """
    perm, groups, offsets = _hf_view(rule, k, leaf_shape)
    hf_region: list[slice | None] = [None] * len(perm)
    gathers: list[np.ndarray | None] = [None] * len(perm)
    for j, (ax, dims, off) in enumerate(zip(perm, groups, offsets)):
        flat = np.zeros((), np.int64)
        for d in dims:
            flat = flat[..., None] * int(leaf_shape[d]) + np.arange(region[d].start, region[d].stop)
        flat = flat.reshape(-1)
        if flat.size == 0:
            lo, hi = off, off
        else:
            lo, hi = int(flat.min()) + off, int(flat.max()) + 1 + off
        hf_region[ax] = slice(lo, hi)
        if flat.size != hi - lo:
            gathers[j] = flat + off - lo
    return tuple(hf_region), gathers, perm


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One of our parameter leaves and where its data comes from.

    shape: the full leaf shape (with the leading `layers` axis for scanned leaves).
    sources: one Entry per group (or a single one for non-layer leaves).
    k: which output of the rule this leaf is (0, or 1 for the `up` half of a split).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[Entry, ...]
    k: int
    stacked: bool


def _expert_layout(config: Llama4Config, names: Iterable[str]) -> str:
    names = set(names)
    moe = [i for i, f in enumerate(config.text.layer_flags) if f.is_moe]
    if not moe:
        return "fused"
    base = f"{text_prefix(config)}model.layers.{moe[0]}.feed_forward.experts."
    if base + "gate_up_proj" in names:
        return "fused"
    if base + "0.gate_proj.weight" in names:
        return "unfused"
    return "fused"  # neither: the missing-tensor error will name the fused tensor


def plan_leaves(config: Llama4Config, abstract, names: Iterable[str]) -> list[Leaf]:
    """Every parameter leaf with the HF entries producing it, in parameter-tree order.

    `names` (the checkpoint's tensor names) only choose the expert layout. Every leaf
    must be produced by the name map and every map row must name a leaf; a mismatch
    is a bug in the table, not in the checkpoint, so it raises AssertionError.
    """
    entries = checkpoint_entries(config, experts=_expert_layout(config, names))
    by_leaf: dict[tuple[str, ...], list[tuple[Entry, int]]] = {}
    for e in entries:
        for k, p in enumerate(e.paths):
            by_leaf.setdefault(p, []).append((e, k))
    leaves, unproduced = [], []
    for path, sds in _flatten(abstract):
        got = by_leaf.pop(path, None)
        if not got:
            unproduced.append("/".join(path))
            continue
        stacked = got[0][0].group is not None
        got.sort(key=lambda ek: -1 if ek[0].group is None else ek[0].group)
        leaves.append(Leaf(path, tuple(sds.shape), tuple(e for e, _ in got), got[0][1], stacked))
    if unproduced or by_leaf:
        raise AssertionError(f"name map and parameter tree disagree: not produced {unproduced}, "
                             f"no such parameter {sorted('/'.join(p) for p in by_leaf)}")
    return leaves
