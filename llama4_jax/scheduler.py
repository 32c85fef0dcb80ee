"""Requests, batching and stop strings: the host side of a generation run.

    results, stats = run_requests(config, params, requests, tokenizer=tok, stop_token_ids={2}, batch_size=8,
                                  max_model_len=ctx, kv_dtype=None, attention_impl="auto", moe_impl=None,
                                  on_complete=lambda i, c: ..., on_batch=lambda done: ...)

Each request is a prompt with the indices of its samples (`Request.samples`, n = 1:
(0,)); every sample is a row of its own (own seed, `sampling.sample_seed`), and
`results` holds one completion per sample, request by request, samples in order.

How a run goes (continuous batching over `batch_size` decode slots):
  * requests are queued longest first (similar lengths prefill together; results come
    back in request order, each completion handed to `on_complete` as soon as its row
    finishes); the run keeps one decode state of `batch_size` rows
    (`engine.empty_state`), its cache sized for the largest prompt bucket + the
    new-token budget, so decode compiles once per run;
  * whenever slots are free (all of them at the start) they are filled from the queue:
    the next prompts are prefilled as a batch (one jitted call fills the KV cache and
    samples each sample row's first token), and their rows are written into the
    running state in place (`engine.insert`), then decode resumes. On CPU, prompts
    longer than `BATCHED_PREFILL_MAX` tokens (their bucket) are prefilled one per
    device per call instead, faster per token. A prompt is taken with all its samples
    (at most `batch_size`: a larger n is taken `batch_size` at a time), so it is
    prefilled once per `batch_size` samples, once when n <= batch_size;
    sample rows that find no free slot are held, prefilled, and inserted as slots free
    up, before anything new is prefilled (at most one such prefill state is held);
  * on one device (no mesh, float cache), a refill of at most half the slots instead
    starts the next prompt (one sample, no images) riding along the decode steps in a
    free row (`engine.ride`: a `RIDE_PIECE`-token piece of it per step, sharing the
    step's pass over the weights); the row decodes after its last piece;
  * decode (one jitted `lax.while_loop`) runs until a row finishes (or every row is
    done). The host then harvests the finished rows (`on_batch` gets each harvest's
    completions together, e.g. to post-process them in one batched call before they
    are written) and refills their slots. Each row has its own step, so a request's
    tokens do not depend on its slot, its batch-mates or when it entered;
  * prompts are left-padded to a length bucket (`engine.bucket`), or to a longer one
    already compiled when that costs less than compiling theirs (`_prompt_length`),
    a prefill's prompts to P rows and an insert's rows to M rows (1 or `batch_size`:
    a refill of at most half the slots prefills one prompt at a time; a prefill draws
    the first tokens of `batch_size` sample rows, fillers included), so a run compiles prefill
    at most twice per bucket (three times with lanes, below), insert at most four
    times, decode and `empty_state` once. Top-k
    log-probabilities are computed for the run's largest k, bucketed
    (`engine.logprob_bucket`), and sliced per request on the host, so mixed k do not
    add compilations; a run in which some request has penalties keeps every row's
    token counts in its decode state (`sampling.seen_tokens`), and only such a run;
  * with stop strings decode runs in segments of at most `STOP_STRING_SEGMENT` steps
    and the host checks only the new text of each row in between (`IncrementalText`);
  * on a mesh that splits only the batch, over replicated params
    (`sharding.data_parallel`), each device prefills and decodes its own share of the
    slots (`engine.decode`'s data_parallel), and the slots are rounded up to a
    multiple of the devices ("lanes"). A refill then prefills one prompt per device
    (holding the rows that find no free slot yet); a lone prompt runs on one device.
    On a mesh that splits only the KV cache slots (`sharding.slot_parallel`, e.g.
    seq=2), every device decodes every row over its share of each layer's slots
    (`engine.decode`'s slot_parallel: the cores read a long cache side by side), and
    prompts are prefilled on one device.

A row stops at a stop token (the checkpoint's eos list, e.g. `<|eot|>` and `<|eom|>`;
the token is kept in `token_ids`, as transformers and vLLM do), at a stop string
(the text ends before it), at `max_new_tokens`, or at the context length. Stop tokens
are per request (`Request.stop_token_ids`, else the run's `stop_token_ids`): each row
holds its own in the decode inputs (padded to one power-of-two width per run), and a
request's `min_new_tokens` keeps them from being drawn, and its stop strings from
counting, before that many tokens (the minimum lengths are in the decode inputs only
in a run where some request has one).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import engine, sharding
from .cache import cache_slots
from .config import Llama4Config
from .engine import GenerationStats, call_compiled, logprob_bucket, new_token_bucket, prompt_bucket, to_host
from .model.views import layer_views, on_device, unroll_layers, with_layers
from .sampling import PENALTY_KEYS, Sampling, sample_seed

__all__ = ["Completion", "Request", "check_request", "check_n", "check_logprobs", "check_stop_token_ids",
           "context_length", "IncrementalText", "run_requests", "STOP_STRING_SEGMENT"]

STOP_STRING_SEGMENT = 32  # decode steps between host-side stop-string checks

# Tokens per prefill piece riding along the decode steps (`engine.ride`; made to divide
# the attention chunk by `engine.piece_size`). Measured with the mixed benchmark's
# first 64 prompts (of 16..2048 tokens, 8..256 new, batch 8) on one CPU device, after
# the same warm-up: pieces of 256 / 512 / 1024 tokens 62.2 / 49.6 / 54.8 s (130 /
# 162 / 326 ms per step), against 64.8 s (58.2 s of it not compiling) with each refill
# prefilled alone and inserted. Smaller pieces, which would let more decode steps share
# a prefill's pass over the weights, were slower: the workload's prompts 17-64, same
# device, pieces of 512 / 128 / 64 tokens 26.2 / 28.4 / 36.2 s, in 829 / 875 / 1020
# steps (one prompt rides at a time, so a row freed meanwhile waits for its last piece,
# and a smaller piece makes that wait more steps).
RIDE_PIECE = 512

# On CPU, prompts whose length bucket is longer than this are prefilled one per device
# per call (a fill of many slots runs several such calls), not all of a fill's prompts
# in one call, which was slower per token; one prompt already keeps a device busy.
# Measured with the mixed benchmark's model, 8 prompts, prefill seconds, one call of 8
# rows against calls of one prompt per device (medians of 5, 2 cores): two devices,
# ~2000 tokens each 4.2-4.5 / 3.3-3.5, ~1000 1.55 / 1.43, ~500 0.74 / 0.71, ~250
# 0.29 / 0.34, 128 0.13 / 0.22 (there every call reads all the experts' weights for
# few tokens); one device, ~2000 4.9 / 4.4, ~1000 1.69 / 1.57, ~500 0.73 / 0.92. What
# slows the call of many rows is the attention: rows of different lengths, each left-
# padded by its own amount, no longer share the blockwise tiles' boundaries, so more
# tiles run and fewer skip the mask (4 rows of 2048 tokens, 48-78 of them padding, 226
# ms against 163 ms unpadded; one row is as fast with 100 padding tokens as without).
# The MoE and the shared expert measured alone scale with the tokens.
BATCHED_PREFILL_MAX = 512


@dataclasses.dataclass
class Completion:
    """One completion of a prompt (one of its n samples).

    text: the decoded completion (special tokens skipped, cut before a stop string),
        None without a tokenizer.
    token_ids: the generated ids only (a final stop token included).
    finish_reason: "stop" (stop token or string) or "length" (max_new_tokens or context).
    logprobs: log-probability of each generated token under the model (fp32
        log_softmax of the logits, before temperature and filters), when asked for.
    prompt_token_ids: the ids the model was given.
    sample: which of its prompt's samples this is (0 .. n - 1).
    top_logprobs: when k >= 1 alternatives were asked for, per generated token the k
        most likely tokens as (token id, log-probability), most likely first, from the
        same distribution as `logprobs` (so the chosen token's entry, when it is among
        them, equals its `logprobs` value).
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    sample: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class Request:
    """One checked request: prompt ids, resolved sampling (a concrete seed: sample j
    draws with `sample_seed(sampling.seed, j)`), token budget, the samples to make
    (`range(n)`, or the missing ones of a resumed run), and the log-probabilities to
    return (None: none; 0: the chosen tokens'; k: also the top k alternatives).
    stop_token_ids: the tokens that end it (None: the run's `stop_token_ids`; () for
    none, e.g. to ignore the eos tokens); min_new_tokens: its stop tokens cannot be
    drawn, and its stop strings do not end it, before it has this many tokens."""

    ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    pixel_values: Any = None  # [tiles, 3, S, S] of the prompt's images (their tokens are in `ids`), or None
    samples: Sequence[int] = (0,)
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    min_new_tokens: int = 0


def context_length(config: Llama4Config, max_model_len: int | None) -> int:
    """The context limit of a run: max_model_len, checked, or the model's."""
    ctx = config.text.max_position_embeddings
    if max_model_len is None:
        return ctx
    if not isinstance(max_model_len, int) or not 2 <= max_model_len <= ctx:
        raise ValueError(f"max_model_len must be an integer in [2, {ctx}] (max_position_embeddings), "
                         f"got {max_model_len!r}")
    return max_model_len


def check_request(r: Request, where: str, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError (naming `where`) for ids or stop token ids outside the
    vocabulary, a prompt that leaves no room in the context, a budget < 1, or a
    minimum length that is not an integer in [0, max_new_tokens]."""
    n = len(r.ids)
    bad = [t for t in r.ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if n >= max_model_len:
        raise ValueError(f"{where} has {n} tokens, longer than the context allows: at most "
                         f"{max_model_len - 1} prompt tokens fit a context of {max_model_len} (max_model_len)")
    if not isinstance(r.max_new_tokens, int) or isinstance(r.max_new_tokens, bool) or r.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")
    m = r.min_new_tokens
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= r.max_new_tokens:
        raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens = {r.max_new_tokens}], got {m!r}")
    if r.stop_token_ids is not None:
        check_stop_token_ids(r.stop_token_ids, vocab_size, f"{where}'s stop_token_ids")


def check_stop_token_ids(ids, vocab_size: int, what: str = "stop_token_ids") -> tuple[int, ...]:
    """ids as a tuple of token ids in [0, vocab_size); ValueError naming `what` otherwise."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, set, frozenset)):
        raise ValueError(f"{what} must be a list of token ids, got {ids!r}")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} must be token ids in [0, {vocab_size}), got {bad[:5]}")
    return tuple(ids)


def check_n(value, name: str = "n") -> int:
    """`value` as a sample count: an integer >= 1, else ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_logprobs(value, vocab_size: int, name: str = "logprobs") -> int | None:
    """`value` as `Request.logprobs`: False/None -> None (none), True -> 0 (the chosen
    tokens'), an integer k in [0, vocab_size] -> k (also the top k); else ValueError
    naming `name`."""
    if value is None or value is False:
        return None
    if value is True:
        return 0
    if not isinstance(value, int) or not 0 <= value <= vocab_size:
        raise ValueError(f"{name} must be true, false or an integer k in [0, {vocab_size}] (the top k "
                         f"alternatives per token), got {value!r}")
    return value


# Tokens of context decoded before each new token: enough for a tokenizer to join a
# multi-byte character or strip a leading space the same way the full decode does.
_DETOKENIZE_WINDOW = 6


class IncrementalText:
    """The decoded text of a growing token list, each token decoded once.

    `extend(ids)` appends tokens; `text` is the text of all tokens whose characters are
    complete (a token ending inside a multi-byte character waits for the next ones), and
    `ends[j]` is len(text) once tokens[:j + 1] are decoded. Each token costs two decodes
    of at most `_DETOKENIZE_WINDOW + 1` tokens (vLLM's incremental detokenisation), so a
    completion of N tokens costs O(N), not O(N^2) as decoding the whole row each segment.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []
        self._read = 0  # ids[:_read] are in `text`

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def extend(self, ids) -> None:
        for t in ids:
            self.ids.append(int(t))
            start = max(0, self._read - _DETOKENIZE_WINDOW)
            before = self._decode(self.ids[start:self._read])
            now = self._decode(self.ids[start:])
            if now.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                self.ends.append(len(self.text))
                continue
            self.text += now[len(before):]
            self._read = len(self.ids)
            self.ends.append(len(self.text))

    def find_stop(self, stops: tuple[str, ...], searched: int, min_tokens: int = 0) -> tuple[int, int] | None:
        """(n_tokens, cut) of the first stop string in text[searched - longest + 1:], or None.

        cut: where the text ends (right before the earliest stop string); n_tokens: the
        fewest tokens whose text contains a stop string. min_tokens: only a stop string
        that the first min_tokens - 1 tokens do not hold whole counts (as vLLM's
        `min_tokens`: no stop before that many tokens).
        """
        floor = 0  # a hit must end past this character
        if min_tokens > 1:
            if len(self.ends) < min_tokens - 1:
                return None
            floor = self.ends[min_tokens - 2]
        lo = max(0, searched - max(map(len, stops)) + 1)
        hits = [(i, i + len(s)) for i, s in ((self.text.find(s, max(lo, floor - len(s) + 1)), s) for s in stops)
                if i >= 0]
        if not hits:
            return None
        cut = min(i for i, _ in hits)
        end = min(e for _, e in hits)
        n = next(j for j, e in enumerate(self.ends) if e >= end) + 1
        return n, cut


def run_requests(config: Llama4Config, params, requests: list[Request], *, tokenizer, stop_token_ids,
                 batch_size: int, max_model_len: int, kv_dtype, attention_impl: str, moe_impl: str,
                 prefill_chunk: int | None = None,
                 on_complete: Callable[[int, Completion], None] | None = None,
                 on_batch: Callable[[list[tuple[int, Completion]]], None] | None = None, mesh=None, rules=None,
                 stats: GenerationStats | None = None) -> tuple[list[Completion], GenerationStats]:
    """Generate for checked requests; returns the completions (one per sample: request
    by request, each request's samples in the order of `Request.samples`) and stats.

    on_complete(i, completion) is called as each sample finishes (i: its request's
    index; `completion.sample` says which sample), in the order they finish;
    on_batch([(i, completion), ...]) once per harvest (the rows that finished in the
    same decode segment, or at their first token), after on_complete of them.
    `stats` (optional) accumulates across calls.
    """
    mesh = sharding.resolve_mesh(params, mesh, "generate")
    if mesh is not None and sharding._explicit_axes(mesh):
        # Same devices, Auto axes: the engine's cache and batch constraints are Auto-axis code.
        mesh = sharding.auto_mesh(mesh)
        params = jax.tree_util.tree_map(
            lambda x: jax.device_put(x, jax.sharding.NamedSharding(
                mesh, getattr(x.sharding, "spec", jax.sharding.PartitionSpec()))), params)
    if moe_impl is None:
        moe_impl = "ep" if mesh is not None and sharding.splits_experts(mesh, rules, config.text) else "ragged"
    if attention_impl.startswith("ring"):
        raise ValueError(f"attention_impl={attention_impl!r} is for forward() on a `seq` mesh; generate splits "
                         "batches, not sequences (use 'auto', 'blockwise', 'pallas' or 'xla')")
    stats = GenerationStats() if stats is None else stats
    kw = dict(tokenizer=tokenizer, stop_token_ids=stop_token_ids, batch_size=batch_size, max_model_len=max_model_len,
              kv_dtype=kv_dtype, attention_impl=attention_impl, moe_impl=moe_impl, prefill_chunk=prefill_chunk,
              on_complete=on_complete, on_batch=on_batch, stats=stats)
    if mesh is None:
        return _run_batches(config, params, requests, place=_place_local, lanes=1, **kw), stats
    rules = sharding.default_rules(mesh) if rules is None else rules
    # A mesh that splits only the batch, over replicated parameters: each device decodes
    # its own rows (`engine.decode`'s data_parallel), and the slots are a multiple of them.
    lanes = mesh.devices.size if sharding.data_parallel(mesh, rules, params) else 1
    # A mesh that splits only the cache slots, over replicated parameters: each device
    # runs the decode step over its share of every layer's slots (`engine.decode`'s
    # slot_parallel).
    shards = None if lanes > 1 else sharding.slot_parallel(mesh, rules, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x, whole: bool = False):
        """Token ids and masks [B, T] split by batch (with slot shards, whole: a prompt
        runs on one device); per-row inputs (whole=True for the 2-D ones: `engine.decode`
        and `engine.prefill` split them as they need) and scalars replicated."""
        x = jnp.asarray(x)
        split = x.ndim == 2 and shards is None and not whole
        return jax.device_put(x, sharding.batch_sharding(mesh, rules, x.shape) if split else replicated)

    with sharding.activate(mesh, rules):  # traced (and so compiled) with the mesh's constraints and `ep` MoE
        return _run_batches(config, params, requests, place=place, lanes=lanes, shards=shards, **kw), stats


def _place_local(x, whole: bool = False):
    """An input on the default device (a run without a mesh; `whole` as for a mesh's)."""
    return jnp.asarray(x)


def _prompt_length(n: int, max_model_len: int, top: int, compiled: Callable[[int], bool], count: int) -> int:
    """The length a prefill of prompts of at most n tokens is left-padded to: their
    bucket (`prompt_bucket`), or a larger one up to `top` that is already compiled
    when padding the `count` prompts of that bucket still to run to it costs less than
    compiling theirs, both as measured in this process (`engine.COSTS`: the median
    compilation of `engine.prefill`, and prefill seconds per padded token). Without
    measurements, or when the bucket is compiled, the bucket. A run of few prompts of
    many lengths then compiles few executables (in the mixed benchmark's timed run,
    five prefill buckets had cost 30 s of compilation); a long one compiles the buckets
    that pay off. Padding only adds masked tokens: a prompt's tokens are the same,
    its log-probabilities equal to fp32 rounding."""
    T = prompt_bucket(n, max_model_len)
    compile_s, token_s = engine.COSTS.compile_estimate(engine.prefill), engine.COSTS.token_seconds()
    if compile_s is None or token_s is None or compiled(T):
        return T
    larger = T
    while larger < top:
        larger = min(top, prompt_bucket(larger + 1, max_model_len))
        if count * (larger - T) * token_s >= compile_s:
            break
        if compiled(larger):
            return larger
    return T


def _row_arrays(samps: list[Sampling], stops: list[Sequence[int]], min_new: list[int] | None, width: int, place,
                penalties: bool) -> dict:
    """The per-row decode inputs of rows with these methods and stop tokens (each padded
    with -1 to `width`, "stop_ids"); with `penalties` (the run has a request with
    penalties on) also the penalties', with `min_new` (the run has a request with a
    minimum length) the rows' minimum lengths."""
    arrays = {
        "temperature": place(np.asarray([s.temperature for s in samps], np.float32)),
        "top_k": place(np.asarray([s.top_k for s in samps], np.int32)),
        "top_p": place(np.asarray([s.top_p for s in samps], np.float32)),
        "min_p": place(np.asarray([s.min_p for s in samps], np.float32)),
        "seed": place(np.asarray([s.seed for s in samps], np.uint32)),
    }
    for k in PENALTY_KEYS if penalties else ():
        arrays[k] = place(np.asarray([getattr(s, k) for s in samps], np.float32))
    ids = np.full((len(samps), width), -1, np.int32)
    for b, row in enumerate(stops):
        ids[b, :len(row)] = sorted(row)
    arrays["stop_ids"] = place(ids, whole=True)
    if min_new is not None:
        arrays["min_new"] = place(np.asarray(min_new, np.int32))
    return arrays


def _pixel_batch(config: Llama4Config, params, reqs: list[Request]):
    """(pixel_values, mm config) of a batch's images in row order, or (None, None).

    Blank tiles pad the count to a multiple of 4, which bounds the compiled shapes."""
    tiles = [r.pixel_values for r in reqs if r.pixel_values is not None]
    if not tiles:
        return None, None
    tiles = np.concatenate(tiles)
    pad = np.zeros((-len(tiles) % 4, *tiles.shape[1:]), tiles.dtype)
    return jnp.asarray(np.concatenate([tiles, pad]), params["params"]["vision"]["patch_embed"].dtype), config


def _run_params(params, unroll: bool, split: bool, first):
    """(prefill, decode, prefill on device `first`) parameters: with `unroll`, the
    layers as per-group views (`views.layer_views`; decode's with per-expert arrays
    when `split`), the other arrays as they are; `first`'s are the replicated arrays'
    buffers on that device (None without a device)."""
    if not unroll:
        on_first = None if first is None else jax.tree_util.tree_map(lambda x: on_device(x, first), params)
        return params, params, on_first
    prefill, decode, first_layers = layer_views(params, split, first)
    on_first = None
    if first is not None:
        rest = {**params, "params": {k: v for k, v in params["params"].items() if k != "layers"}}
        on_first = with_layers(jax.tree_util.tree_map(lambda x: on_device(x, first), rest), first_layers)
    return with_layers(params, prefill), with_layers(params, decode), on_first


@dataclasses.dataclass
class _Held:
    """A prefill state whose sample rows wait for free slots: `pending` lists
    (row, cache row, request index, sample index) of those not yet inserted."""

    state: dict
    pending: list[tuple[int, int, int, int]]


def _run_batches(config: Llama4Config, params, requests: list[Request], *, tokenizer, stop_token_ids,
                 batch_size: int, max_model_len: int, kv_dtype, attention_impl: str, moe_impl: str,
                 prefill_chunk: int | None = None,
                 on_complete, on_batch, place, lanes: int, stats: GenerationStats,
                 shards: sharding.SlotShards | None = None) -> list[Completion]:
    """Continuous batching over `batch_size` decode slots (see the module docstring),
    rounded up to a multiple of `lanes` (> 1: devices decoding their own rows); with
    `shards`, devices decoding every row over their share of the cache slots."""
    text = config.text
    n_samples = sum(len(r.samples) for r in requests)
    stats.prompts += n_samples
    if not n_samples:
        return []
    # Each request's stop tokens: its own, or the run's. One width (a power of two) for
    # the run's [B, S] stop array, so decode compiles once.
    stop_sets = [set(stop_token_ids if r.stop_token_ids is None else r.stop_token_ids) for r in requests]
    stop_width = 1 << max(0, max(len(x) for x in stop_sets) - 1).bit_length()
    # Per-row minimum lengths only in a run where some request has one (as penalties).
    min_new = any(r.min_new_tokens for r in requests)
    unroll = unroll_layers(params)
    # Decode rows this many or fewer per routed expert read the chosen experts in
    # place (`rowwise`, a `lax.switch` per row, on per-expert buffers); more rows go to
    # `blocked` on stacked experts. Prefill always runs `blocked` on stacked experts: it
    # slices one expert per block of rows, which measured as fast as the per-expert
    # buffers or faster (8 MoE layers of the benchmark model, 512 / 1024 / 2048 tokens,
    # one device: 62 / 88 / 134 ms against 68 / 89 / 148; a prompt per device on two:
    # within noise) and compiles faster (0.6 against 1.0 s).
    # Both are views of `params` (`unstack_layers`, `split_expert_layers`), but for the
    # decode parameters' fused gate/up weights (`layers.fuse_gate_up`, a copy of those),
    # and they are kept for the next calls on the same weights (`layer_views`).
    B = -(-min(batch_size, n_samples) // lanes) * lanes
    rows = B // lanes * text.num_experts_per_tok  # per device
    split = (unroll and moe_impl == "ragged" and rows <= text.num_local_experts
             and (lanes > 1 or shards is not None
                  or all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(params))))
    # With lanes, a prompt that does not split over the devices runs on the mesh's first
    # device, from the replicated inputs' copies there (no copy made), when this process
    # holds every device of the mesh; the parameters' copies are taken once.
    first = None
    if (lanes > 1 or shards is not None) and all(d.process_index == jax.process_index()
                                                 for d in sharding.active()[0].devices.flat):
        first = sharding.active()[0].devices.flat[0]
    prefill_params, decode_params, first_params = _run_params(params, unroll, split, first)
    # Longest prompt first; per prompt [request index, how many of its samples were taken].
    queue = collections.deque([i, 0] for i in sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
                              if requests[i].samples)
    results: dict[tuple[int, int], Completion] = {}
    budgets = [min(r.max_new_tokens, max_model_len - len(r.ids)) for r in requests]
    # One token buffer, cache length and top-k width for the whole run, so decode
    # compiles once, prefill once per (prompt bucket, P), insert once per (P, M).
    N = new_token_bucket(max(budgets[i] for i, _ in queue))
    top = prompt_bucket(max(len(requests[i].ids) for i, _ in queue), max_model_len)  # the largest prompt bucket
    # Prompts still queued per prompt bucket (what padding a bucket to a compiled one would cost).
    queued = collections.Counter(prompt_bucket(len(requests[i].ids), max_model_len) for i, _ in queue)
    max_len = top + N
    prefilled = 0  # padded prompt tokens (rows x bucket) of the refill in progress
    top_k = logprob_bucket(max(r.logprobs or 0 for r in requests), text.vocab_size)
    # Per-row penalty counts ([B, V] int32 in the decode state, updated by each step) only
    # when some request asks for a penalty: other runs compile and run without them.
    penalties = any(r.sampling.penalized for r in requests)
    if shards is not None and any(n % shards.count for n in cache_slots(text, max_len)):
        shards = None  # slots that do not split evenly: the step as XLA partitions it
    statics = dict(text=text, attn_impl=attention_impl, moe_impl=moe_impl)
    # On one device (no mesh) and with a float cache, a refill of a prompt rides along
    # the decode steps (`engine.ride`). On a data-parallel mesh a lone prompt is
    # prefilled with both cores' threads instead (riding, its pieces ran on one core:
    # 287 ms per step of 512 tokens against 162, slower than before); with slot shards
    # it is prefilled on one device; an int8 cache is not read back by a prefill for its
    # own keys (they are attended unquantized), which a riding piece would do.
    piece = None
    if sharding.active() is None and str(kv_dtype) != "int8":
        piece = engine.piece_size(text, RIDE_PIECE)
    on_cpu = jax.default_backend() == "cpu"  # long prompts prefill one per device per call
    flight: list | None = None  # [row, request index, sample index, pieces prefilled] of the prompt riding
    filler = Sampling(temperature=0.0, seed=0)
    slot_req: dict[int, tuple[int, int]] = {}  # slot -> (request index, sample index) it holds
    texts: dict[int, IncrementalText] = {}  # slots whose request has stop strings
    cuts: dict[int, tuple[int, str]] = {}  # slot -> (tokens kept, text) at a stop string
    held: _Held | None = None
    arrays = None
    state = call_compiled(stats, engine.empty_state(text=text, batch=B, max_len=max_len, max_new=N,
                                                    dtype=params["params"]["embed"].dtype, kv_dtype=kv_dtype,
                                                    top_logprobs=top_k, scan_layers=not unroll,
                                                    penalties=penalties))

    def sampling_of(i: int, j: int) -> Sampling:
        s = requests[i].sampling
        return dataclasses.replace(s, seed=sample_seed(s.seed, j)) if j else s

    def row_arrays(rows: list[tuple[int, int] | None]) -> dict:
        """The per-row decode inputs of rows holding these (request, sample) pairs
        (None: a filler row: greedy, no stop token)."""
        return _row_arrays([filler if x is None else sampling_of(*x) for x in rows],
                           [() if x is None else stop_sets[x[0]] for x in rows],
                           [0 if x is None else requests[x[0]].min_new_tokens for x in rows] if min_new else None,
                           stop_width, place, penalties)

    def prefill(free: int) -> _Held:
        """Prefill the next prompts of the queue, with all their samples (at most B rows),
        until they fill `free` slots; only the next prompt when at most half the slots
        are free (a refill between decode steps) or, on CPU, when the next prompt's
        bucket is longer than `BATCHED_PREFILL_MAX`; with lanes then the next `lanes`
        prompts, one per device (rows beyond the free slots are held for the next ones:
        a prefill split over two devices ran 1.8x the tokens/s of a lone prompt)."""
        nonlocal prefilled
        take: list[tuple[int, int]] = []  # (request index, sample index) per row
        prompts: list[int] = []
        per_device = free <= B // 2 or (on_cpu and prompt_bucket(len(requests[queue[0][0]].ids),
                                                                 max_model_len) > BATCHED_PREFILL_MAX)
        while queue and (len(prompts) < lanes if per_device else len(take) < free):
            i, k = queue[0]
            left = len(requests[i].samples) - k
            if left > B - len(take) and take:
                break  # taken whole by the next prefill
            js = requests[i].samples[k:k + B - len(take)]
            take += [(i, j) for j in js]
            prompts.append(i)
            if k + len(js) < len(requests[i].samples):
                queue[0][1] += len(js)  # n > B: the rest in a later prefill
            else:
                queue.popleft()
                queued[prompt_bucket(len(requests[i].ids), max_model_len)] -= 1
        # P prompt rows run the model: 1, or B (padded) for several prompts (`lanes` for
        # one per device: a refill's, or long prompts'). On CPU a prefill costs about its
        # P x T tokens (long ones less one per device: `BATCHED_PREFILL_MAX`), so
        # refilling a few slots one prompt at a time costs what one batch of them would,
        # and prefill compiles per prompt bucket for P = 1, lanes and B only (the mixed
        # benchmark spent 49 of 131 s compiling 22 executables with P any power of two).
        # B sample rows draw their first tokens (cheap), whatever the n.
        K, P = B, (1 if len(prompts) == 1 else lanes if per_device else B)
        reqs = [requests[i] for i in prompts]
        row_of = {i: b for b, i in enumerate(prompts)}
        src = [row_of[i] for i, _ in take] + [0] * (K - len(take))
        pad = K - len(take)
        samp = row_arrays(take + [None] * pad)
        budget = place(np.asarray([budgets[i] for i, _ in take] + [0] * pad, np.int32))
        pixel_values, mm = _pixel_batch(config, params, reqs)
        # Prompts that do not split over the devices (a refill's single prompt; with slot
        # shards, all) run on one device, with all the cores' threads, and the state goes
        # to the mesh after: every device computing the same prefill took 1.2x as long
        # (benchmark model, one prompt of 500 or 2000 tokens).
        on_first = (shards is not None or lanes > 1 and P % lanes) and first is not None

        def call(T: int, compiled_only: bool = False):
            """Prefill the prompts left-padded to T tokens (or only say whether that
            executable is compiled)."""
            ids = np.zeros((P, T), np.int32)
            mask = np.zeros((P, T), np.int32)
            for b, r in enumerate(reqs):
                ids[b, T - len(r.ids):] = r.ids
                mask[b, T - len(r.ids):] = 1
            mask[len(reqs):, -1] = 1  # filler rows: one token, budget 0
            args = (prefill_params, place(ids), place(mask), samp, budget, pixel_values,
                    place(np.asarray(src, np.int32)))
            kw = dict(max_len=max_len, max_new=N, kv_dtype=kv_dtype, mm=mm, top_logprobs=top_k,
                      piece=prefill_chunk if prefill_chunk and T > prefill_chunk else None, scan_layers=not unroll,
                      **statics)
            run = engine.is_compiled if compiled_only else functools.partial(call_compiled, stats)
            if on_first:
                with sharding.suspended():
                    new = run(engine.prefill, first_params,
                              *jax.tree_util.tree_map(lambda x: on_device(x, first), args[1:]), **kw)
                return new if compiled_only else engine.to_mesh(new)
            return run(engine.prefill, *args, data_parallel=lanes > 1, **kw)

        longest = max(len(r.ids) for r in reqs)
        count = len(reqs) + queued[prompt_bucket(longest, max_model_len)]
        T = _prompt_length(longest, max_model_len, top, lambda T: call(T, compiled_only=True), count)
        stats.prompt_tokens += sum(len(r.ids) for r in reqs)
        prefilled += P * T
        return _Held(call(T), [(k, src[k], i, j) for k, (i, j) in enumerate(take)])

    def refill(free: list[int]):
        """Fill the `free` slots: held sample rows first, then newly prefilled prompts."""
        nonlocal state, held
        while free and (held is not None or queue):
            if held is None:
                held = prefill(len(free))
            go, held.pending = held.pending[:len(free)], held.pending[len(free):]
            slots, free = free[:len(go)], free[len(go):]
            pad = (1 if len(go) == 1 else B) - len(go)  # M rows, 1 or B: insert compiles per (P, M)
            where = place(np.asarray(slots + [B] * pad, np.int32))  # B: dropped
            rows = place(np.asarray([r for r, _, _, _ in go] + [0] * pad, np.int32))
            cache_rows = place(np.asarray([c for _, c, _, _ in go] + [0] * pad, np.int32))
            state = call_compiled(stats, engine.insert(state), state, held.state, where, rows, cache_rows)
            for b, (_, _, i, j) in zip(slots, go):
                slot_req[b] = (i, j)
                if requests[i].stop and tokenizer is not None:
                    texts[b] = IncrementalText(tokenizer)
            if not held.pending:
                held = None

    def check_stops(slots, toks, step):
        """Extend the text of `slots` with their new tokens; record the first stop string."""
        for b in slots:
            if b not in texts or b in cuts:
                continue
            inc = texts[b]
            searched = len(inc.text)
            inc.extend(toks[b, len(inc.ids):min(int(step[b]), budgets[slot_req[b][0]])])
            r = requests[slot_req[b][0]]
            cut = inc.find_stop(r.stop, searched, r.min_new_tokens)
            if cut is not None:
                cuts[b] = (cut[0], inc.text[:cut[1]])

    def harvest(slots):
        """Completions of the finished `slots`, handed to on_complete / on_batch; frees the slots."""
        toks, lps, stopped, step = (to_host(state[k]) for k in ("tokens", "logprobs", "stopped", "step"))
        top_ids, top_lps = (to_host(state[k]) for k in ("top_ids", "top_lps")) if top_k else (None, None)
        check_stops(slots, toks, step)
        finished = []
        for b in slots:
            i, j = slot_req.pop(b)
            r = requests[i]
            n = min(budgets[i], int(step[b]))
            row = toks[b, :n].tolist()
            if stopped[b]:  # keep the stop token, drop what follows
                n = next(t for t, x in enumerate(row) if x in stop_sets[i]) + 1
            reason = "stop" if stopped[b] else "length"
            txt = None
            cut = cuts.pop(b, None)
            texts.pop(b, None)
            if cut is not None and cut[0] <= n:
                n, txt = cut
                reason = "stop"
            elif tokenizer is not None:
                txt = tokenizer.decode(row[:n], skip_special_tokens=True)
            stats.generated_tokens += n
            top = None
            if r.logprobs:  # the request's k of the run's bucket
                top = [list(zip(ti.tolist(), tl.tolist())) for ti, tl in zip(top_ids[b, :n, :r.logprobs],
                                                                            top_lps[b, :n, :r.logprobs])]
            c = results[i, j] = Completion(text=txt, token_ids=row[:n], finish_reason=reason,
                                           logprobs=lps[b, :n].tolist() if r.logprobs is not None else None,
                                           prompt_token_ids=r.ids, sample=j, top_logprobs=top)
            if on_complete is not None:
                on_complete(i, c)
            finished.append((i, c))
        if on_batch is not None:
            on_batch(finished)

    def rides(i: int, k: int) -> bool:
        """Whether queued prompt i (its samples from the k-th on) can ride along decode:
        one sample row left and no images."""
        return len(requests[i].samples) - k == 1 and requests[i].pixel_values is None

    def launch(b: int) -> None:
        """Start the next queued prompt riding into free row b."""
        nonlocal flight, arrays
        i, k = queue.popleft()
        queued[prompt_bucket(len(requests[i].ids), max_model_len)] -= 1
        j = requests[i].samples[k]
        flight = [b, i, j, 0]
        stats.prompt_tokens += len(requests[i].ids)
        stats.ridden_tokens += len(requests[i].ids)
        arrays = None

    def ride(limit: int):
        """Decode steps with the prompt in flight riding along (`engine.ride`); its row
        joins the decoding rows after its last piece."""
        nonlocal state, flight
        b, i, j, done_pieces = flight
        n = len(requests[i].ids)
        ids = np.zeros((1, top), np.int32)
        ids[0, :n] = requests[i].ids
        prompt = {"ids": place(ids), "length": place(np.asarray([n], np.int32)),
                  "row": place(np.asarray([b], np.int32)), "cursor": place(np.asarray([done_pieces], np.int32))}
        state, prompt, steps = call_compiled(stats, engine.ride, decode_params, state, *arrays,
                                             place(np.int32(limit)), prompt, piece=piece, scan_layers=not unroll,
                                             **statics)
        flight[3] = int(to_host(prompt["cursor"])[0])
        if flight[3] * piece >= n:  # prefilled: the row decodes
            flight = None
            slot_req[b] = (i, j)
            if requests[i].stop and tokenizer is not None:
                texts[b] = IncrementalText(tokenizer)
        return steps

    while True:
        done = to_host(state["done"])  # harvest the rows that finished (in decode, or at their first token)
        fin = [b for b in sorted(slot_req) if done[b]]
        if fin:
            harvest(fin)
        free = [b for b in range(B) if b not in slot_req and (flight is None or b != flight[0])]
        # A refill of at most half the slots, while rows decode, rides along the decode
        # steps, one prompt at a time.
        if (free and piece is not None and held is None and len(free) <= B // 2 and slot_req
                and queue and rides(*queue[0])):
            if flight is None:
                launch(free[0])
        elif free and (held is not None or queue):  # refill the free slots: prefill, then insert in place
            t0, c0 = time.perf_counter(), stats.compile_s
            prefilled = 0
            refill(free)
            jax.block_until_ready(state["tokens"])
            took = time.perf_counter() - t0 - (stats.compile_s - c0)
            stats.prefill_s += took
            engine.COSTS.prefill_s += took
            engine.COSTS.prefill_tokens += prefilled
            arrays = None
            continue  # a new row may be done at its first token
        if not slot_req and flight is None:
            break
        if arrays is None:
            # Each slot's row takes its request's decode inputs: the one it decodes, or the
            # prompt riding into it; a free slot a filler's (its row is done).
            rows = [slot_req.get(b) for b in range(B)]
            if flight is not None:
                rows[flight[0]] = (flight[1], flight[2])
            arrays = row_arrays(rows), place(np.asarray([0 if x is None else budgets[x[0]] for x in rows], np.int32))
        # With stop strings, decode in segments and check the new text in between.
        limit = STOP_STRING_SEGMENT if texts else N
        t0, c0 = time.perf_counter(), stats.compile_s
        if flight is not None:
            steps = ride(limit)
        else:
            state, steps = call_compiled(stats, engine.decode, decode_params, state, *arrays,
                                         place(np.int32(limit)), scan_layers=not unroll, data_parallel=lanes > 1,
                                         slot_parallel=shards,
                                         **statics)
        stats.decode_steps += int(to_host(steps))
        if texts:  # cut rows whose new text reached a stop string
            check_stops(sorted(texts), to_host(state["tokens"]), to_host(state["step"]))
            done = to_host(state["done"])
            hit = [b for b in cuts if not done[b]]
            if hit:
                state = {**state, "done": state["done"].at[jnp.asarray(sorted(hit))].set(True)}
        stats.decode_s += time.perf_counter() - t0 - (stats.compile_s - c0)
    return [results[i, j] for i, r in enumerate(requests) for j in r.samples]
