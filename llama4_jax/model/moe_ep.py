"""Expert-parallel MoE (`moe_impl='ep'`): experts split over the `expert` mesh axis.

Inside `shard_map`, each device holds T/N of the tokens (N = devices along the token
axes) and E/n of the experts (n = size of the expert axes):

  1. route locally: the t*k (token, slot) rows are sorted by expert and scaled by
     their score (the score scales the expert INPUT, as in `dense`);
  2. dispatch: rows bound for expert e go to device e // (E/n) of the expert axis
     with one `all_to_all` of a [n, t*k, D] buffer (slot j of device d's block holds
     the j-th row d sends there);
  3. compute: the received rows [n*t*k, D] run through a local MoE implementation
     (`ragged` by default) on the E/n local experts; with a `tensor` axis in the
     `expert_mlp` rule each device holds an F/tp slice of every local expert and
     produces a partial sum;
  4. combine: a second `all_to_all` returns each row to its sender, rows are summed
     per token, and the tensor-parallel partial sums are `psum`med.

Dropless: each destination block has room for all t*k rows a device could send, so no
routing (even every token on one expert) drops a token. The price is a dispatch
buffer n times the routed rows; `jax.lax.ragged_all_to_all` would send only the real
rows, but XLA:CPU does not implement it (jax 0.10), and the dense all-to-all keeps one
code path that runs and is tested everywhere.

The mesh and rules come from `llama4_jax.sharding.activate` (which `forward` enters);
the expert axes are the mesh axes of the `expert` rule, the tensor axes those of
`expert_mlp`, and tokens are split over every other non-trivial mesh axis plus the
expert axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .. import quant, sharding
from .moe import ragged_moe, register_moe, sort_by_expert


def _plan_axes(mesh, rules, num_experts: int, ffn: int, ffn_group: int = 1):
    """(expert axes, tensor axes, token axes) for this mesh, rules and expert shape.

    ffn_group: the F rows of `down` that share a scale (int4 experts: the group size),
    so a tensor split of F keeps every group on one device.
    """
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    ep = tuple(a for a in rules.mesh_axes("expert") if sizes[a] > 1)
    n = math.prod(sizes[a] for a in ep)
    if not ep:
        raise ValueError(f"moe_impl='ep' needs the 'expert' rule to map to a mesh axis of size > 1; rules map it "
                         f"to {rules.mesh_axes('expert')} on mesh {sizes}. Use moe_impl='ragged' without one.")
    if num_experts % n:
        raise ValueError(f"moe_impl='ep': num_local_experts={num_experts} does not divide evenly over the expert "
                         f"mesh axes {ep} of size {n}; use an expert axis whose size divides {num_experts}, "
                         f"or moe_impl='ragged'")
    tp = tuple(a for a in rules.mesh_axes("expert_mlp") if sizes[a] > 1 and a not in ep)
    if ffn % (math.prod(sizes[a] for a in tp) * ffn_group):
        tp = ()  # the weights fell back to unsplit F (see sharding.param_specs); follow them
    eligible = [a for a in mesh.axis_names if sizes[a] > 1 and a not in tp]
    preferred = rules.mesh_axes("batch") + rules.mesh_axes("length") + ep
    tokens = tuple(dict.fromkeys([a for a in preferred if a in eligible] + eligible))
    return ep, tp, tokens


def _local_ep(h, gate, up, down, idx, score, *, n, ep, tp, local_impl):
    """Per-device body: h [t, D], idx/score [t, k], experts [E/n, D, F/tp] (float or
    quantized) -> [t, D]."""
    t, D = h.shape
    k = idx.shape[1]
    R = t * k  # rows this device routes
    E_l = gate.shape[0]
    E = E_l * n

    with jax.named_scope("route"):
        order, tok, _ = sort_by_expert(idx, E)
        expert = idx.reshape(-1)[order]  # [R] global expert of each sorted row
        x = h[tok] * score.reshape(-1)[order][:, None]
        dest = expert // E_l  # [R] device (along the expert axes) holding the expert
        counts = jnp.bincount(dest, length=n)
        start = jnp.cumsum(counts) - counts
        slot = jnp.arange(R) - start[dest]  # position of the row in its destination block

    with jax.named_scope("dispatch"):
        send_x = jnp.zeros((n, R, D), h.dtype).at[dest, slot].set(x)
        send_e = jnp.full((n, R), E_l, jnp.int32).at[dest, slot].set(expert % E_l)  # E_l marks empty
        recv_x = jax.lax.all_to_all(send_x, ep, 0, 0, tiled=True).reshape(n * R, D)
        recv_e = jax.lax.all_to_all(send_e, ep, 0, 0, tiled=True).reshape(n * R)

    with jax.named_scope("experts"):
        # Rows arrive already scaled by their score, so the local implementation scales
        # by 1 (exact) and empty slots by 0; empty slots sit on the last local expert.
        valid = recv_e < E_l
        local_idx = jnp.where(valid, recv_e, E_l - 1)[:, None]
        y = local_impl(recv_x, {"gate": gate, "up": up, "down": down}, local_idx, valid.astype(h.dtype)[:, None])

    with jax.named_scope("combine"):
        back = jax.lax.all_to_all(y.reshape(n, R, D), ep, 0, 0, tiled=True)
        out = jnp.zeros((t, D), y.dtype).at[tok].add(back[dest, slot])
        if tp:
            out = jax.lax.psum(out, tp)
    return out


def ep_moe(h, w, idx, score, *, local=ragged_moe):
    """Expert-parallel MoE: h [T, D], experts {'gate','up': [E, D, F], 'down': [E, F, D]},
    idx/score [T, k] -> [T, D]. Needs an active mesh (`sharding.activate`).

    local: the single-device MoE run on each device's local experts (`ragged_moe`).
    """
    ctx = sharding.active()
    if ctx is None:
        raise ValueError("moe_impl='ep' needs a device mesh: pass mesh= to forward, or trace the model inside "
                         "llama4_jax.sharding.activate(mesh, rules)")
    mesh, rules = ctx
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    E, _, F = w["gate"].shape
    ep, tp, tokens = _plan_axes(mesh, rules, E, F, getattr(w["down"], "group_size", 0) or 1)
    N = math.prod(sizes[a] for a in tokens)
    T = h.shape[0]
    pad = -T % N
    if pad:  # zero rows with zero score: they route somewhere and contribute nothing
        h = jnp.pad(h, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)))
        score = jnp.pad(score, ((0, pad), (0, 0)))
    tok_spec = P(tokens, None)
    w_in = P(ep, None, tp or None)
    w_out = P(ep, tp or None, None)
    specs = [quant.partition_spec(w[name], spec) for name, spec in (("gate", w_in), ("up", w_in), ("down", w_out))]
    n = math.prod(sizes[a] for a in ep)
    body = functools.partial(_local_ep, n=n, ep=ep, tp=tp, local_impl=local)
    # check_vma=False: the local implementation is single-device code (its loops do not
    # declare which mesh axes their carries vary over); every collective here is explicit.
    out = jax.shard_map(body, mesh=sharding._tracing_mesh(mesh),
                        in_specs=(tok_spec, *specs, tok_spec, tok_spec), out_specs=tok_spec,
                        check_vma=False)(
        h, w["gate"], w["up"], w["down"], idx, score)
    return out[:T] if pad else out


register_moe("ep", ep_moe)
