"""Expert-parallel MoE (`moe_impl='ep'`): experts split over the `expert` mesh axis.

Inside `shard_map`, each device holds T/N of the tokens (N = devices along the token
axes) and E/n of the experts (n = size of the expert axes):

  1. route locally: the R = t*k (token, slot) rows are sorted by expert and scaled by
     their score (the score scales the expert INPUT, as in `dense`); sorted by expert,
     they are also sorted by destination device (expert e lives on device e // (E/n));
  2. dispatch the rows to the devices holding their experts (see the collectives below);
  3. compute: the received rows [n*R, D] run through a local MoE implementation
     (`ragged` by default) on the E/n local experts; with a `tensor` axis in the
     `expert_mlp` rule each device holds an F/tp slice of every local expert and
     produces a partial sum;
  4. combine: the same collective backwards returns each row to its sender, rows are
     summed per token, and the tensor-parallel partial sums are `psum`med.

Collectives (`ep_collective(platform)` picks one at trace time):
  * `ragged_all_to_all` (GPU, TPU): `jax.lax.ragged_all_to_all` sends each device only
    the rows bound for it, straight from the sorted rows (no send buffer); received rows
    are packed by source device, then by local expert. Offsets and sizes come from one
    `all_gather` of every device's per-expert row counts ([n, E] int32) through the pure
    function `ragged_layout`;
  * `all_to_all` (CPU, whose XLA has no ragged all-to-all): one dense `all_to_all` of an
    [n, R, D] buffer, slot j of block d holding the j-th row sent to device d; it moves
    n times the routed rows;
  * `ragged_all_gather`: `ragged_layout`'s packing, with the ragged all-to-all carried
    out by `ragged_all_to_all_by_gather` (the documented semantics through an
    `all_gather` of the operand): the ragged variant end to end on any backend, at n
    times the traffic; the tests run it on CPU against `dense`.

Dropless: each device's receive buffer has room for n*R rows (every row of every
device could pick its experts), so no routing, even every token on one expert, drops
a token.

The mesh and rules come from `llama4_jax.sharding.activate` (which `forward` enters);
the expert axes are the mesh axes of the `expert` rule, the tensor axes those of
`expert_mlp`, and tokens are split over every other non-trivial mesh axis plus the
expert axes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .. import quant, sharding
from ..kernels import platform as _platform
from .experts import ragged_moe, sort_by_expert

COLLECTIVES = ("all_to_all", "ragged_all_to_all", "ragged_all_gather")


def ep_collective(platform: str | None = None) -> str:
    """The dispatch collective of `ep` on `platform` (default `kernels.platform.target()`,
    read at trace time): `ragged_all_to_all` on GPU and TPU, where XLA implements it,
    the dense `all_to_all` elsewhere (XLA:CPU has no ragged all-to-all)."""
    target = _platform.normalize(platform) if platform else _platform.target()
    return "ragged_all_to_all" if target in ("gpu", "tpu") else "all_to_all"


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


class RaggedLayout(NamedTuple):
    """Where every row goes, for one device `me` of n along the expert axes.

    Dispatch (`ragged_all_to_all` arguments, one slice per destination device j):
      input_offsets[j], send_sizes[j]: my rows for device j in my expert-sorted rows;
      output_offsets[j]: where they land in j's receive buffer;
      recv_sizes[i]: how many rows I receive from device i.
    Receive buffer [n*R]: rows from device 0, then 1, ..., packed (source i's rows start
    at recv_offsets[i]), each source's rows ordered by expert; recv_expert / recv_valid
    give each slot's local expert and whether it holds a row (the rest is padding).
    Combine is the same call backwards: my slots recv_offsets[i] (recv_sizes[i] rows)
    go back to device i at return_offsets[i], which is where device i took them from.
    """
    input_offsets: jax.Array
    send_sizes: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array
    recv_offsets: jax.Array
    return_offsets: jax.Array
    recv_expert: jax.Array
    recv_valid: jax.Array


def ragged_layout(counts, me, rows: int) -> RaggedLayout:
    """The ragged all-to-all layout from every device's per-expert row counts.

    counts: int32 [n, E], counts[i, e] = rows device i routes to global expert e (all
    devices' counts, e.g. an `all_gather`); me: this device's index along the expert
    axes (int or traced scalar); rows: R, the rows each device routes (t*k). Experts
    e*E/n .. (e+1)*E/n - 1 live on device e // (E/n). Pure: no collective.
    """
    n, E = counts.shape
    E_l = E // n
    counts = counts.astype(jnp.int32)
    C = counts.reshape(n, n, E_l).sum(axis=2)  # C[i, j]: rows device i sends to device j
    start = jnp.cumsum(C, axis=1) - C  # [i, j]: where i's rows for j start among i's sorted rows
    below = jnp.cumsum(C, axis=0) - C  # [i, j]: rows devices < i send to j (i's place in j's buffer)
    # Slot s of my receive buffer: segments (source i, local expert e) in that order, packed.
    seg = jax.lax.dynamic_slice_in_dim(counts, me * E_l, E_l, axis=1)  # [n, E_l] rows from i for my experts
    ends = jnp.cumsum(seg.reshape(-1))  # [n * E_l]
    slot = jnp.arange(n * rows, dtype=jnp.int32)
    which = jnp.searchsorted(ends, slot, side="right")  # segment of each slot (n * E_l: past the end)
    return RaggedLayout(
        input_offsets=start[me], send_sizes=C[me], output_offsets=below[me], recv_sizes=C[:, me],
        recv_offsets=below[:, me], return_offsets=start[:, me],
        recv_expert=(jnp.minimum(which, n * E_l - 1) % E_l).astype(jnp.int32), recv_valid=which < n * E_l)


def ragged_all_to_all_by_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """`jax.lax.ragged_all_to_all`'s documented semantics through an `all_gather` of the
    operand and offsets, for one slice per device: works on every backend, moves n
    times the operand. Device i's slice j, operand[input_offsets[j]:][:send_sizes[j]],
    is written into device j's output at device i's output_offsets[j]; recv_sizes is
    implied by the senders' send_sizes (ragged_all_to_all requires them to agree) and
    unused here.
    """
    del recv_sizes
    n = input_offsets.shape[0]
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [n, N, ...]
    meta = jax.lax.all_gather(jnp.stack([input_offsets, send_sizes, output_offsets]), axis_name)  # [n, 3, n]
    N, M = operand.shape[0], output.shape[0]
    r = jnp.arange(N, dtype=jnp.int32)
    for i in range(n):  # n is the (static) number of devices along axis_name
        src, size, dst = (meta[i, f, me] for f in range(3))
        keep = r < size
        rows = jnp.take(ops[i], jnp.minimum(src + r, N - 1), axis=0)
        output = output.at[jnp.where(keep, dst + r, M)].set(rows, mode="drop")
    return output


def _route(h, idx, score, n, E_l):
    """Rows sorted by expert: (x [R, D] score-scaled, token of each row, expert of each row)."""
    order, tok, _ = sort_by_expert(idx, E_l * n)
    expert = idx.reshape(-1)[order]  # [R] global expert of each sorted row
    x = h[tok] * score.reshape(-1)[order][:, None]
    return x, tok, expert


def _experts(recv_x, recv_e, valid, gate, up, down, local_impl, dtype):
    """The local experts on received rows. Rows arrive already scaled by their score, so
    the local implementation scales by 1 (exact) and empty slots by 0; empty slots sit
    on the last local expert."""
    E_l = gate.shape[0]
    local_idx = jnp.where(valid, recv_e, E_l - 1)[:, None]
    return local_impl(recv_x, {"gate": gate, "up": up, "down": down}, local_idx, valid.astype(dtype)[:, None])


def _local_ep_all_to_all(h, gate, up, down, idx, score, *, n, ep, tp, local_impl):
    """Per-device body, dense all_to_all: h [t, D], idx/score [t, k], experts
    [E/n, D, F/tp] (float or quantized) -> [t, D]."""
    t, D = h.shape
    R = t * idx.shape[1]
    E_l = gate.shape[0]

    with jax.named_scope("route"):
        x, tok, expert = _route(h, idx, score, n, E_l)
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
        y = _experts(recv_x, recv_e, recv_e < E_l, gate, up, down, local_impl, h.dtype)

    with jax.named_scope("combine"):
        back = jax.lax.all_to_all(y.reshape(n, R, D), ep, 0, 0, tiled=True)
        out = jnp.zeros((t, D), y.dtype).at[tok].add(back[dest, slot])
        if tp:
            out = jax.lax.psum(out, tp)
    return out


def _local_ep_ragged(h, gate, up, down, idx, score, *, n, ep, tp, local_impl, a2a):
    """Per-device body, ragged all-to-all (`a2a`: `jax.lax.ragged_all_to_all` or
    `ragged_all_to_all_by_gather`); same shapes as `_local_ep_all_to_all`."""
    t, D = h.shape
    R = t * idx.shape[1]
    E_l = gate.shape[0]

    with jax.named_scope("route"):
        x, tok, expert = _route(h, idx, score, n, E_l)
        counts = jax.lax.all_gather(jnp.bincount(expert, length=n * E_l).astype(jnp.int32), ep)  # [n, E]
        lay = ragged_layout(counts, jax.lax.axis_index(ep), R)

    with jax.named_scope("dispatch"):
        recv_x = a2a(x, jnp.zeros((n * R, D), x.dtype), lay.input_offsets, lay.send_sizes, lay.output_offsets,
                     lay.recv_sizes, axis_name=ep)

    with jax.named_scope("experts"):
        y = _experts(recv_x, lay.recv_expert, lay.recv_valid, gate, up, down, local_impl, h.dtype)

    with jax.named_scope("combine"):
        back = a2a(y, jnp.zeros((R, D), y.dtype), lay.recv_offsets, lay.recv_sizes, lay.return_offsets,
                   lay.send_sizes, axis_name=ep)  # [R, D]: my sorted rows, each through its expert
        out = jnp.zeros((t, D), y.dtype).at[tok].add(back)
        if tp:
            out = jax.lax.psum(out, tp)
    return out


def ep_moe(h, w, idx, score, *, local=ragged_moe, collective: str | None = None):
    """Expert-parallel MoE: h [T, D], experts {'gate','up': [E, D, F], 'down': [E, F, D]},
    idx/score [T, k] -> [T, D]. Needs an active mesh (`sharding.activate`).

    local: the single-device MoE run on each device's local experts (`ragged_moe`).
    collective: one of COLLECTIVES; default `ep_collective()` for the traced platform.
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
    collective = collective or ep_collective()
    if collective == "all_to_all":
        body = functools.partial(_local_ep_all_to_all, n=n, ep=ep, tp=tp, local_impl=local)
    elif collective in ("ragged_all_to_all", "ragged_all_gather"):
        a2a = jax.lax.ragged_all_to_all if collective == "ragged_all_to_all" else ragged_all_to_all_by_gather
        body = functools.partial(_local_ep_ragged, n=n, ep=ep, tp=tp, local_impl=local, a2a=a2a)
    else:
        raise ValueError(f"unknown ep collective {collective!r}; expected one of {COLLECTIVES}")
    # check_vma=False: the local implementation is single-device code (its loops do not
    # declare which mesh axes their carries vary over); every collective here is explicit.
    out = jax.shard_map(body, mesh=sharding._tracing_mesh(mesh),
                        in_specs=(tok_spec, *specs, tok_spec, tok_spec), out_specs=tok_spec,
                        check_vma=False)(
        h, w["gate"], w["up"], w["down"], idx, score)
    return out[:T] if pad else out
