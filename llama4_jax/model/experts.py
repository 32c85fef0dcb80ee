"""Expert computations behind `moe_impl`: the router and one function per strategy.

Each strategy maps (h [T, D], experts {'gate','up': [E, D, F], 'down': [E, F, D]},
idx [T, k] int32, score [T, k]) -> [T, D]; `moe.py` names them in its table (with
`moe_ep.ep_moe`, which dispatches rows across devices and computes them here) and
documents the numerics and the choice between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import quant
from ..kernels import platform as _platform
from .layers import ExpertList, swiglu


def route(h, router, k: int):
    """Top-k expert indices [T, k] and sigmoid scores [T, k] (fp32 sigmoid, cast back)."""
    logits = jnp.einsum("td,de->te", h, router)
    top, idx = jax.lax.top_k(logits, k)
    score = jax.nn.sigmoid(top.astype(jnp.float32)).astype(h.dtype)
    return logits, idx.astype(jnp.int32), score


def _swiglu_experts(x_etd, w):
    g = quant.expert_matmul(x_etd, w["gate"])
    u = quant.expert_matmul(x_etd, w["up"])
    return quant.expert_matmul(u * jax.nn.silu(g), w["down"])


def dense_moe(h, w, idx, score):
    """Reference: all experts on all tokens, inputs scaled by the (mostly zero) score."""
    E = w["gate"].shape[0]
    s_te = jnp.zeros((h.shape[0], E), h.dtype).at[jnp.arange(h.shape[0])[:, None], idx].set(score)
    x_etd = h[None] * s_te.T[:, :, None]
    return _swiglu_experts(x_etd, w).sum(axis=0)


def sort_by_expert(idx, num_experts: int):
    """Order the flattened (token, slot) pairs by expert.

    Returns (order [T*k], token_of_row [T*k], group_sizes [E]) where row r of the
    sorted batch is pair order[r], i.e. token token_of_row[r].
    """
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of_row = order // idx.shape[1]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token_of_row, group_sizes


def _sorted_inputs(h, idx, score, num_experts: int):
    """Expert inputs sorted by expert: x [T*k, D] (already score-scaled), order, sizes [E]."""
    order, tok, sizes = sort_by_expert(idx, num_experts)
    x = h[tok] * score.reshape(-1)[order][:, None]
    return x, order, sizes


def _unsort(y, order, num_tokens: int, k: int):
    """Sum the sorted expert outputs y [>= T*k, D] back per token: [T, D].

    Uses the inverse permutation as a gather (cheaper than a scatter-add on CPU).
    """
    n = order.shape[0]
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
    return y[inv].reshape(num_tokens, k, y.shape[-1]).sum(axis=1)


def ragged_dot_moe(h, w, idx, score):
    """Grouped matmul with `jax.lax.ragged_dot`: native on GPU/TPU, a dense fallback on CPU.

    Only the chosen experts are computed where `ragged_dot` is native. On CPU (jax
    0.10) it computes every expert for every row and is slower than `blocked`.
    """
    E = w["gate"].shape[0]
    T, k = idx.shape
    x, order, sizes = _sorted_inputs(h, idx, score, E)
    with jax.named_scope("ragged_dot_experts"):
        g = quant.ragged_dot(x, w["gate"], sizes)
        u = quant.ragged_dot(x, w["up"], sizes)
        y = quant.ragged_dot(u * jax.nn.silu(g), w["down"], sizes)
    return _unsort(y, order, T, k)


# megablox's default tiles (rows, contraction, output columns); untuned (no TPU measured yet).
GMM_TILING = (128, 128, 128)


def _gmm(x, w, sizes, tm: int, interpret: bool):
    """megablox `gmm(x [R, K], w [E, K, N], sizes [E]) -> [R, N]` in x's dtype, R % tm == 0."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    return gmm(x, w, sizes, x.dtype, (tm,) + GMM_TILING[1:], None, None, False, interpret)


def gmm_moe(h, w, idx, score, *, interpret: bool | None = None):
    """Grouped matmul with jax's megablox `gmm` (Pallas TPU): the `ragged` strategy on TPU.

    Same layout as `ragged_dot_moe` (rows sorted by expert, weights [E, D, F] /
    [E, F, D] as stored). `gmm` needs the row count to be a multiple of its row tile
    (min(128, rows rounded up to 16)), so zero rows are appended and counted into the
    last expert's group: every output row then belongs to a group (`gmm` leaves rows
    outside all groups unwritten), and a zero row's output is exactly zero. It
    accumulates in fp32 and returns the activation dtype; its custom VJP (megablox's
    `gmm`/`tgmm` kernels) makes it trainable. Float weights only (bf16/fp32);
    `ragged_strategy` sends quantized experts to `ragged_dot`. Compiled on TPU,
    interpreted elsewhere (`interpret` defaults to that).
    """
    if any(quant.is_quantized(w[n]) for n in ("gate", "up", "down")):
        raise ValueError("moe_impl='gmm' takes float (bf16/fp32) experts; for quantized ones use 'ragged' "
                         "(ragged_dot on TPU) or 'ragged_dot'")
    if interpret is None:
        interpret = _platform.target() != "tpu"
    E = w["gate"].shape[0]
    T, k = idx.shape
    x, order, sizes = _sorted_inputs(h, idx, score, E)
    n = x.shape[0]
    tm = min(GMM_TILING[0], -(-n // 16) * 16)
    pad = -n % tm
    x = jnp.pad(x, ((0, pad), (0, 0)))
    sizes = sizes.at[E - 1].add(pad)
    with jax.named_scope("gmm_experts"):
        g = _gmm(x, w["gate"], sizes, tm, interpret)
        u = _gmm(x, w["up"], sizes, tm, interpret)
        y = _gmm(u * jax.nn.silu(g), w["down"], sizes, tm, interpret)
    return _unsort(y[:n], order, T, k)


def block_rows(num_rows: int, num_experts: int) -> int:
    """Rows per block matmul of `blocked_moe` for T*k = `num_rows` routed rows.

    The smallest power of two >= the mean group size, clamped to [8, 32]: one block
    per expert at decode sizes (8 rows cost the same as 1, the weights dominate), and
    32 rows at prefill, where the padding of each expert's last block stays small
    (about E * 16 rows on average). From a mean of 64 rows per expert, 128 rows: each
    block then costs its loop step, row slices and switch once for 4x the rows, which
    outweighs the padding (under half of an expert's rows at these sizes). Each group's
    last rows now run in a smaller block (`block_ladder`), which cuts that padding to
    under an eighth of a block; the sizes below were measured before it, and block
    sizes of 32 / 64 / 128 and 256 with the ladder measured within this shared
    machine's noise of these choices at T = 256 .. 8192.

    Measured (2 cores, XLA:CPU with YNNPACK, medians of 9): 8 chained layers of the
    benchmark model's experts (16 `ExpertList` experts, D=256, F=512, top-1), ms for
    blocks of 16 / 32 / 64 / 128 rows: T=256: 43 / 46 / 68 / 86; T=512: 51 / 57 /
    71 / 86; T=1024: 103 / 113 / 94 / 91; T=1536: 148 / 131 / 139 / 92; T=2048:
    209 / 194 / 177 / 146. Earlier, at T*k=2048, D=512, F=1024: 16 rows 126 ms, 32
    rows 91, 64 rows 128, 128 rows 188 (before XLA:CPU's YNNPACK matmuls).
    """
    mean = -(-num_rows // num_experts)
    if mean >= 64:
        return 128
    return int(min(32, max(8, 1 << max(0, mean - 1).bit_length())))


def block_ladder(block: int) -> tuple[int, ...]:
    """The row counts a group's blocks may take in `grouped_swiglu`:
    `block`, and eighths of it in steps of at least 8 rows (8 / 16 / 24 / 32 for a
    32-row block; 16 / 32 / ... / 128 for 128). A group runs full blocks, then its last
    rows in the smallest block that holds them, so it pads fewer than block / 8 rows
    (at least 8) instead of up to block - 1.

    Measured (2 cores, 8 chained MoE layers of the generate benchmark's experts: 16 of
    D=256, F=512, top-1; the best of 2-4 runs of medians of 7, this shared machine
    being noisy), ms with one block size / with the ladder, forward: T=256 22.0 / 21.4,
    T=512 35.8 / 32.5, T=1024 77.5 / 53.1 (a ~64-row group in one 128-row block
    computed twice its rows), T=2048 106.2 / 89.2, T=4096 194.9 / 176.4. A train step
    of `benchmarks/train.py` (4 x 256 tokens, 16 experts of D=512, F=1024): 1.45 / 1.61 s
    against 1.69 / 1.90 s (two runs each, alternated).
    """
    step = max(8, block // 8)
    return tuple(range(step, block, step)) + (block,)


def _expert_blocks(sizes, ladder: tuple[int, ...], carry, step, local_init=None, local_done=None):
    """Visit the rows of every non-empty expert group in blocks, in group order.

    Rows are sorted by expert (group e starts at start_e). A while loop runs over the
    experts that received rows; an inner while loop walks each group in blocks of
    `ladder[-1]` rows while more than that many remain, then one block of the smallest
    ladder size that holds the rest. It calls step(which, e, r0, keep, carry, local) ->
    (carry, local), with ladder[which] the block's rows, r0 its first row, and keep
    [ladder[-1], 1] marking the rows that belong to expert e (a group's last block may
    overlap the next group; rows past ladder[which] are never kept). `local` is
    per-expert state, from local_init(e) and folded into the carry by
    local_done(e, carry, local) after the expert's blocks (so per-expert accumulators
    stay small and are written once). Trip counts are data dependent, so empty experts
    cost nothing.
    """
    starts = jnp.cumsum(sizes) - sizes
    active = jnp.argsort(sizes == 0, stable=True).astype(jnp.int32)  # non-empty experts first
    n_active = jnp.sum(sizes > 0).astype(jnp.int32)
    rungs = jnp.asarray(ladder, jnp.int32)
    lane = jnp.arange(ladder[-1], dtype=jnp.int32)[:, None]

    def expert_step(c):
        i, carry = c
        e = active[i]
        end = starts[e] + sizes[e]

        def block_step(c):
            r0, carry, local = c
            left = end - r0
            # The smallest rung >= left, or the largest (a full block) while more remain.
            which = jnp.minimum(jnp.searchsorted(rungs, left), len(ladder) - 1).astype(jnp.int32)
            carry, local = step(which, e, r0, lane < jnp.minimum(left, rungs[which]), carry, local)
            return r0 + rungs[which], carry, local

        local = local_init(e) if local_init else ()
        _, carry, local = jax.lax.while_loop(lambda c: c[0] < end, block_step, (starts[e], carry, local))
        return i + 1, (local_done(e, carry, local) if local_done else carry)

    return jax.lax.while_loop(lambda c: c[0] < n_active, expert_step, (jnp.int32(0), carry))[1]


_expert = quant.take  # expert e's [D, F] / [F, D] slice of a float or quantized weight


def _expert_swiglu(x, gate, up, down, e):
    """Rows x through expert e: its weights sliced out of stacked arrays, or, for an
    `ExpertList`, a `lax.switch` whose branch e reads that expert's buffers in place
    (a branch returning the weights would copy them); there, up None: gate holds gate
    and up fused (`layers.fuse_gate_up`)."""
    if isinstance(gate, ExpertList):
        ups = (None,) * len(gate.parts) if up is None else up.parts
        return jax.lax.switch(e, [lambda x, g=g, u=u, d=d: swiglu(x, g, u, d)
                                  for g, u, d in zip(gate.parts, ups, down.parts)], x)
    return swiglu(x, _expert(gate, e), _expert(up, e), _expert(down, e))


def _rows(x, r0, block):
    return jax.lax.dynamic_slice_in_dim(x, r0, block)


def _put_rows(out, r0, keep, rows):
    """Write the kept rows of a block into out at r0 (the others keep their value)."""
    old = jax.lax.dynamic_slice_in_dim(out, r0, rows.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, rows, old), r0, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def grouped_swiglu(x, gate, up, down, sizes, block: int):
    """SwiGLU of rows grouped by expert: y[r] = down_e(silu(x[r] gate_e) * (x[r] up_e)).

    x [R + block, D] rows sorted by expert (the last `block` rows zero slack, so no
    block slice runs off the end: dynamic_slice would clamp its start and silently
    shift the block); sizes [E] rows per expert; gate/up [E, D, F], down [E, F, D].
    Returns y [R + block, D] (slack rows zero). Each group runs in blocks of `block`
    rows and ends in the smallest `block_ladder` block that holds its last rows. An
    expert's weights are sliced once for all its blocks, in the stored layout ([D, F]
    and [F, D] are what `x @ w` consumes).

    Differentiable through a custom VJP: the backward pass walks the same blocks,
    recomputes the block's gate/up activations, and accumulates each expert's weight
    gradients in the loop carry (rows of other experts are masked out of the block).
    The forward pass also takes quantized weights (`quant.QuantizedWeight`) and
    `ExpertList` ones (each expert's buffers read in place, `_expert_swiglu`); the
    backward pass needs stacked float ones.
    """
    ladder = block_ladder(block)
    stacked = not isinstance(gate, ExpertList)

    def rung(b):
        def rows(r0, e, w):
            xb = _rows(x, r0, b)
            yb = swiglu(xb, *w) if stacked else _expert_swiglu(xb, gate, up, down, e)
            return jnp.pad(yb, ((0, block - b), (0, 0)))
        return rows

    def step(which, e, r0, keep, y, w):
        # Only the block's rows pass through the switch (each rung a matmul of its own
        # size, padded to `block` rows); y is written outside it, so the switch never
        # carries the [R + block, D] output (which it would copy).
        yb = jax.lax.switch(which, [rung(b) for b in ladder], r0, e, w)
        return _put_rows(y, r0, keep, yb), w

    def weights(e):
        # The expert's weights, sliced once for all its blocks: a slice feeding the
        # switch is a copy (per block, the forward took up to 1.6x as long at 4096 rows).
        return (_expert(gate, e), _expert(up, e), _expert(down, e)) if stacked else ()

    return _expert_blocks(sizes, ladder, jnp.zeros_like(x), step, weights)


def _grouped_swiglu_fwd(x, gate, up, down, sizes, block):
    quant.check_trainable(gate, up, down)
    return grouped_swiglu(x, gate, up, down, sizes, block), (x, gate, up, down, sizes)


def _grouped_swiglu_bwd(block, res, dy):
    x, gate, up, down, sizes = res
    f32 = jnp.float32

    def rung(b):
        def grads(r0, keep, w):
            """dx of the block's rows (padded to `block`) and its weight gradients."""
            wg, wu, wd = w
            xb = _rows(x, r0, b)
            dyb = jnp.where(keep[:b], _rows(dy, r0, b), 0)  # rows of other experts contribute nothing
            g, u = xb @ wg, xb @ wu
            sg = jax.nn.sigmoid(g)
            a = g * sg  # silu(g)
            dh = dyb @ wd.T
            du = dh * a
            dg = dh * u * (sg * (1 + g * (1 - sg)))  # silu'(g)
            dxb = jnp.pad(dg @ wg.T + du @ wu.T, ((0, block - b), (0, 0)))
            return dxb, ((xb.T @ dg).astype(f32), (xb.T @ du).astype(f32), ((a * u).T @ dyb).astype(f32))
        return grads

    def step(which, e, r0, keep, carry, local):
        # The expert's weight gradients accumulate in fp32 over its blocks, in the loop
        # carry ([D, F], not the [E, D, F] tensor: that would be rewritten every block);
        # as in the forward pass, the switch carries only the block's own arrays.
        dx, dws = carry
        w, acc = local
        dxb, dw = jax.lax.switch(which, [rung(b) for b in ladder], r0, keep, w)
        return (_put_rows(dx, r0, keep, dxb), dws), (w, tuple(s + d for s, d in zip(acc, dw)))

    def local_init(e):
        w = (_expert(gate, e), _expert(up, e), _expert(down, e))  # sliced once per expert
        return w, tuple(jnp.zeros(t.shape[1:], f32) for t in (gate, up, down))

    def local_done(e, carry, local):
        dx, dws = carry
        dws = tuple(jax.lax.dynamic_update_index_in_dim(w, l.astype(w.dtype), e, 0) for w, l in zip(dws, local[1]))
        return dx, dws

    ladder = block_ladder(block)
    init = (jnp.zeros_like(x), (jnp.zeros_like(gate), jnp.zeros_like(up), jnp.zeros_like(down)))
    dx, (dg_w, du_w, dd_w) = _expert_blocks(sizes, ladder, init, step, local_init, local_done)
    return dx, dg_w, du_w, dd_w, None


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def blocked_moe(h, w, idx, score, *, block: int | None = None):
    """Grouped matmul for CPU: per expert, its rows in blocks of `block` rows.

    Rows are sorted by expert and run through `grouped_swiglu`: [block, D] x [D, F]
    matmuls over each non-empty expert's full blocks, then its last rows in the
    smallest `block_ladder` block that holds them. Rows of that block that belong to
    the next group are computed but not written, so every row is written by its own
    expert only. Empty experts cost nothing; the work is T*k rows plus fewer than
    max(8, block / 8) rows of padding per non-empty expert.
    Differentiable (custom VJP of `grouped_swiglu`), so it also trains.
    """
    E = w["gate"].shape[0]
    T, k = idx.shape
    D = h.shape[-1]
    n_rows = T * k
    block = block or block_rows(n_rows, E)
    x, order, sizes = _sorted_inputs(h, idx, score, E)
    x = jnp.concatenate([x, jnp.zeros((block, D), x.dtype)])
    with jax.named_scope("blocked_experts"):
        y = grouped_swiglu(x, w["gate"], w["up"], w["down"], sizes, block)
    return _unsort(y[:n_rows], order, T, k)


# Beyond this many rows the unrolled `rowwise` program only costs compile time; `ragged`
# picks it for T*k <= E (Maverick: 128).
ROWWISE_MAX_ROWS = 1024


def rowwise_moe(h, w, idx, score):
    """Decode-sized MoE: each of the T*k (token, slot) rows multiplies its own expert's slice.

    On stacked weights, an unrolled loop over the rows (T*k is static), no sort and no
    while loop. That matters inside the scanned layer stack: there the weight slice
    w[e] of this layer is one dynamic-slice of the stacked [G, E, D, F] parameter, so
    XLA reads only the chosen experts. (Behind a while loop, as in `blocked`, the scan
    first copies the layer's whole [E, D, F] tensor to feed the loop.) With
    `ExpertList` weights (never scanned) a `fori_loop` over the rows runs a
    `lax.switch` whose branch reads the row's expert's buffers in place
    (`_expert_swiglu`).
    Reads T*k expert slices, so it is the right choice only when T*k <= E; `ragged`
    switches at that point.

    Rows that chose the same expert read it once each, which beat running every chosen
    expert over all T rows (zero-scaled where not chosen). Measured on 2 cores, 8 chained MoE layers of the benchmark model's
    shapes (16 `ExpertList` experts, D=256, F=512, top-1, medians of 100), with the
    rows unrolled: T=2 1.42 ms, T=4 2.64, T=8 7.8, T=16 16.6, against 2.34 / 5.24 /
    13.8 / 25.1 ms for one `lax.cond` per expert running all T rows through each chosen
    expert (each read once); the loop over rows below then measured 5.7 ms at T=8
    against 6.2 unrolled.
    """
    T, k = idx.shape
    if T * k > ROWWISE_MAX_ROWS:
        raise ValueError(
            f"moe_impl='rowwise' unrolls one matmul chain per routed row: expected T*k <= "
            f"{ROWWISE_MAX_ROWS}, found T*k = {T}*{k} = {T * k}; use 'blocked' or 'ragged' for this size"
        )
    if T * k == 0:
        return jnp.zeros_like(h)
    x = (h[:, None, :] * score[:, :, None]).reshape(T * k, h.shape[-1])
    flat = idx.reshape(-1)
    gate, up, down = w["gate"], w["up"], w["down"]
    with jax.named_scope("rowwise_experts"):
        if isinstance(gate, ExpertList):
            # A loop over the rows, one switch each: the E branches compile once, not once
            # per row (unrolled, the benchmark model's batch-8 decode compiled in 31 s
            # instead of 8; the loop ran as fast).
            def row(r, y):
                yr = _expert_swiglu(jax.lax.dynamic_slice_in_dim(x, r, 1), gate, up, down, flat[r])
                return jax.lax.dynamic_update_slice_in_dim(y, yr, r, 0)

            y = jax.lax.fori_loop(0, T * k, row, jnp.zeros_like(x))
        else:
            y = jnp.concatenate([_expert_swiglu(x[r:r + 1], gate, up, down, flat[r]) for r in range(T * k)])
    return y.reshape(T, k, -1).sum(axis=1)


def ragged_strategy(num_rows: int, num_experts: int, platform: str | None = None, *, quantized: bool = False) -> str:
    """The strategy `ragged` uses for T*k = `num_rows` routed rows on `platform`.

    platform defaults to `kernels.platform.target()` (JAX's default backend, read at
    trace time).
      * TPU: `gmm` (megablox's Pallas grouped matmul) for float experts; `ragged_dot`
        for quantized ones (`gmm` takes bf16/fp32 weights only).
      * GPU: `ragged_dot`, native there.
      * CPU, num_rows <= num_experts (decode): `rowwise`, which reads only the chosen
        experts' weights (a decode step is bound by weight reads).
      * CPU, larger: `blocked`; `lax.ragged_dot` is a dense fallback on CPU (measured
        ~14x slower at prefill sizes, see `block_rows`).
    """
    target = _platform.normalize(platform) if platform else _platform.target()
    if target == "tpu":
        return "ragged_dot" if quantized else "gmm"
    if target != "cpu":
        return "ragged_dot"
    return "rowwise" if num_rows <= min(num_experts, ROWWISE_MAX_ROWS) else "blocked"


def ragged_moe(h, w, idx, score):
    """Only the top-k experts per token, with the strategy `ragged_strategy` picks
    (`ExpertList` weights are CPU decode parameters: its CPU choice, `rowwise` or
    `blocked`, both of which take them)."""
    platform = "cpu" if isinstance(w["gate"], ExpertList) else None
    name = ragged_strategy(idx.size, w["gate"].shape[0], platform, quantized=quant.is_quantized(w["gate"]))
    return _STRATEGIES[name](h, w, idx, score)


# The strategies `ragged` picks among (`ragged_strategy`'s names).
_STRATEGIES = {"ragged_dot": ragged_dot_moe, "gmm": gmm_moe, "blocked": blocked_moe, "rowwise": rowwise_moe}
