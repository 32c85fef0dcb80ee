"""Per-group (and per-expert) views of the stacked layer weights, for CPU.

The scanned decoder (`TextModel`) stacks each parameter of a layer group on a leading
`layers` axis [G, ...]. Inside the scan, XLA:CPU copies each step's slice of every
stacked weight before using it, so a call pays a copy of all layer weights: 3x the
memory traffic of a batch-1 decode step, 68 of 320 ms of a 1000-token prefill of the
generate benchmark's model, and most of a decode-sized forward (8 rows of one token
of `benchmarks/forward.py`'s model: 94-120 ms scanned, 41-58 ms on views, three runs).

`TextModel(scan_layers=False)` instead takes the layers as per-group arrays
`layers_0` .. `layers_{G-1}` (`unstack_layers`), and optionally each MoE layer's
routed experts as E separate arrays (`split_expert_layers`, `ExpertList`), which a
decode-sized MoE reads in place. On CPU these are views of the stacked arrays' buffers
(`layers.leading_slices`): no copy, no memory of their own. The decode parameters
also hold each SwiGLU's gate and up fused (`layers.fuse_gate_up`): one product
instead of two, faster on XLA:CPU at decode sizes; those are a copy of the gate and
up weights. `layer_views` keeps them per parameter set (`VIEWS`) so repeated calls on
the same weights make them once.
`generate` and `forward` use them on CPU when the layer weights are large enough
(`unroll_layers`) and the parameters are concrete arrays (not under `jax.jit`).
"""

from __future__ import annotations

import collections
import weakref

import jax

from .layers import ExpertList, fuse_gate_up, leading_slices, viewable

__all__ = ["unstack_layers", "split_expert_layers", "unroll_layers", "layer_views", "all_viewable",
           "with_layers", "with_layer_views", "on_device", "VIEWS", "MAX_VIEWS"]

# Layer weights from which the unrolled program is worth its longer compile.
_UNROLL_MIN_BYTES = 32 << 20


def unstack_layers(params, split_experts: bool = False):
    """Parameters for `TextModel(scan_layers=False)`: the stacked `layers` subtree
    [G, ...] split into per-group subtrees `layers_0` .. `layers_{G-1}`.

    split_experts: also hold each MoE layer's routed experts as E separate arrays
    (`split_expert_layers`).

    On CPU the new arrays are views of the stacked ones (`leading_slices`: no copy,
    each array keeping its sharding); elsewhere, slices."""
    p = dict(params["params"])
    leaves, treedef = jax.tree_util.tree_flatten(p.pop("layers"))
    G = leaves[0].shape[0]
    per_leaf = [leading_slices(x, [(g,) for g in range(G)]) for x in leaves]
    for g in range(G):
        p[f"layers_{g}"] = treedef.unflatten([s[g] for s in per_leaf])
    out = {**params, "params": p}
    return split_expert_layers(out) if split_experts else out


def split_expert_layers(params, fuse: bool = False):
    """Unstacked parameters (`unstack_layers`) whose routed experts (gate, up, down
    under a `moe` module) are held as E separate arrays (`ExpertList`, views on CPU),
    which the `ragged` MoE runs with `rowwise`: a decode step then reads each chosen
    expert in place instead of copying it out of [E, D, F]. The other arrays are
    shared with `params`.

    fuse: also hold every SwiGLU's gate and up (routed experts, shared expert, dense
    MLP) as one `gate_up` weight [..., D, 2F] (`layers.fuse_gate_up`), which a decode
    step reads faster on CPU. Those are new arrays: they take the memory of the gate
    and up weights again (the routed experts' per-expert arrays are views of the fused
    one)."""
    p = {k: _split_experts(v, fuse) if k.startswith("layers_") else v for k, v in params["params"].items()}
    return {**params, "params": p}


def _split_experts(tree, fuse: bool, name: str = ""):
    """Each routed-expert weight (under a `moe` module) as an `ExpertList`; with `fuse`,
    every gate and up pair first fused (`fuse_gate_up`)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _split_experts(v, fuse, k) for k, v in tree.items()}
    if fuse and "gate" in out and "up" in out:
        out["gate_up"] = fuse_gate_up(out.pop("gate"), out.pop("up"))
    if name == "moe":
        for w in ("gate", "up", "gate_up", "down"):
            if w in out:
                out[w] = ExpertList.split(out[w])
    return out


def unroll_layers(params) -> bool:
    """Whether to run the layers on per-group weight arrays (`unstack_layers`): on CPU,
    for layer weights of at least 32 MiB. The per-group arrays are views of the stacked
    ones (no copy), but the unrolled program compiles longer, so smaller weights (which
    the caches' traffic dominates) keep the scan."""
    layers = jax.tree_util.tree_leaves(params["params"]["layers"])
    return jax.default_backend() == "cpu" and sum(x.nbytes for x in layers) >= _UNROLL_MIN_BYTES


# The per-group layer views of the parameters the last calls ran on (`layer_views`),
# so a repeated call on the same weights does not make them again: ~30 us per array,
# 45-64 ms of every `generate` call for the benchmark model on 2 CPU devices (~460
# arrays, 384 of them per expert), ~5 ms with them kept. Keyed by the identities of
# the stacked layer arrays; an entry holds views of their buffers (and the decode
# parameters' fused gate/up weights), never the arrays themselves, and is dropped when
# any of them is collected (dropping a model frees its memory) or when MAX_VIEWS other
# parameter sets were used since.
VIEWS: collections.OrderedDict = collections.OrderedDict()
MAX_VIEWS = 2


def layer_views(params, split: bool, device=None) -> tuple[dict, dict, dict | None]:
    """The `layers_{g}` entries of `unstack_layers(params)` (prefill), of
    `split_expert_layers(..., fuse=True)` of it when `split` (decode: per-expert arrays
    and fused gate/up weights; else the prefill ones), and of
    the prefill ones' copies on `device` (a replicated array's buffer there, no copy;
    None without a device). Kept in `VIEWS` while they are views (CPU, the group and
    expert axes whole on every device); otherwise made anew each call. Kept views hold
    the weight buffers: the parameters must not be donated while they are kept (drop
    them, or clear `VIEWS`, first; `train.init_state` copies them)."""
    leaves, treedef = jax.tree_util.tree_flatten(params["params"]["layers"])
    key = (treedef, tuple(map(id, leaves)), split, device)
    if key in VIEWS:
        VIEWS.move_to_end(key)
        return VIEWS[key]
    p = unstack_layers({"params": {"layers": params["params"]["layers"]}})["params"]
    views = (p, split_expert_layers({"params": p}, fuse=True)["params"] if split else p,
             None if device is None else jax.tree_util.tree_map(lambda x: on_device(x, device), p))
    if all_viewable(params):
        VIEWS[key] = views
        for x in leaves:
            weakref.finalize(x, VIEWS.pop, key, None)
        while len(VIEWS) > MAX_VIEWS:
            VIEWS.popitem(last=False)
    return views


def all_viewable(params) -> bool:
    """Whether every stacked layer array is a concrete CPU array whose group and expert
    axes are whole on every device, so that `layer_views` are views, not copies."""
    return all(viewable(x, min(x.ndim, 2)) for x in jax.tree_util.tree_leaves(params["params"]["layers"]))


def with_layers(params, layers: dict):
    """`params` with its stacked `layers` (if any) replaced by the per-group entries
    `layers` (`layers_{g}`, from `layer_views`), every other array as it is."""
    rest = {k: v for k, v in params["params"].items() if k != "layers"}
    return {**params, "params": {**rest, **layers}}


def with_layer_views(params, split: bool = False):
    """`params` with its stacked layers replaced by their per-group views
    (`layer_views`; per-expert ones too when `split`): the parameters of
    `TextModel(scan_layers=False)`."""
    prefill, decode, _ = layer_views(params, split)
    return with_layers(params, decode if split else prefill)


def on_device(x, device):
    """A replicated array's copy on `device` (no copy made); anything else as it is."""
    if not isinstance(x, jax.Array):
        return x
    return x.addressable_data([s.device for s in x.addressable_shards].index(device))
