"""Requests, batching and stop strings: the host side of a generation run.

    results, stats = run_requests(config, params, requests, tokenizer=tok, stop_token_ids={2}, batch_size=8,
                                  max_model_len=ctx, logprobs=False, kv_dtype=None, attention_impl="auto",
                                  moe_impl=None, on_complete=lambda i, c: ...,
                                  on_batch=lambda done: ...)

How a run goes (continuous batching over `batch_size` decode slots):
  * requests are queued longest first (similar lengths prefill together; results come
    back in request order, each completion handed to `on_complete` as soon as its row
    finishes); the run keeps one decode state of `batch_size` rows, its cache sized for
    the largest prompt bucket + the new-token budget, so decode compiles once per run;
  * the first `batch_size` requests are prefilled together (one jitted call fills the
    KV cache and samples each row's first token; inert filler rows when there are fewer);
  * decode (one jitted `lax.while_loop`) runs until a row finishes (or every row is
    done). The host then harvests the finished rows (`on_batch` gets each harvest's
    completions together, e.g. to post-process them in one batched call before they
    are written) and refills their slots from the queue: the new requests are
    prefilled as a batch padded to a power of two (at most `batch_size`) and their rows
    written into the running state in place (`engine.insert`), then decode resumes.
    Each row has its own step, so a request's tokens do not depend on its slot, its
    batch-mates or when it entered;
  * prompts are left-padded to a prompt-length bucket (powers of two), so a run
    compiles prefill once per (bucket, refill size), insert once per refill size and
    decode once;
  * with stop strings decode runs in segments of at most `STOP_STRING_SEGMENT` steps
    and the host checks only the new text of each row in between (`IncrementalText`).

A row stops at a stop token (the checkpoint's eos list, e.g. `<|eot|>` and `<|eom|>`;
the token is kept in `token_ids`, as transformers and vLLM do), at a stop string
(the text ends before it), at `max_new_tokens`, or at the context length.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import engine, sharding
from .config import Llama4Config
from .engine import GenerationStats, call_compiled, new_token_bucket, prompt_bucket, to_host
from .model.text import unstack_layers
from .sampling import Sampling

__all__ = ["Completion", "Request", "check_request", "context_length", "IncrementalText", "run_requests",
           "STOP_STRING_SEGMENT"]

STOP_STRING_SEGMENT = 32  # decode steps between host-side stop-string checks


@dataclasses.dataclass
class Completion:
    """One prompt's result.

    text: the decoded completion (special tokens skipped, cut before a stop string),
        None without a tokenizer.
    token_ids: the generated ids only (a final stop token included).
    finish_reason: "stop" (stop token or string) or "length" (max_new_tokens or context).
    logprobs: log-probability of each generated token under the model (before
        temperature and filters), when asked for.
    prompt_token_ids: the ids the model was given.
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None


@dataclasses.dataclass
class Request:
    """One checked request: prompt ids, resolved sampling (a concrete seed), token budget."""

    ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    pixel_values: Any = None  # [tiles, 3, S, S] of the prompt's images (their tokens are in `ids`), or None


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
    """Raise ValueError (naming `where`) for ids outside the vocabulary, a prompt that
    leaves no room in the context, or a budget < 1."""
    n = len(r.ids)
    bad = [t for t in r.ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if n >= max_model_len:
        raise ValueError(f"{where} has {n} tokens, longer than the context allows: at most "
                         f"{max_model_len - 1} prompt tokens fit a context of {max_model_len} (max_model_len)")
    if not isinstance(r.max_new_tokens, int) or isinstance(r.max_new_tokens, bool) or r.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")


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

    def find_stop(self, stops: tuple[str, ...], searched: int) -> tuple[int, int] | None:
        """(n_tokens, cut) of the first stop string in text[searched - longest + 1:], or None.

        cut: where the text ends (right before the earliest stop string); n_tokens: the
        fewest tokens whose text contains a stop string.
        """
        lo = max(0, searched - max(map(len, stops)) + 1)
        hits = [(i, i + len(s)) for i, s in ((self.text.find(s, lo), s) for s in stops) if i >= 0]
        if not hits:
            return None
        cut = min(i for i, _ in hits)
        end = min(e for _, e in hits)
        n = next(j for j, e in enumerate(self.ends) if e >= end) + 1
        return n, cut


def run_requests(config: Llama4Config, params, requests: list[Request], *, tokenizer, stop_token_ids,
                 batch_size: int, max_model_len: int, logprobs: bool, kv_dtype, attention_impl: str, moe_impl: str,
                 prefill_chunk: int | None = None,
                 on_complete: Callable[[int, Completion], None] | None = None,
                 on_batch: Callable[[list[tuple[int, Completion]]], None] | None = None, mesh=None, rules=None,
                 stats: GenerationStats | None = None) -> tuple[list[Completion], GenerationStats]:
    """Generate for checked requests; returns completions in request order and stats.

    on_complete(i, completion) is called as each request finishes, in the order they
    finish; on_batch([(i, completion), ...]) once per harvest (the rows that finished
    in the same decode segment, or at their first token), after on_complete of them.
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
              logprobs=logprobs, kv_dtype=kv_dtype, attention_impl=attention_impl, moe_impl=moe_impl,
              prefill_chunk=prefill_chunk, on_complete=on_complete, on_batch=on_batch, stats=stats)
    if mesh is None:
        return _run_batches(config, params, requests, place=jnp.asarray, **kw), stats
    rules = sharding.default_rules(mesh) if rules is None else rules
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        """Token ids and masks [B, T] split by batch; per-row and scalar inputs replicated."""
        x = jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(mesh, rules, x.shape) if x.ndim == 2 else replicated)

    with sharding.activate(mesh, rules):  # traced (and so compiled) with the mesh's constraints and `ep` MoE
        return _run_batches(config, params, requests, place=place, **kw), stats


def _sampling_arrays(samps: list[Sampling], place) -> dict:
    return {
        "temperature": place(np.asarray([s.temperature for s in samps], np.float32)),
        "top_k": place(np.asarray([s.top_k for s in samps], np.int32)),
        "top_p": place(np.asarray([s.top_p for s in samps], np.float32)),
        "min_p": place(np.asarray([s.min_p for s in samps], np.float32)),
        "seed": place(np.asarray([s.seed for s in samps], np.uint32)),
    }


def _pixel_batch(config: Llama4Config, params, reqs: list[Request]):
    """(pixel_values, mm config) of a batch's images in row order, or (None, None).

    Blank tiles pad the count to a multiple of 4, which bounds the compiled shapes."""
    tiles = [r.pixel_values for r in reqs if r.pixel_values is not None]
    if not tiles:
        return None, None
    tiles = np.concatenate(tiles)
    pad = np.zeros((-len(tiles) % 4, *tiles.shape[1:]), tiles.dtype)
    return jnp.asarray(np.concatenate([tiles, pad]), params["params"]["vision"]["patch_embed"].dtype), config


def _run_batches(config: Llama4Config, params, requests: list[Request], *, tokenizer, stop_token_ids,
                 batch_size: int, max_model_len: int, logprobs: bool, kv_dtype, attention_impl: str, moe_impl: str,
                 prefill_chunk: int | None = None,
                 on_complete, on_batch, place, stats: GenerationStats) -> list[Completion]:
    """Continuous batching over `batch_size` decode slots (see the module docstring)."""
    text = config.text
    stats.prompts += len(requests)
    stats.prompt_tokens += sum(len(r.ids) for r in requests)
    if not requests:
        return []
    stop_set = set(stop_token_ids)
    stop_ids = place(np.asarray(sorted(stop_set) or [-1], np.int32))
    unroll = engine.unroll_decode(params)
    decode_params = unstack_layers(params) if unroll else params
    queue = collections.deque(sorted(range(len(requests)), key=lambda i: -len(requests[i].ids)))
    B = min(batch_size, len(requests))
    results: list[Completion | None] = [None] * len(requests)
    budgets = [min(r.max_new_tokens, max_model_len - len(r.ids)) for r in requests]
    # One token buffer and cache length for the whole run, so decode and insert compile
    # once per refill size; prefill compiles per (prompt-length bucket, refill size).
    N = new_token_bucket(max(budgets))
    max_len = prompt_bucket(max(len(r.ids) for r in requests), max_model_len) + N
    statics = dict(text=text, attn_impl=attention_impl, moe_impl=moe_impl)
    filler = Sampling(temperature=0.0, seed=0)
    slot_req: dict[int, int] = {}  # slot -> index of the request it holds
    slot_samp, slot_budget = [filler] * B, [0] * B  # host copies of the per-slot decode inputs
    texts: dict[int, IncrementalText] = {}  # slots whose request has stop strings
    cuts: dict[int, tuple[int, str]] = {}  # slot -> (tokens kept, text) at a stop string
    state, arrays = None, None

    def prefill(take: list[int], K: int):
        """A prefill state of K rows: requests `take`, then inert filler rows."""
        reqs = [requests[i] for i in take]
        T = prompt_bucket(max(len(r.ids) for r in reqs), max_model_len)
        ids = np.zeros((K, T), np.int32)
        mask = np.zeros((K, T), np.int32)
        for b, r in enumerate(reqs):
            ids[b, T - len(r.ids):] = r.ids
            mask[b, T - len(r.ids):] = 1
        mask[len(reqs):, -1] = 1  # filler rows: one token, budget 0
        pad = K - len(reqs)
        samp = _sampling_arrays([r.sampling for r in reqs] + [filler] * pad, place)
        budget = place(np.asarray([budgets[i] for i in take] + [0] * pad, np.int32))
        pixel_values, mm = _pixel_batch(config, params, reqs)
        return call_compiled(stats, engine.prefill, params, place(ids), place(mask), samp, budget, stop_ids,
                             pixel_values, max_len=max_len, max_new=N, kv_dtype=kv_dtype, mm=mm,
                             piece=prefill_chunk if prefill_chunk and T > prefill_chunk else None, **statics)

    def check_stops(slots, toks, step):
        """Extend the text of `slots` with their new tokens; record the first stop string."""
        for b in slots:
            if b not in texts or b in cuts:
                continue
            inc = texts[b]
            searched = len(inc.text)
            inc.extend(toks[b, len(inc.ids):min(int(step[b]), slot_budget[b])])
            cut = inc.find_stop(requests[slot_req[b]].stop, searched)
            if cut is not None:
                cuts[b] = (cut[0], inc.text[:cut[1]])

    def harvest(slots):
        """Completions of the finished `slots`, handed to on_complete / on_batch; frees the slots."""
        toks, lps, stopped, step = (to_host(state[k]) for k in ("tokens", "logprobs", "stopped", "step"))
        check_stops(slots, toks, step)
        finished = []
        for b in slots:
            i = slot_req.pop(b)
            n = min(budgets[i], int(step[b]))
            row = toks[b, :n].tolist()
            if stopped[b]:  # keep the stop token, drop what follows
                n = next(j for j, t in enumerate(row) if t in stop_set) + 1
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
            results[i] = Completion(text=txt, token_ids=row[:n], finish_reason=reason,
                                    logprobs=lps[b, :n].tolist() if logprobs else None,
                                    prompt_token_ids=requests[i].ids)
            if on_complete is not None:
                on_complete(i, results[i])
            finished.append((i, results[i]))
        if on_batch is not None:
            on_batch(finished)

    while True:
        if state is not None:  # harvest the rows that finished (in decode, or at their first token)
            done = to_host(state["done"])
            fin = [b for b in sorted(slot_req) if done[b]]
            if fin:
                harvest(fin)
        free = [b for b in range(B) if b not in slot_req]
        if queue and free:  # refill the free slots from the queue: prefill, then insert in place
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            slots = free[:len(take)]
            # The first fill is the whole batch; refills are padded to a power of two.
            K = B if state is None else min(B, 1 << (len(take) - 1).bit_length())
            t0, c0 = time.perf_counter(), stats.compile_s
            new = prefill(take, K)
            if state is None:
                state = new
            else:
                where = place(np.asarray(slots + [B] * (K - len(slots)), np.int32))  # B: dropped
                state = call_compiled(stats, engine.insert, state, new, where)
            jax.block_until_ready(state["tokens"])
            stats.prefill_s += time.perf_counter() - t0 - (stats.compile_s - c0)
            for b, i in zip(slots, take):
                slot_req[b], slot_samp[b], slot_budget[b] = i, requests[i].sampling, budgets[i]
                if requests[i].stop and tokenizer is not None:
                    texts[b] = IncrementalText(tokenizer)
            arrays = None
            continue  # a new row may be done at its first token
        if not slot_req:
            break
        if arrays is None:
            arrays = _sampling_arrays(slot_samp, place), place(np.asarray(slot_budget, np.int32))
        # With stop strings, decode in segments and check the new text in between.
        limit = STOP_STRING_SEGMENT if texts else N
        t0, c0 = time.perf_counter(), stats.compile_s
        state, steps = call_compiled(stats, engine.decode, decode_params, state, *arrays, stop_ids,
                                     place(np.int32(limit)), scan_layers=not unroll, **statics)
        stats.decode_steps += int(to_host(steps))
        if texts:  # cut rows whose new text reached a stop string
            check_stops(sorted(texts), to_host(state["tokens"]), to_host(state["step"]))
            done = to_host(state["done"])
            hit = [b for b in cuts if not done[b]]
            if hit:
                state = {**state, "done": state["done"].at[jnp.asarray(sorted(hit))].set(True)}
        stats.decode_s += time.perf_counter() - t0 - (stats.compile_s - c0)
    return results
