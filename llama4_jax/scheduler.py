"""Requests, batching and stop strings: the host side of a generation run.

    results, stats = run_requests(config, params, requests, tokenizer=tok, stop_token_ids={2}, batch_size=8,
                                  max_model_len=ctx, logprobs=False, kv_dtype=None, attention_impl="auto",
                                  moe_impl=None, on_complete=lambda i, c: ...,
                                  on_batch=lambda done: ...)

How a run goes (static batching):
  * requests are sorted by length (results come back in request order, and each
    completion is handed to `on_complete` as soon as its batch ends) and cut into
    batches of `batch_size` rows; the last batch is filled with inert rows so every
    batch has the same shape; `on_batch` gets a finished batch's completions together
    (e.g. to post-process them in one batched call before they are written);
  * each batch is left-padded to a prompt-length bucket (powers of two), so new
    lengths reuse a compiled prefill; the cache of a run holds the largest bucket +
    the new-token budget, so decode compiles once per run;
  * prefill (one jitted call) fills the KV cache and samples the first token;
  * decode (one jitted `lax.while_loop`) runs until every row is done or the budget is
    spent. With stop strings it runs in segments of `STOP_STRING_SEGMENT` tokens and
    the host checks only the new text of each row in between (`IncrementalText`).

A row stops at a stop token (the checkpoint's eos list, e.g. `<|eot|>` and `<|eom|>`;
the token is kept in `token_ids`, as transformers and vLLM do), at a stop string
(the text ends before it), at `max_new_tokens`, or at the context length.
"""

from __future__ import annotations

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

    on_complete(i, completion) is called as each request finishes (its batch ends),
    in the order they finish; on_batch([(i, completion), ...]) once per batch, after
    on_complete of its rows, with all of them. `stats` (optional) accumulates across calls.
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
    text = config.text
    stats.prompts += len(requests)
    stats.prompt_tokens += sum(len(r.ids) for r in requests)
    if not requests:
        return []
    stop_set = set(stop_token_ids)
    stop_ids = place(np.asarray(sorted(stop_set) or [-1], np.int32))
    unroll = engine.unroll_decode(params)
    decode_params = unstack_layers(params) if unroll else params
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))  # similar lengths together
    B = min(batch_size, len(requests))
    results: list[Completion | None] = [None] * len(requests)
    # One token buffer and cache length for the whole run, so decode compiles once;
    # only prefill is compiled per prompt-length bucket.
    N = new_token_bucket(max(min(r.max_new_tokens, max_model_len - len(r.ids)) for r in requests))
    max_len = prompt_bucket(max(len(r.ids) for r in requests), max_model_len) + N
    statics = dict(text=text, attn_impl=attention_impl, moe_impl=moe_impl)
    for start in range(0, len(order), B):
        rows = order[start:start + B]
        reqs = [requests[i] for i in rows]
        budgets = [min(r.max_new_tokens, max_model_len - len(r.ids)) for r in reqs]
        T = prompt_bucket(max(len(r.ids) for r in reqs), max_model_len)
        ids = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.int32)
        for b, r in enumerate(reqs):
            ids[b, T - len(r.ids):] = r.ids
            mask[b, T - len(r.ids):] = 1
        mask[len(reqs):, -1] = 1  # filler rows: one token, budget 0
        pad = B - len(reqs)
        samp = _sampling_arrays([r.sampling for r in reqs] + [Sampling(temperature=0.0, seed=0)] * pad, place)
        budget = place(np.asarray(budgets + [0] * pad, np.int32))
        pixel_values, mm = _pixel_batch(config, params, reqs)
        t0, c0 = time.perf_counter(), stats.compile_s
        state = call_compiled(stats, engine.prefill, params, place(ids), place(mask), samp, budget, stop_ids,
                              pixel_values, max_len=max_len, max_new=N, kv_dtype=kv_dtype, mm=mm,
                              piece=prefill_chunk if prefill_chunk and T > prefill_chunk else None, **statics)
        jax.block_until_ready(state["tokens"])
        stats.prefill_s += time.perf_counter() - t0 - (stats.compile_s - c0)

        texts = {b: IncrementalText(tokenizer) for b, r in enumerate(reqs) if r.stop and tokenizer is not None}
        cuts: dict[int, tuple[int, str]] = {}
        t0, c0 = time.perf_counter(), stats.compile_s
        while True:
            limit = min(N, int(to_host(state["step"])) + STOP_STRING_SEGMENT) if texts else N
            state = call_compiled(stats, engine.decode, decode_params, state, samp, budget, stop_ids,
                                  place(np.int32(limit)), scan_layers=not unroll, **statics)
            step, done = int(to_host(state["step"])), to_host(state["done"])
            if texts:  # cut rows whose new text reached a stop string, then carry on with the rest
                toks = to_host(state["tokens"])
                for b, inc in texts.items():
                    if b in cuts:
                        continue
                    searched = len(inc.text)
                    inc.extend(toks[b, len(inc.ids):min(step, budgets[b])])
                    cut = inc.find_stop(reqs[b].stop, searched)
                    if cut is not None:
                        cuts[b] = (cut[0], inc.text[:cut[1]])
                if cuts:
                    state = {**state, "done": state["done"].at[jnp.asarray(sorted(cuts))].set(True)}
                    done = to_host(state["done"])
            if step >= N or done.all():
                break
        toks, lps, stopped = (to_host(state[k]) for k in ("tokens", "logprobs", "stopped"))
        stats.decode_s += time.perf_counter() - t0 - (stats.compile_s - c0)

        for b, (i, r) in enumerate(zip(rows, reqs)):
            n = min(budgets[b], step)
            row = toks[b, :n].tolist()
            if stopped[b]:  # keep the stop token, drop what follows
                n = next(j for j, t in enumerate(row) if t in stop_set) + 1
            reason = "stop" if stopped[b] else "length"
            txt = None
            if b in cuts and cuts[b][0] <= n:
                n, txt = cuts[b]
                reason = "stop"
            elif tokenizer is not None:
                txt = tokenizer.decode(row[:n], skip_special_tokens=True)
            stats.generated_tokens += n
            results[i] = Completion(text=txt, token_ids=row[:n], finish_reason=reason,
                                    logprobs=lps[b, :n].tolist() if logprobs else None, prompt_token_ids=r.ids)
            if on_complete is not None:
                on_complete(i, results[i])
        if on_batch is not None:
            on_batch([(i, results[i]) for i in rows])
    return results
