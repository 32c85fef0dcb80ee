"""The jitted generation engine: prefill, decode, and the compile cache.

    state = call_compiled(stats, empty_state(**statics))                  # B idle decode slots
    new = call_compiled(stats, prefill, params, ids, mask, samp, budget, pixel_values, src, **statics)
    state = call_compiled(stats, insert(state), state, new, slots, rows, cache_rows)
    state, steps = call_compiled(stats, decode, params, state, samp, budget, limit, **statics)
    state, prompt, steps = call_compiled(stats, ride, params, state, samp, budget, limit, prompt,
                                         piece=piece_size(text, 512), **statics)

`prefill` runs a left-padded batch of P prompts into a fresh KV cache and samples the
first token of K sample rows (row k a sample of prompt src[k], with its own seed), so a
prompt with n samples is run once; `insert` writes rows of such a state into the decode
slots of a running one (continuous batching), each with its prompt's cache rows;
`decode` is one `lax.while_loop` that donates its state (cache included) and runs
until a row finishes, every row is done, or a step limit. Each row keeps its own step
(index of its next token), so a request's tokens and random stream do not depend on
when it entered a slot. `ride` is `decode` with a prompt prefilled into an idle
row in pieces riding along the steps (one device): each step runs the next piece and
every decoding row's token as one row through the layers. All are compiled ahead of time through `call_compiled`, which
keeps the executables across calls and books the compile time apart from prefill and
decode time (`GenerationStats`); the least recently used are dropped past
`MAX_COMPILED` of them, or when the process maps more memory regions than `map_budget`.

With `top_logprobs=k` (static) the state also holds the k most likely tokens and
their log-probabilities per generated token ("top_ids", "top_lps" [B, N, k]); callers
bucket k (`logprob_bucket`) and slice on the host, so requests asking for different k
share one compilation.

With penalties (`empty_state(penalties=True)`, and sampling arrays holding
`sampling.PENALTY_KEYS`) the state also holds each row's token counts ("seen" [B, V]:
its prompt's tokens, and 2 per generation of a token, `sampling.seen_tokens`), which
`prefill` and `ride` set from the prompt and every step updates in place; each step
penalizes its logits with them before drawing (`sampling.penalize`).

Stops are per row: `samp["stop_ids"]` int32 [B, S] holds each row's stop tokens
(padded with -1), so one batch mixes requests that stop at the eos tokens, at tokens
of their own, or at none. With `samp["min_new"]` int32 [B] (only in a run where some
request has a minimum length) a row's stop tokens cannot be drawn before its
min_new-th token (`sampling.suppress_stops`).

Shapes are kept few by buckets: prompt lengths (`prompt_bucket`) and new-token buffers
(`new_token_bucket`) round up to powers of two, or multiples of 512 past 512
(`bucket`), so a notebook calling `generate` with budgets of 100, then 120, then 128
tokens compiles once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .cache import init_cache
from .config import TextConfig
from .model.text import TextModel, positions_from_mask
from .sampling import PENALTY_KEYS, penalize, sample, seen_tokens, suppress_stops
from .sampling import top_logprobs as alternatives

__all__ = ["GenerationStats", "empty_state", "prefill", "insert", "decode", "ride", "piece_size", "to_mesh", "call_compiled", "to_host",
           "bucket", "prompt_bucket", "new_token_bucket", "logprob_bucket",
           "COMPILED", "default_compile_cache", "use_compile_cache", "is_compiled", "Costs", "COSTS"]

MIN_BUCKET = 16  # smallest prompt-length and new-token bucket


@dataclasses.dataclass
class GenerationStats:
    """Counts and timings of a run (seconds; compile time is kept apart).

    prompts: completions made (a prompt with `n` samples counts n times);
    prompt_tokens: tokens prefilled; generated_tokens: tokens in the completions;
    prefill_s / decode_s: time in the prefill and decode executables (compilation
    excluded); compile_s: time compiling them; decode_steps: decode loop iterations
    (each one feeds every slot one token); ridden_tokens: the prompt tokens among
    prompt_tokens that were prefilled riding along decode steps (`ride`: their time
    is in decode_s).
    """

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    decode_steps: int = 0
    ridden_tokens: int = 0

    def summary(self) -> str:
        def rate(tokens, seconds):  # a part that took no time (no decode step: every row ended at its first token)
            return f"{tokens / seconds:.1f} tok/s" if seconds else "no time"

        alone = self.prompt_tokens - self.ridden_tokens
        rode = f" ({self.ridden_tokens} prefilled along decode steps)" if self.ridden_tokens else ""
        return (f"{self.prompts} prompts, {self.prompt_tokens} prompt tokens{rode}, {self.generated_tokens} generated "
                f"tokens; prefill {rate(alone, self.prefill_s)} ({self.prefill_s:.2f} s), decode "
                f"{rate(self.generated_tokens, self.decode_s)} ({self.decode_s:.2f} s), compile {self.compile_s:.2f} s")


def _model(text: TextConfig, params, attn_impl, moe_impl, scan_layers: bool = True):
    return TextModel(text, params["params"]["embed"].dtype, attn_impl, moe_impl, scan_layers=scan_layers)


def _new_cache(text: TextConfig, B: int, max_len: int, dtype, kv_dtype, scan_layers: bool):
    # The unrolled model takes a per-group cache: each group's own buffers (`cache.split_groups`).
    cache = init_cache(text, B, max_len, dtype=dtype, kv_dtype=kv_dtype, per_group=not scan_layers)
    if sharding.active() is not None:  # on a mesh: the cache is split like the rules say (batch, KV heads)
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, *sharding.active()))
    return cache


def _rows(tok, lp, top, pos, done, stopped, max_new: int, top_k: int, seen=None) -> dict:
    """The per-row arrays of a decode state whose rows have made their first token;
    with `seen`, the penalty counts (`sampling.seen_tokens`) of a run with penalties."""
    B = tok.shape[0]
    rows = {
        "tokens": jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(tok),
        "logprobs": jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(lp),
        "last": tok,
        "pos": pos,  # position of the next input token
        "step": jnp.ones((B,), jnp.int32),  # per row: index of the next token
        "done": done,
        "stopped": stopped,
    }
    if top_k:
        rows["top_ids"] = jnp.zeros((B, max_new, top_k), jnp.int32).at[:, 0].set(top[0])
        rows["top_lps"] = jnp.zeros((B, max_new, top_k), jnp.float32).at[:, 0].set(top[1])
    if seen is not None:
        rows["seen"] = seen
    return rows


def _empty(text, batch, max_len, max_new, dtype, kv_dtype, top_logprobs, scan_layers, penalties):
    zero = jnp.zeros((batch,), jnp.int32)
    top = (jnp.zeros((batch, top_logprobs), jnp.int32), jnp.zeros((batch, top_logprobs), jnp.float32))
    seen = jnp.zeros((batch, text.vocab_size), jnp.int32) if penalties else None
    rows = _rows(zero, zero.astype(jnp.float32), top, zero, jnp.ones((batch,), bool), jnp.zeros((batch,), bool),
                 max_new, top_logprobs, seen)
    return {**rows, "cache": _new_cache(text, batch, max_len, dtype, kv_dtype, scan_layers)}


@functools.lru_cache(maxsize=None)
def _empty_jit(ctx, *args):
    build = functools.partial(_empty, *args)
    if ctx is None:
        return jax.jit(build)
    return jax.jit(build, out_shardings=_state_shardings(jax.eval_shape(build), *ctx))


def empty_state(*, text, batch, max_len, max_new, dtype, kv_dtype, top_logprobs=0, scan_layers=True,
                penalties=False):
    """A jitted function of no arguments making a decode state of `batch` idle slots
    (every row done, an empty cache) for `insert` to fill, split as the active mesh's
    rules say. Its output shardings are given explicitly, so a state made on one mesh is
    never reused on another (the function reads the mesh outside jax's trace cache).
    scan_layers=False: the per-group cache the unrolled model takes. penalties: the
    state keeps each row's penalty counts (its sampling arrays then hold the
    penalties, `sampling.PENALTY_KEYS`)."""
    return _empty_jit(sharding.active(), text, batch, max_len, max_new, jnp.dtype(dtype), kv_dtype, top_logprobs,
                      scan_layers, penalties)


@functools.partial(jax.jit, static_argnames=("text", "max_len", "max_new", "attn_impl", "moe_impl", "kv_dtype",
                                             "mm", "piece", "top_logprobs", "scan_layers", "data_parallel"))
def prefill(params, ids, mask, samp, budget, pixel_values=None, src=None, *, text, max_len, max_new,
            attn_impl, moe_impl, kv_dtype, mm=None, piece=None, top_logprobs=0, scan_layers=True,
            data_parallel=False):
    """Run the prompts [P, T] (left-padded, mask 0/1) and sample the first token of K rows.

    samp: dict of per-row sampling arrays [K] (with the penalties of
    `sampling.PENALTY_KEYS` in a run that uses them: the state then keeps the rows'
    penalty counts, "seen"), the rows' stop tokens "stop_ids" [K, S] (-1 pads) and,
    in a run with minimum lengths, "min_new" [K]; budget: int32 [K] tokens each row may
    generate (>= 1 for real rows, 0 for filler rows). src: int32 [K], the prompt of
    each row (several rows of one prompt are its samples, each drawing with its own
    seed from the same logits); None means row k is prompt k (K = P). pixel_values: the
    tiles of the batch's images in prompt order (padded with blank tiles to a bucket;
    only the first ones are referenced by `<|patch|>` tokens), with `mm` the full
    config. piece: a prompt longer than this is prefilled in pieces of `piece` tokens
    (chunked prefill), each writing the cache the next one reads, so activations are
    bounded by the piece, not the prompt. top_logprobs: also keep the k most likely
    tokens of each generated token (static). scan_layers=False: params are the per-group
    parameters of `views.unroll_layers` (`views.unstack_layers`), whose layers it reads in place
    (a scan copies each layer's weights out of the stack on every call), and the cache
    is per group (`cache.split_groups`), for the same reason. data_parallel (static): as
    for `decode`; the prompts run the model on their devices' shares when P divides
    over the mesh (a single prompt runs whole on each device).

    Returns a state of K rows whose cache holds the P prompts: row k's cache is cache
    row src[k] (`insert` copies it into the row's slot). Without src it is a decode state.
    The cache is new, so a prompt prefilled in one call attends over its own keys alone
    (`TextModel(fresh_cache=True)`), not over the whole allocation.
    """
    P = ids.shape[0]
    model = _model(text, params, attn_impl, moe_impl, scan_layers)
    dtype = params["params"]["embed"].dtype
    cache = _new_cache(text, P, max_len, dtype, kv_dtype, scan_layers)
    positions, valid = positions_from_mask(mask)
    embeds = None
    if pixel_values is not None:
        from .model.text import input_embeddings

        with jax.named_scope("images"):
            embeds = input_embeddings(mm, params, ids, pixel_values)

    def run(params, ids, positions, valid, cache, embeds):
        if piece is None or ids.shape[1] <= piece:
            logits, cache, _ = model.apply(params, ids, positions, valid, cache, last_only=True, embeds=embeds,
                                           fresh_cache=True)
            return logits, cache
        return _prefill_pieces(model, params, ids, positions, valid, cache, embeds, piece)

    if data_parallel:
        mesh, rules = sharding.active()
        row, _ = (rules or sharding.default_rules(mesh)).spec(("batch",), (P,), mesh)
        if row != jax.sharding.PartitionSpec():  # P splits over the mesh
            cache_specs = jax.tree_util.tree_map(lambda x: x.spec, sharding.cache_shardings(cache, mesh, rules))
            run = _per_device(run, (jax.sharding.PartitionSpec(), row, row, row, cache_specs, row),
                              (row, cache_specs))
    with jax.named_scope("prefill"):
        logits, cache = run(params, ids, positions, valid, cache, embeds)
    logits, pos = logits[:, 0], jnp.sum(mask, axis=1).astype(jnp.int32)
    seen = seen_tokens(ids, mask > 0, text.vocab_size) if PENALTY_KEYS[0] in samp else None
    if src is not None:
        logits, pos = logits[src], pos[src]
        seen = None if seen is None else seen[src]
    return _pin({**_first_rows(logits, samp, budget, pos, max_new, top_logprobs, seen), "cache": cache})


def _first_rows(logits, samp, budget, pos, max_new: int, top_k: int, seen=None) -> dict:
    """The per-row arrays of K rows whose prompts are prefilled: each draws its first
    token (step 0) from logits [K, V] of its prompt's last token with its sampling
    arrays [K] (and, with `seen`, its prompt's penalty counts), and is done at once at
    a stop token or a budget [K] of one; pos [K]: the prompts' lengths."""
    tok, lp, seen = _draw(logits, samp, seen, 0, 1)
    top = alternatives(logits, top_k) if top_k else None
    stopped = _is_stop(tok, samp) & (budget > 0)
    return _rows(tok, lp, top, pos, stopped | (budget <= 1), stopped, max_new, top_k, seen)


def _draw(logits, samp, seen, step, live):
    """(tokens, log-probabilities, penalty counts) of one step: each row draws its token
    number `step` from its logits [B, V], penalized first where the run has penalties
    (`seen` not None), its stop tokens suppressed while step < its "min_new", and
    counts its token where `live` (the log-probabilities stay the raw logits')."""
    drawn = logits if seen is None else penalize(logits, seen, samp)
    if "min_new" in samp:
        drawn = suppress_stops(drawn, samp["stop_ids"], step < samp["min_new"])
    tok, lp = sample(drawn, samp["temperature"], samp["top_k"], samp["top_p"], samp["min_p"], samp["seed"], step,
                     raw=None if drawn is logits else logits)
    if seen is not None:
        seen = seen.at[jnp.arange(tok.shape[0]), tok].add(2 * live)
    return tok, lp, seen


def _is_stop(tok, samp):
    """bool [B]: each row's token [B] is one of its stop tokens (`samp["stop_ids"]`)."""
    return jnp.any(tok[:, None] == samp["stop_ids"], axis=1)


def _state_shardings(state, mesh, rules):
    """NamedShardings of a decode state (arrays or shapes): per-row arrays split by
    batch, the cache as the rules say."""
    rules = sharding.default_rules(mesh) if rules is None else rules

    def row(x):
        spec, _ = rules.spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, what="decode state")
        return jax.sharding.NamedSharding(mesh, spec)

    out = {k: row(v) for k, v in state.items() if k != "cache"}
    out["cache"] = sharding.cache_shardings(state["cache"], mesh, rules)
    return out


def _per_device(fn, in_specs, out_specs, shards=None):
    """fn run by each device of the active (data-parallel, `sharding.data_parallel`)
    mesh on its share of the rows, traced as single-device code (no active mesh
    inside): `shard_map` with these specs, adding no collective of its own. With
    `shards` (`sharding.slot_parallel`): on all rows over its share of every layer's
    cache slots, the attention combining the shards (`sharding.slot_shards`)."""
    mesh, _ = sharding.active()

    def local(*args):
        with sharding.suspended():
            if shards is None:
                return fn(*args)
            with sharding.slot_shards(shards):
                return fn(*args)

    return jax.shard_map(local, mesh=sharding._tracing_mesh(mesh), in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def to_mesh(state):
    """A decode or prefill state made on one device, placed on the active mesh as
    `_state_shardings` says (where `insert` and `decode` take it)."""
    return jax.device_put(state, _state_shardings(state, *sharding.active()))


def _pin(state):
    """On a mesh: the decode state split as `_state_shardings` says, so prefill, insert
    and decode all return (and so take) one sharding."""
    if sharding.active() is None:
        return state
    return jax.lax.with_sharding_constraint(state, _state_shardings(state, *sharding.active()))


def _prefill_pieces(model, params, ids, positions, valid, cache, embeds, piece: int):
    """The prompt in n = ceil(T / piece) equal pieces of at most `piece` tokens, one
    `lax.scan` step each (compiled once).

    Each piece attends to the cache the earlier pieces wrote, plus itself: global
    layers keep every position, chunked layers their last `chunk` tokens, which hold
    every earlier key of a piece query's chunk (a query at p sees keys from
    p - p % chunk, never before p - chunk + 1), wherever the pieces start. The prompt
    is first left-padded to n equal pieces (padding is invalid: no position, never
    written or seen), which adds fewer than n tokens; padding it to a multiple of
    `piece` would add up to piece - 1 (a 9,216-token bucket in 8,192-token pieces is
    2 x 4,608, not 16,384 tokens). Returns the last piece's logits [B, 1, V] (every
    row's last real token, the batch being left-padded) and the cache.
    """
    B, T = ids.shape
    n = -(-T // piece)
    size = -(-T // n)
    pad = n * size - T
    left = lambda x: jnp.pad(x, ((0, 0), (pad, 0)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    split = lambda x: left(x).reshape(B, n, size, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    xs = (split(ids), split(positions), split(valid), None if embeds is None else split(embeds))

    def step(cache, x):
        i, p, v, e = x
        logits, cache, _ = model.apply(params, i, p, v, cache, last_only=True, embeds=e)
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, xs)
    return logits[-1], cache


def _insert(state, new, slots, rows, cache_rows):
    """Write rows `rows` [M] of `new` (a prefill state) into `state` at `slots` [M].

    `state` is donated and updated in place: every per-row array (tokens, logprobs,
    last, pos, step, done, stopped, top-k) from row rows[m] of `new`, and every cache
    leaf ([G, B, S, ...], batch on axis 1) from cache row cache_rows[m] of `new` (the
    row's prompt: one prefilled prompt fills the slots of all its samples). A slot
    index out of range (e.g. B) drops its row: padding goes nowhere. Both caches have
    the same length (the run's), so whole rows are replaced.
    """
    def put(axis, idx):
        def one(big, small):
            where = (slice(None),) * axis + (slots,)
            return big.at[where].set(jnp.take(small, idx, axis=axis), mode="drop")
        return one

    out = {k: jax.tree_util.tree_map(put(0, rows), state[k], new[k]) for k in state if k != "cache"}
    return {**out, "cache": jax.tree_util.tree_map(put(1, cache_rows), state["cache"], new["cache"])}


@functools.lru_cache(maxsize=None)
def _insert_jit(treedef, shardings):
    return jax.jit(_insert, donate_argnums=(0,), out_shardings=jax.tree_util.tree_unflatten(treedef, shardings))


def insert(state):
    """The jitted `_insert` for a running `state`: it returns its state with the
    shardings it took (given explicitly: on a mesh spanning several processes jax could
    not recover them from the compiled gather-and-scatter). Use it as
    `call_compiled(stats, insert(state), state, new, slots, rows, cache_rows)`."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return _insert_jit(treedef, tuple(x.sharding for x in leaves))


@functools.partial(jax.jit, static_argnames=("text", "attn_impl", "moe_impl", "scan_layers", "data_parallel",
                                             "slot_parallel"),
                   donate_argnums=(1,))
def decode(params, state, samp, budget, limit, *, text, attn_impl, moe_impl, scan_layers=True,
           data_parallel=False, slot_parallel=None):
    """Decode until a row finishes, every row is done, or `limit` iterations ran.

    One `lax.while_loop`; each iteration feeds every row's last token [B, 1] at its
    own position, samples the next one (row b's token number step[b], with the key
    folded from that step) and updates the done flags. Finished rows are fed as invalid
    tokens (their cache is left alone), emit nothing and keep their step. Stopping as
    soon as a row that was running finishes lets the host refill its slot.

    data_parallel (static): the active mesh splits only the batch and the parameters
    are replicated (`sharding.data_parallel`). Each device then runs the step on its
    own rows as single-device code (`shard_map`), with no collective but the loop's
    done test. On CPU, where XLA runs a decode step's small products on about one core,
    a mesh of one device per core runs the rows' shares side by side (see
    `benchmarks/generate.py --part batch`).
    slot_parallel (static, `sharding.SlotShards`): the active mesh splits only the
    cache slots, over replicated parameters (`sharding.slot_parallel`); every
    device then runs the whole step on all rows over its share of each layer's slots,
    with one all-gather per layer to combine the attention (`cached_attention`), so
    the cores read a long cache side by side (`benchmarks/generate.py --part
    context`).
    Returns (state, iterations run).
    """
    model = _model(text, params, attn_impl, moe_impl, scan_layers)
    top_k = state["top_ids"].shape[-1] if "top_ids" in state else 0

    def step(params, s, samp, budget):
        logits, cache, _ = model.apply(params, s["last"][:, None], s["pos"][:, None], ~s["done"][:, None],
                                       s["cache"])
        return {**_advance(s, logits[:, 0], samp, budget, top_k), "cache": cache}

    if data_parallel or slot_parallel:  # replicated parameters; rows or cache slots split
        specs = jax.tree_util.tree_map(lambda x: x.spec, _state_shardings(state, *sharding.active()))
        whole = jax.sharding.PartitionSpec()
        step = _per_device(step, (whole, specs, specs["done"], specs["done"]), specs, slot_parallel)

    # Go on while no row has finished since entry (done rows stay done, so: done still
    # equals done0) and some row was running at entry (loop-invariant, tested once):
    # one reduction over the rows per step, so on a data-parallel mesh one all-reduce
    # (two before: all(done) and any(done & ~done0)).
    done0 = state["done"]
    running0 = ~jnp.all(done0)

    def cond(c):
        s, n = c
        return (n < limit) & running0 & jnp.all(s["done"] == done0)

    def body(c):
        s, n = c
        with jax.named_scope("decode_step"):
            return step(params, s, samp, budget), n + 1

    state, n = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return _pin(state), n


def _advance(s, logits, samp, budget, top_k: int) -> dict:
    """The per-row arrays of decode state `s` (not its cache) after one step whose
    logits [B, V] are those of every row's last token: row b draws its token number
    step[b] (the key folded from that step); finished rows emit nothing and keep their
    step; a row is done at a stop token or its budget."""
    B, N = s["tokens"].shape  # on a data-parallel mesh: this device's rows
    live = (~s["done"]).astype(jnp.int32)
    tok, lp, seen = _draw(logits, samp, s.get("seen"), s["step"], live)
    tok = jnp.where(s["done"], 0, tok)
    new_stop = ~s["done"] & _is_stop(tok, samp)
    col = jnp.where(s["done"], N, s["step"])  # done rows write nowhere (dropped)
    rows = jnp.arange(B)
    n_made = s["step"] + live
    out = {
        "tokens": s["tokens"].at[rows, col].set(tok, mode="drop"),
        "logprobs": s["logprobs"].at[rows, col].set(lp, mode="drop"),
        "last": tok,
        "pos": s["pos"] + live,
        "step": n_made,
        "done": s["done"] | new_stop | (n_made >= budget),
        "stopped": s["stopped"] | new_stop,
    }
    if top_k:
        ids, lps = alternatives(logits, top_k)
        out["top_ids"] = s["top_ids"].at[rows, col].set(ids, mode="drop")
        out["top_lps"] = s["top_lps"].at[rows, col].set(lps, mode="drop")
    if seen is not None:
        out["seen"] = seen
    return out


def _start_rows(s, logits, rows, starting, length, samp, budget, top_k: int, seen=None) -> dict:
    """Rows `rows` [L] of decode state `s` (per-row arrays), where `starting` [L], begin
    decoding: their prompts (of `length` [L] tokens; penalty counts `seen` [L, V] in a
    run with penalties) are in the cache and `logits` [L, V] are those of their last
    tokens. Each draws its first token as `prefill` does (`_first_rows`, with its row's
    sampling and budget); the other lanes change nothing."""
    B, N = s["tokens"].shape
    new = _first_rows(logits, {k: v[rows] for k, v in samp.items()}, budget[rows], length, N, top_k, seen)
    r = jnp.where(starting, rows, B)  # B: dropped
    return {**s, **{k: s[k].at[r].set(v, mode="drop") for k, v in new.items()}}


def piece_size(text: TextConfig, size: int) -> int:
    """Tokens per prefill piece riding along decode steps (`ride`): `size`, or where it
    does not divide the attention chunk of a model with chunked layers, its greatest
    common divisor with the chunk, so that pieces starting at multiples of it never
    cross a chunk boundary (`TextModel(piece=...)`)."""
    if size < 1:
        raise ValueError(f"piece size must be >= 1, got {size}")
    if any(f.is_chunked for f in text.layer_flags):
        size = math.gcd(size, text.attention_chunk_size)
    return size


@functools.partial(jax.jit, static_argnames=("text", "attn_impl", "moe_impl", "piece", "scan_layers"),
                   donate_argnums=(1,))
def ride(params, state, samp, budget, limit, prompt, *, text, attn_impl, moe_impl, piece: int,
         scan_layers=True):
    """Decode as `decode` does, each step also prefilling the next piece of a prompt
    into an idle row of the state (chunked prefill riding along the decode steps: the
    prompt's tokens and the decode tokens go through the layers as one row, so they
    share every read of the weights). One device (no mesh).

    prompt: "ids" int [1, T] (right-padded), "length" [1] (its tokens), "row" [1] (the
    state row it fills: a done row, whose cache is reused as it is: the new prompt
    writes every slot it attends to before reading it, so the old entries are never
    seen, see `Attention._attend_with_piece`), "cursor" [1] (pieces already
    prefilled, < ceil(length / piece)). Each step runs the prompt's next piece: tokens
    cursor * piece onwards at their positions (`piece` from `piece_size`, so no piece
    crosses a chunk boundary). After its last piece the row draws its first token
    (with the sampling and budget the host gave that row) and the loop ends: the row
    decodes from the next call on.

    Stops when a row finishes, after the prompt's last piece, or after `limit` steps.
    Returns (state, prompt with its cursor advanced, steps).
    """
    model = _model(text, params, attn_impl, moe_impl, scan_layers)
    top_k = state["top_ids"].shape[-1] if "top_ids" in state else 0
    B = state["done"].shape[0]
    seen = None  # the prompt's penalty counts, in a run with penalties
    if "seen" in state:
        seen = seen_tokens(prompt["ids"], jnp.arange(prompt["ids"].shape[1]) < prompt["length"][:, None],
                           text.vocab_size)

    def step(s, pr):
        start = pr["cursor"] * piece
        offs = start[:, None] + jnp.arange(piece)
        ids = jnp.take_along_axis(pr["ids"], jnp.minimum(offs, pr["ids"].shape[1] - 1), axis=1)
        pc = {"ids": ids, "positions": offs, "valid": offs < pr["length"][:, None], "rows": pr["row"],
              "last": jnp.clip(pr["length"] - 1 - start, 0, piece - 1)}
        logits, cache, _ = model.apply(params, s["last"][:, None], s["pos"][:, None], ~s["done"][:, None],
                                       s["cache"], piece=pc)
        out = _advance(s, logits[:B, 0], samp, budget, top_k)
        starting = start + piece >= pr["length"]
        out = _start_rows(out, logits[B:, 0], pr["row"], starting, pr["length"], samp, budget, top_k, seen)
        return {**out, "cache": cache}, {**pr, "cursor": pr["cursor"] + 1}

    done0 = state["done"]

    def cond(c):  # also ends after the last piece when the row is done at its first token
        s, pr, n = c
        return (n < limit) & jnp.all(s["done"] == done0) & (pr["cursor"][0] * piece < pr["length"][0])

    def body(c):
        s, pr, n = c
        with jax.named_scope("ride_step"):
            s, pr = step(s, pr)
        return s, pr, n + 1

    state, prompt, n = jax.lax.while_loop(cond, body, (state, prompt, jnp.int32(0)))
    return state, prompt, n


# (function, argument structure, shapes, dtypes and shardings, statics, mesh) -> executable,
# least recently used first. Bounded, by count and by the memory regions they map:
# XLA:CPU maps regions for each executable's code (measured: ~12 for a three-op
# function, 430-580 for a decode or prefill of the benchmark model, more with more
# layers), and a process past Linux's vm.max_map_count (65530 by default) dies in its
# next compile or allocation, with a segfault. A run of `generate` uses about a dozen
# executables; one dropped is compiled again when next needed.
COMPILED: collections.OrderedDict = collections.OrderedDict()
MAX_COMPILED = 128


def to_host(x) -> np.ndarray:
    """A device array on the host: every process gets the whole value, also when the
    array spans the devices of several processes (`jax.distributed`)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Costs:
    """What compiling and prefilling cost in this process, measured: the scheduler
    weighs one against the other when it picks a prompt's length bucket
    (`scheduler.run_requests`). compile_s: seconds of each compilation, per jitted
    function; prefill_s / prefill_tokens: seconds of prefill (compilation excluded)
    and the padded tokens (rows x bucket) it ran."""

    compile_s: dict = dataclasses.field(default_factory=dict)
    prefill_s: float = 0.0
    prefill_tokens: int = 0

    def compile_estimate(self, jitted) -> float | None:
        """Median seconds of `jitted`'s compilations so far, or None before the first."""
        times = self.compile_s.get(jitted)
        return float(np.median(times)) if times else None

    def token_seconds(self) -> float | None:
        """Prefill seconds per padded token so far, or None before the first prefill."""
        return self.prefill_s / self.prefill_tokens if self.prefill_tokens else None


COSTS = Costs()


def _key(jitted, args, static):
    leaves = jax.tree_util.tree_leaves(args)
    return (jitted, jax.tree_util.tree_structure(args),
            tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
            tuple(sorted(static.items())), sharding.active())


def is_compiled(jitted, *args, **static) -> bool:
    """Whether `call_compiled(stats, jitted, *args, **static)` would run without compiling."""
    return _key(jitted, args, static) in COMPILED


def call_compiled(stats: GenerationStats, jitted, *args, **static):
    """Call `jitted` through an ahead-of-time compiled executable, kept across calls,
    so compile time is measured apart from prefill and decode time (and recorded in
    `COSTS`)."""
    key = _key(jitted, args, static)
    if key in COMPILED:
        COMPILED.move_to_end(key)
    else:
        t0 = time.perf_counter()
        COMPILED[key] = jitted.lower(*args, **static).compile()
        dt = time.perf_counter() - t0
        stats.compile_s += dt
        COSTS.compile_s.setdefault(jitted, []).append(dt)
        if len(COMPILED) > MAX_COMPILED or (_map_count() or 0) > map_budget():
            _drop_executables()
    return COMPILED[key](*args)


def _map_count() -> int | None:
    """Memory regions this process maps (Linux's /proc/self/maps), or None elsewhere."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_budget() -> int:
    """Memory regions the process may map before `call_compiled` drops executables:
    half of Linux's vm.max_map_count, the rest left to everything else the process
    maps and to the next compilation."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) // 2
    except (OSError, ValueError):
        return 65530 // 2


def _drop_executables() -> None:
    """Drop the least recently used half of `COMPILED` (at least down to
    `MAX_COMPILED`), then jax's own caches, which keep every executable jax compiled
    alive: without that a dropped executable stays mapped (measured: dropping 20 small
    executables freed none of their 239 regions; `jax.clear_caches` then freed 171).
    The executables kept in `COMPILED` stay valid; other jitted functions are traced
    again on their next call (and compiled again, or read from a persistent
    compilation cache)."""
    for _ in range(max(len(COMPILED) // 2, len(COMPILED) - MAX_COMPILED)):
        COMPILED.popitem(last=False)
    jax.clear_caches()


def default_compile_cache() -> str | None:
    """Where the `generate` command keeps compiled executables between runs:
    $LLAMA4_JAX_COMPILE_CACHE if set (empty: none), else
    $XDG_CACHE_HOME/llama4_jax/xla (~/.cache/llama4_jax/xla)."""
    env = os.environ.get("LLAMA4_JAX_COMPILE_CACHE")
    if env is not None:
        return env or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llama4_jax", "xla")


def use_compile_cache(path: str) -> None:
    """Keep every executable jax compiles from now on in `path` (jax's persistent
    compilation cache), so a later process with the same model, shapes and jax
    version loads them instead of compiling: the second run of a command skips XLA's
    compilation (only tracing remains: ~2 s instead of ~7 s for the default checkpoint).

    Entries are written whatever their compile time (jax's default skips those under
    a second; the small insert and empty-state executables add up). Must be called
    before the first compilation; raises OSError if the directory cannot be made.
    """
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def bucket(n: int) -> int:
    """n rounded up to the next power of two >= 16, or past 512 to the next multiple of
    512: few shapes (compilations), and past 512 at most 511 padded slots. Measured on
    the mixed benchmark's prompt lengths (uniform 16..2048): powers of two alone pad
    the prefilled tokens by 31%, this rule by 20% (one more bucket, 1536)."""
    return max(MIN_BUCKET, min(1 << (n - 1).bit_length(), -(-n // 512) * 512))


def prompt_bucket(n: int, cap: int) -> int:
    """The prompt-length bucket of n tokens (`bucket`), at most cap (but >= n)."""
    return min(bucket(n), max(cap, n))


def new_token_bucket(n: int) -> int:
    """Size of the new-token buffer for budgets of at most n tokens (`bucket`; the cache
    slots it adds cost memory, and on CPU the reads of a one-pass decode step, which
    reads a float per-group cache's every slot: `kernels.cached`)."""
    return bucket(n)


def logprob_bucket(k: int, vocab_size: int) -> int:
    """Alternatives computed per token when requests ask for at most k: 0 for none, else
    the next power of two >= max(k, 4), at most the vocabulary (so k = 1..4 share one
    compilation, 5..8 the next, ...)."""
    return 0 if k <= 0 else min(vocab_size, max(4, 1 << (k - 1).bit_length()))
