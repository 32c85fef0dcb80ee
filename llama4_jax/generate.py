"""Batched offline inference: the `generate` Python API and the `llama4-jax generate` command.

    completions = llama4_jax.generate(config, params, ["Hello", [{"role": "user", "content": "Hi"}]],
                                      tokenizer=tok, sampling=TopP(0.9, temperature=0.7, seed=1))
    completions[0].text, completions[0].token_ids, completions[0].finish_reason

How a run goes:
  * prompts (text, chat messages or token ids) are tokenised, checked against the
    context, sorted by length (results come back in input order) and cut into
    batches of `batch_size` rows; the last batch is filled with inert rows so every
    batch has the same shape;
  * each batch is left-padded to a prompt-length bucket (powers of two), so new
    lengths reuse a compiled prefill; the cache of a run holds the largest bucket +
    the new-token budget, so decode compiles once per run;
  * prefill (one jitted call) fills the KV cache and samples the first token;
  * decode is one jitted `lax.while_loop` that donates its state (cache included) and
    runs until every row is done or the budget is spent. With stop strings it runs in
    segments of `_STOP_STRING_SEGMENT` tokens and the host checks the text in between.

A row stops at a stop token (the checkpoint's eos list, e.g. `<|eot|>` and `<|eom|>`;
the token is kept in `token_ids`, as transformers and vLLM do), at a stop string
(the text ends before it), at `max_new_tokens`, or at the context length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed, sharding
from .cache import init_cache
from .config import Llama4Config, TextConfig
from .model.text import TextModel, positions_from_mask, unstack_layers
from .sampling import Sampling, SamplingMethod, resolve, sample

__all__ = ["generate", "Completion", "GenerationStats", "add_arguments", "run", "DEFAULT_MODEL",
           "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-llama4")
_MIN_BUCKET = 16  # smallest prompt-length bucket
_STOP_STRING_SEGMENT = 32  # decode steps between host-side stop-string checks


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
class GenerationStats:
    """Counts and timings of a run (seconds; compile time is kept apart)."""

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0

    def summary(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")
        dc = self.generated_tokens / self.decode_s if self.decode_s else float("nan")
        return (f"{self.prompts} prompts, {self.prompt_tokens} prompt tokens, {self.generated_tokens} generated "
                f"tokens; prefill {pf:.1f} tok/s ({self.prefill_s:.2f} s), decode {dc:.1f} tok/s "
                f"({self.decode_s:.2f} s), compile {self.compile_s:.2f} s")


@dataclasses.dataclass
class _Request:
    ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    pixel_values: Any = None  # [tiles, 3, S, S] of the prompt's images (their tokens are in `ids`), or None


# --------------------------------------------------------------------------------------
# The jitted engine
# --------------------------------------------------------------------------------------

def _model(text: TextConfig, params, attn_impl, moe_impl, scan_layers: bool = True):
    return TextModel(text, params["params"]["embed"].dtype, attn_impl, moe_impl, scan_layers=scan_layers)


_UNROLL_MIN_BYTES = 32 << 20


def _unroll_decode(params) -> bool:
    """Decode with per-group weight arrays (`unstack_layers`) on CPU, where a scanned
    layer's weights are copied out of the stacked array on every step (3x the memory
    traffic of a batch-1 step). It costs one extra copy of the layer weights for the
    duration of a `generate` call and a longer compile, so only weights beyond the
    caches (>= 32 MiB) take it."""
    layers = jax.tree_util.tree_leaves(params["params"]["layers"])
    return jax.default_backend() == "cpu" and sum(x.nbytes for x in layers) >= _UNROLL_MIN_BYTES


@functools.partial(jax.jit, static_argnames=("text", "max_len", "max_new", "attn_impl", "moe_impl", "kv_dtype",
                                             "mm"))
def _prefill(params, ids, mask, samp, budget, stop_ids, pixel_values=None, *, text, max_len, max_new, attn_impl,
             moe_impl, kv_dtype, mm=None):
    """Run the prompts [B, T] (left-padded, mask 0/1) and sample the first token.

    samp: dict of per-row sampling arrays [B]; budget: int32 [B] tokens each row may
    generate (>= 1 for real rows, 0 for filler rows). pixel_values: the tiles of the
    batch's images in row order (padded with blank tiles to a bucket; only the first
    ones are referenced by `<|patch|>` tokens), with `mm` the full config. Returns the
    decode state.
    """
    B = ids.shape[0]
    model = _model(text, params, attn_impl, moe_impl)
    dtype = params["params"]["embed"].dtype
    cache = init_cache(text, B, max_len, dtype=dtype, kv_dtype=kv_dtype)
    if sharding.active() is not None:  # on a mesh: the cache is split like the rules say (batch, KV heads)
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, *sharding.active()))
    positions, valid = positions_from_mask(mask)
    embeds = None
    if pixel_values is not None:
        from .model.vision import image_features, merge_image_features

        with jax.named_scope("images"):
            feats = image_features(mm, params, pixel_values)
            embeds = merge_image_features(params["params"]["embed"][ids], ids, feats, mm.image_token_index)
    with jax.named_scope("prefill"):
        logits, cache, _ = model.apply(params, ids, positions, valid, cache, last_only=True, embeds=embeds)
    tok, lp = sample(logits[:, 0], samp["temperature"], samp["top_k"], samp["top_p"], samp["min_p"],
                     samp["seed"], 0)
    stopped = jnp.isin(tok, stop_ids) & (budget > 0)
    return {
        "tokens": jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(tok),
        "logprobs": jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(lp),
        "last": tok,
        "pos": jnp.sum(mask, axis=1).astype(jnp.int32),  # position of the next input token
        "step": jnp.int32(1),
        "done": stopped | (budget <= 1),
        "stopped": stopped,
        "cache": cache,
    }


@functools.partial(jax.jit, static_argnames=("text", "attn_impl", "moe_impl", "scan_layers"), donate_argnums=(1,))
def _decode(params, state, samp, budget, stop_ids, limit, *, text, attn_impl, moe_impl, scan_layers=True):
    """Decode until every row is done or `step` reaches `limit` (<= max_new).

    One `lax.while_loop`; each iteration feeds every row's last token [B, 1] at its
    own position, samples the next one and updates the done flags. Finished rows are
    fed as invalid tokens (their cache is left alone) and emit 0.
    """
    model = _model(text, params, attn_impl, moe_impl, scan_layers)

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        with jax.named_scope("decode_step"):
            logits, cache, _ = model.apply(params, s["last"][:, None], s["pos"][:, None], ~s["done"][:, None],
                                           s["cache"])
            tok, lp = sample(logits[:, 0], samp["temperature"], samp["top_k"], samp["top_p"], samp["min_p"],
                             samp["seed"], s["step"])
            tok = jnp.where(s["done"], 0, tok)
            new_stop = ~s["done"] & jnp.isin(tok, stop_ids)
            step = s["step"] + 1
            return {
                "tokens": jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, s["step"])),
                "logprobs": jax.lax.dynamic_update_slice(s["logprobs"], lp[:, None], (0, s["step"])),
                "last": tok,
                "pos": s["pos"] + (~s["done"]).astype(jnp.int32),
                "step": step,
                "done": s["done"] | new_stop | (step >= budget),
                "stopped": s["stopped"] | new_stop,
                "cache": cache,
            }

    return jax.lax.while_loop(cond, body, state)


_COMPILED: dict = {}  # (function, argument structure, shapes and dtypes, statics) -> executable


def _host(x) -> np.ndarray:
    """A device array on the host: every process gets the whole value, also when the
    array spans the devices of several processes (`jax.distributed`)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _call_compiled(stats: GenerationStats, jitted, *args, **static):
    """Call `jitted` through an ahead-of-time compiled executable, kept across calls,
    so compile time is measured apart from prefill and decode time."""
    leaves = jax.tree_util.tree_leaves(args)
    key = (jitted, jax.tree_util.tree_structure(args), tuple((x.shape, x.dtype) for x in leaves),
           tuple(sorted(static.items())), sharding.active())
    if key not in _COMPILED:
        t0 = time.perf_counter()
        _COMPILED[key] = jitted.lower(*args, **static).compile()
        stats.compile_s += time.perf_counter() - t0
    return _COMPILED[key](*args)


def _bucket(n: int, cap: int) -> int:
    """The prompt-length bucket of n tokens: the next power of two >= 16, at most cap."""
    return min(max(_MIN_BUCKET, 1 << (n - 1).bit_length()), max(cap, n))


def _new_token_bucket(n: int) -> int:
    """Size of the new-token buffer: n rounded up to a multiple of 16 (few shapes, little waste)."""
    return -(-n // 16) * 16


# --------------------------------------------------------------------------------------
# Host side: prompts, batches, stop strings
# --------------------------------------------------------------------------------------

def _render(prompt, tokenizer, where: str) -> list[int]:
    """Token ids of one prompt: a string, a list of chat messages, or token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{where} is text, which needs a tokenizer (pass tokenizer=...)")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if tokenizer is None:
            raise ValueError(f"{where} is chat messages, which need a tokenizer (pass tokenizer=...)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where} is chat messages, but the tokenizer has no chat template")
        for j, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"{where}, message {j}: expected {{'role': str, 'content': ...}}, got {m!r}")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        # The template writes the special tokens itself (<|begin_of_text|> included).
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"{where} must be a string, a list of chat messages or a list of token ids, "
                         f"got {type(prompt).__name__}: {str(prompt)[:80]!r}")
    if not ids:
        raise ValueError(f"{where} is empty")
    return list(ids)


def _render_images(prompt, images, tokenizer, config: Llama4Config, where: str, max_images: int,
                   image_processor=None):
    """(ids, pixel_values) of a prompt with images; pixel_values None without images.

    Images come from `images` (a list of paths, PIL images or uint8 arrays) or from
    image parts of chat messages ({"type": "image", "path": ...}), not both. Each
    image takes the place of one `<|image|>` placeholder (a text prompt without any gets
    them in front), which expands to its tiles' token layout.
    """
    from .model.vision import tokens_per_tile
    from .processor import (SPECIAL_TOKENS, ImageError, ImageProcessor, collect_message_images, expand_image_ids,
                            special_token_ids)

    images = list(images or [])
    is_messages = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)
    try:
        if is_messages:
            prompt, found = collect_message_images(prompt)
            if found and images:
                raise ImageError("give images either as image parts of the messages or as a separate list, not both")
            images = images or found
        if not images:
            return _render(prompt, tokenizer, where), None
        if config.vision is None:
            raise ImageError(f"{len(images)} image(s) given, but the checkpoint has no vision tower "
                             f"({config.architecture})")
        if len(images) > max_images:
            raise ImageError(f"{len(images)} images, more than the limit of {max_images} per prompt "
                             f"(max_images_per_prompt)")
        if tokenizer is None:
            raise ImageError("images need a tokenizer (for the image special tokens)")
        if isinstance(prompt, str) and SPECIAL_TOKENS["image"] not in prompt:
            prompt = SPECIAL_TOKENS["image"] * len(images) + prompt
        ids = _render(prompt, tokenizer, where)
        v = config.vision
        proc = image_processor or ImageProcessor(size=v.image_size)
        out = proc(images)
        ids = expand_image_ids(ids, out.aspect_ratios, tokens_per_tile(v), special_token_ids(tokenizer))
    except ImageError as e:
        raise ValueError(f"{where}: {e}") from None
    return ids, out.pixel_values


def _check_request(r: _Request, where: str, vocab_size: int, max_model_len: int) -> None:
    n = len(r.ids)
    bad = [t for t in r.ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if n >= max_model_len:
        raise ValueError(f"{where} has {n} tokens, longer than the context allows: at most "
                         f"{max_model_len - 1} prompt tokens fit a context of {max_model_len} (max_model_len)")
    if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")


def _stop_cut(tokenizer, ids: list[int], stop: tuple[str, ...]):
    """(n_tokens, text) if the decoded text contains a stop string, else None.

    n_tokens is the shortest prefix of ids whose text contains the stop string;
    text ends right before the first stop string.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    lo, hi = 1, len(ids)  # the stop string's end grows monotonically with the prefix
    while lo < hi:
        mid = (lo + hi) // 2
        t = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if any(s in t for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo, text[:cut]


def _run(config: Llama4Config, params, requests: list[_Request], *, tokenizer, stop_token_ids, batch_size: int,
         max_model_len: int, logprobs: bool, kv_dtype, attention_impl: str, moe_impl: str,
         on_batch: Callable[[int], None] | None = None, mesh=None,
         rules=None) -> tuple[list[Completion], GenerationStats]:
    """Generate for checked requests; returns completions in request order and stats."""
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
    if mesh is None:
        return _run_batches(config, params, requests, tokenizer=tokenizer, stop_token_ids=stop_token_ids,
                            batch_size=batch_size, max_model_len=max_model_len, logprobs=logprobs, kv_dtype=kv_dtype,
                            attention_impl=attention_impl, moe_impl=moe_impl, on_batch=on_batch, place=None)
    rules = sharding.default_rules(mesh) if rules is None else rules
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        """Token ids and masks [B, T] split by batch; per-row and scalar inputs replicated."""
        x = jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(mesh, rules, x.shape) if x.ndim == 2 else replicated)

    with sharding.activate(mesh, rules):  # traced (and so compiled) with the mesh's constraints and `ep` MoE
        return _run_batches(config, params, requests, tokenizer=tokenizer, stop_token_ids=stop_token_ids,
                            batch_size=batch_size, max_model_len=max_model_len, logprobs=logprobs, kv_dtype=kv_dtype,
                            attention_impl=attention_impl, moe_impl=moe_impl, on_batch=on_batch, place=place)


def _run_batches(config: Llama4Config, params, requests: list[_Request], *, tokenizer, stop_token_ids,
                 batch_size: int, max_model_len: int, logprobs: bool, kv_dtype, attention_impl: str, moe_impl: str,
                 on_batch, place) -> tuple[list[Completion], GenerationStats]:
    text = config.text
    place = place or jnp.asarray
    stats = GenerationStats(prompts=len(requests), prompt_tokens=sum(len(r.ids) for r in requests))
    stop_ids = place(np.asarray(sorted(set(stop_token_ids)) or [-1], np.int32))
    unroll = _unroll_decode(params)
    decode_params = unstack_layers(params) if unroll else params
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))  # similar lengths together
    B = min(batch_size, len(requests))
    results: list[Completion | None] = [None] * len(requests)
    # One token buffer and cache length for the whole run, so decode compiles once;
    # only prefill is compiled per prompt-length bucket.
    N = _new_token_bucket(max(min(r.max_new_tokens, max_model_len - len(r.ids)) for r in requests))
    max_len = _bucket(max(len(r.ids) for r in requests), max_model_len) + N
    for start in range(0, len(order), B):
        rows = order[start:start + B]
        reqs = [requests[i] for i in rows]
        budgets = [min(r.max_new_tokens, max_model_len - len(r.ids)) for r in reqs]
        T = _bucket(max(len(r.ids) for r in reqs), max_model_len)
        ids = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.int32)
        for b, r in enumerate(reqs):
            ids[b, T - len(r.ids):] = r.ids
            mask[b, T - len(r.ids):] = 1
        mask[len(reqs):, -1] = 1  # filler rows: one token, budget 0
        pad = B - len(reqs)
        samps = [r.sampling for r in reqs] + [Sampling(temperature=0.0)] * pad
        samp = {
            "temperature": place(np.asarray([s.temperature for s in samps], np.float32)),
            "top_k": place(np.asarray([s.top_k for s in samps], np.int32)),
            "top_p": place(np.asarray([s.top_p for s in samps], np.float32)),
            "min_p": place(np.asarray([s.min_p for s in samps], np.float32)),
            "seed": place(np.asarray([s.seed for s in samps], np.uint32)),
        }
        budget = place(np.asarray(budgets + [0] * pad, np.int32))
        statics = dict(text=text, attn_impl=attention_impl, moe_impl=moe_impl)
        tiles = [r.pixel_values for r in reqs if r.pixel_values is not None]
        pixel_values, mm = None, None
        if tiles:  # batch-major tile order; blank tiles up to a multiple of 4 bound the compiled shapes
            tiles = np.concatenate(tiles)
            pad_tiles = -len(tiles) % 4
            pixel_values = jnp.asarray(np.concatenate([tiles, np.zeros((pad_tiles, *tiles.shape[1:]), tiles.dtype)]),
                                       params["params"]["vision"]["patch_embed"].dtype)
            mm = config
        t0 = time.perf_counter()
        c0 = stats.compile_s
        state = _call_compiled(stats, _prefill, params, place(ids), place(mask), samp, budget, stop_ids,
                               pixel_values, max_len=max_len, max_new=N, kv_dtype=kv_dtype, mm=mm, **statics)
        jax.block_until_ready(state["tokens"])
        stats.prefill_s += time.perf_counter() - t0 - (stats.compile_s - c0)

        has_stop_str = tokenizer is not None and any(r.stop for r in reqs)
        cuts: dict[int, tuple[int, str]] = {}
        t0, c0 = time.perf_counter(), stats.compile_s
        while True:
            limit = min(N, int(state["step"]) + _STOP_STRING_SEGMENT) if has_stop_str else N
            state = _call_compiled(stats, _decode, decode_params, state, samp, budget, stop_ids,
                                   place(np.int32(limit)), scan_layers=not unroll, **statics)
            step, done = int(_host(state["step"])), _host(state["done"])
            if has_stop_str:  # cut rows whose text reached a stop string, then carry on with the rest
                toks = _host(state["tokens"])
                for b, r in enumerate(reqs):
                    if r.stop and b not in cuts:
                        cut = _stop_cut(tokenizer, toks[b, :step].tolist(), r.stop)
                        if cut is not None:
                            cuts[b] = cut
                if cuts:
                    idx = jnp.asarray(sorted(cuts))
                    state = {**state, "done": state["done"].at[idx].set(True)}
                    done = _host(state["done"])
            if step >= N or done.all():
                break
        toks = _host(state["tokens"])
        lps = _host(state["logprobs"])
        stopped = _host(state["stopped"])
        stats.decode_s += time.perf_counter() - t0 - (stats.compile_s - c0)

        for b, (i, r) in enumerate(zip(rows, reqs)):
            n = min(budgets[b], step)
            row = toks[b, :n].tolist()
            if stopped[b]:  # keep the stop token, drop what follows
                n = next(j for j, t in enumerate(row) if t in set(stop_token_ids)) + 1
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
        if on_batch is not None:
            on_batch(len(reqs))
    return results, stats


def _context_length(config: Llama4Config, max_model_len: int | None) -> int:
    ctx = config.text.max_position_embeddings
    if max_model_len is None:
        return ctx
    if not isinstance(max_model_len, int) or not 2 <= max_model_len <= ctx:
        raise ValueError(f"max_model_len must be an integer in [2, {ctx}] (max_position_embeddings), "
                         f"got {max_model_len!r}")
    return max_model_len


def generate(
    config: Llama4Config,
    params,
    prompts: Sequence[Any],
    *,
    tokenizer=None,
    sampling: SamplingMethod | Sequence[SamplingMethod] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    logprobs: bool = False,
    max_model_len: int | None = None,
    kv_dtype: str | None = None,
    attention_impl: str = "auto",
    moe_impl: str | None = None,
    images: Sequence[Sequence[Any] | None] | None = None,
    max_images_per_prompt: int = 8,
    image_processor=None,
    mesh=None,
    rules=None,
) -> list[Completion]:
    """Complete a list of prompts; one `Completion` per prompt, in input order.

    Args:
      config, params: from `llama4_jax.load` (or `init_params`).
      prompts: strings, chat message lists ([{"role": ..., "content": ...}, ...],
        rendered with the tokenizer's chat template and a generation prompt), or lists
        of token ids (no tokenizer needed).
      tokenizer: a transformers tokenizer (e.g. `AutoTokenizer.from_pretrained(dir)`);
        without it `Completion.text` is None.
      sampling: None (greedy), one method for every prompt (`Greedy`, `Temperature`,
        `TopK`, `TopP`, `MinP`, `Sampling`), or one per prompt. Results depend on each
        request's seed, never on batch size or batch composition.
      max_new_tokens: most tokens generated per prompt (also capped by the context).
      batch_size: rows per batch (memory ~ weights + batch * (prompt + new) KV cache).
      stop: stop string(s): generation ends once the text contains one; it is cut off.
      stop_token_ids: extra stop tokens, added to the config's eos ids.
      logprobs: also return each generated token's log-probability.
      max_model_len: context limit (default max_position_embeddings).
      kv_dtype: None (model dtype), "bfloat16", "float32" or "int8" (quantised cache).
      attention_impl, moe_impl: backends (see `model.attention.backends()`, `model.moe.moe_impls()`);
        "auto" attention picks per length and platform; moe_impl None means "ep" when
        the mesh splits the experts evenly, else "ragged".
      images: per prompt, None or a list of images (paths, PIL images, uint8 [H, W, 3]
        arrays) for conditional-generation checkpoints; chat messages may instead hold
        {"type": "image", "path": ...} parts. Each image fills one `<|image|>` placeholder
        (text prompts without one get them in front).
      max_images_per_prompt: a prompt with more images is refused.
      image_processor: a `llama4_jax.processor.ImageProcessor` (default: the model's tile
        size with transformers' defaults; `Processor.from_pretrained` reads the
        checkpoint's preprocessor_config.json).
      mesh, rules: run on a device mesh (`llama4_jax.sharding.make_mesh` or `jax.make_mesh`;
        default: the mesh of the params' shardings, if any) with params loaded onto it
        (`llama4_jax.load(path, mesh=mesh)`; a mesh over other devices raises ValueError): batches are
        split over the batch rule's axes (data-parallel), experts over `expert`
        (expert-parallel), the KV cache like the rules say. Same tokens as one device.
    """
    return _generate_with_stats(config, params, prompts, tokenizer=tokenizer, sampling=sampling,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                                stop_token_ids=stop_token_ids, logprobs=logprobs, max_model_len=max_model_len,
                                kv_dtype=kv_dtype, attention_impl=attention_impl, moe_impl=moe_impl, images=images,
                                max_images_per_prompt=max_images_per_prompt, image_processor=image_processor,
                                mesh=mesh, rules=rules)[0]


def _generate_with_stats(config, params, prompts, *, tokenizer=None, sampling=None,
                         max_new_tokens=DEFAULT_MAX_NEW_TOKENS, batch_size=8, stop=None, stop_token_ids=None,
                         logprobs=False, max_model_len=None, kv_dtype=None, attention_impl="auto",
                         moe_impl=None, on_batch=None, images=None, max_images_per_prompt=8,
                         image_processor=None, mesh=None, rules=None):
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ctx = _context_length(config, max_model_len)
    if isinstance(sampling, (list, tuple)):
        if len(sampling) != len(prompts):
            raise ValueError(f"sampling has {len(sampling)} entries for {len(prompts)} prompts")
        samplings = [resolve(s) for s in sampling]
    else:
        samplings = [resolve(sampling)] * len(prompts)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be non-empty strings, got {stops!r}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts")
    requests = []
    for i, (p, s) in enumerate(zip(prompts, samplings)):
        ids, px = _render_images(p, images[i] if images is not None else None, tokenizer, config, f"prompt {i}",
                                 max_images_per_prompt, image_processor)
        r = _Request(ids, s, max_new_tokens, stops, px)
        _check_request(r, f"prompt {i}", config.text.vocab_size, ctx)
        requests.append(r)
    if not requests:
        return [], GenerationStats()
    stop_ids = set(config.text.eos_token_id) | set(stop_token_ids or ())
    return _run(config, params, requests, tokenizer=tokenizer, stop_token_ids=stop_ids, batch_size=batch_size,
                max_model_len=ctx, logprobs=logprobs, kv_dtype=kv_dtype, attention_impl=attention_impl,
                moe_impl=moe_impl, on_batch=on_batch, mesh=mesh, rules=rules)


# --------------------------------------------------------------------------------------
# The `llama4-jax generate` command
# --------------------------------------------------------------------------------------

_LINE_KEYS = {"id", "prompt", "messages", "images", "temperature", "top_p", "top_k", "min_p", "seed",
              "max_new_tokens", "stop"}
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed")


class _InputError(ValueError):
    """A bad input line; str() is the message, `line` its 1-based number."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint directory (Hugging Face format with tokenizer files, or converted); "
                             "default: the small trained checkpoint shipped with the package")
    parser.add_argument("--input", required=True,
                        help='JSONL, one request per line: {"id": ..., "prompt": "..."} or {"id": ..., '
                             '"messages": [...]}, optionally with temperature, top_p, top_k, min_p, seed, '
                             "max_new_tokens, stop")
    parser.add_argument("--output", required=True, help="JSONL of completions, in input order (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (the default unless generation_config.json says otherwise)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="default seed of every request")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--logprobs", action="store_true", help="write the log-probability of each token")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="parameter dtype (auto: the checkpoint's)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16", "int8"],
                        help="KV cache dtype (default: the parameter dtype)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="a malformed input line fails the run before any work (default) or is skipped")
    parser.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "blockwise", "pallas"],
                        help="attention backend: auto (xla for short contexts, blockwise for long ones), xla, "
                             "blockwise or pallas")
    parser.add_argument("--moe-impl", default=None, choices=["ragged", "dense", "ep"],
                        help="MoE strategy (default: ep when --mesh splits the experts, else ragged)")
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help='device mesh, e.g. "data=2,expert=4" (axes data, fsdp, expert, tensor): the model is '
                             "loaded straight onto it and batches run data- and expert-parallel")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-images-per-prompt", type=int, default=8,
                        help='most images one request may carry ("images": [paths] or image parts of "messages")')
    distributed.add_arguments(parser)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _checkpoint_defaults(path: str) -> tuple[dict, set[int], str]:
    """(sampling defaults, extra stop ids, dtype name) from generation_config.json / config.json."""
    gen = {}
    gpath = os.path.join(path, "generation_config.json")
    if os.path.exists(gpath):
        gen = _read_json(gpath)
    defaults = {}
    if gen.get("do_sample"):
        for k in ("temperature", "top_p", "top_k", "min_p"):
            if gen.get(k) is not None:
                defaults[k] = gen[k]
    eos = gen.get("eos_token_id")
    stop_ids = set([eos] if isinstance(eos, int) else eos or [])
    dtype = "bfloat16"
    cpath = os.path.join(path, "config.json")
    if os.path.exists(cpath):
        c = _read_json(cpath)
        name = c.get("torch_dtype") or c.get("dtype") or (c.get("text_config") or {}).get("torch_dtype")
        if name in ("float32", "bfloat16", "float16"):
            dtype = name
    return defaults, stop_ids, dtype


def _parse_line(n: int, raw: str, tokenizer, defaults: dict, args, config, ctx: int):
    """One input line -> (id, _Request); raises _InputError naming the line."""
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _InputError(n, f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(d, dict):
        raise _InputError(n, f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - _LINE_KEYS)
    if unknown:
        raise _InputError(n, f"unknown field(s) {unknown}; allowed: {sorted(_LINE_KEYS)}")
    if ("prompt" in d) == ("messages" in d):
        raise _InputError(n, 'expected exactly one of "prompt" (a string) or "messages" (a list of chat messages)')
    if "prompt" in d and not isinstance(d["prompt"], str):
        raise _InputError(n, f'"prompt" must be a string, got {type(d["prompt"]).__name__}')
    if "messages" in d and (not isinstance(d["messages"], list) or not d["messages"]
                            or not all(isinstance(m, dict) for m in d["messages"])):
        raise _InputError(n, '"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    try:
        samp = Sampling(**{**defaults, **{k: d[k] for k in _SAMPLING_KEYS if k in d}})
    except (ValueError, TypeError) as e:
        raise _InputError(n, f"invalid sampling parameter: {e}") from None
    max_new = d.get("max_new_tokens", args.max_new_tokens)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise _InputError(n, f'"max_new_tokens" must be an integer >= 1, got {max_new!r}')
    stop = d.get("stop", args.stop)
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _InputError(n, f'"stop" must be a non-empty string or a list of them, got {stop!r}')
    images = d.get("images")
    if images is not None and (not isinstance(images, list) or not all(isinstance(x, str) and x for x in images)):
        raise _InputError(n, f'"images" must be a list of image file paths, got {images!r}')
    where = "the prompt"
    try:
        ids, px = _render_images(d.get("prompt", d.get("messages")), images, tokenizer, config, where,
                                 getattr(args, "max_images_per_prompt", 8), _image_processor(args.model, config))
        r = _Request(ids, samp, max_new, tuple(stop), px)
        _check_request(r, where, config.text.vocab_size, ctx)
    except ValueError as e:
        raise _InputError(n, str(e)) from None
    except Exception as e:  # chat template errors come from jinja
        raise _InputError(n, f"cannot render the prompt: {type(e).__name__}: {e}") from None
    return d.get("id", n), r


@functools.lru_cache(maxsize=4)
def _image_processor(model_dir: str, config: Llama4Config):
    """The checkpoint's image processor (preprocessor_config.json), None without vision."""
    from .processor import ImageProcessor

    if config.vision is None:
        return None
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        return ImageProcessor.from_dict(_read_json(path))
    return ImageProcessor(size=config.vision.image_size)


def _err(msg: str) -> int:
    print(f"llama4-jax generate: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    # Cheap checks first, before anything is loaded.
    if args.batch_size < 1:
        return _err(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        return _err(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_images_per_prompt < 0:
        return _err(f"--max-images-per-prompt must be >= 0, got {args.max_images_per_prompt}")
    flags = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p}
    try:
        Sampling(**{k: v for k, v in flags.items() if v is not None}, seed=args.seed)
    except ValueError as e:
        return _err(f"invalid sampling option: {e}")
    if any(not s for s in args.stop):
        return _err("--stop must not be empty")
    if not os.path.isfile(args.input):
        return _err(f"--input: no such file: {args.input}")
    if os.path.exists(args.output) and not args.overwrite:
        return _err(f"--output {args.output} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        return _err(f"--output: directory {out_dir} does not exist")
    model = args.model
    if not os.path.isdir(model):
        return _err(f"--model: no such checkpoint directory: {model}")
    if not os.path.exists(os.path.join(model, "config.json")):
        return _err(f"--model: {model} has no config.json (expected a Hugging Face-format checkpoint)")
    if os.path.abspath(model) == DEFAULT_MODEL:
        print("llama4-jax generate: using the default checkpoint (a small model trained on the add, recall and "
              "color tasks of llama4_jax.tasks; see its README)",
              file=sys.stderr)

    import transformers

    from . import load  # the package's loader (HF or converted checkpoints)

    defaults, extra_stop, ckpt_dtype = _checkpoint_defaults(model)
    defaults = {**defaults, **{k: v for k, v in flags.items() if v is not None}, "seed": args.seed}
    defaults.setdefault("temperature", 0.0)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as e:
        return _err(f"--model: cannot load a tokenizer from {model}: {type(e).__name__}: {e}")
    try:
        mesh, main_process = distributed.start(args, "llama4-jax generate")
    except ValueError as e:
        return _err(str(e))
    try:
        config, params = load(model, dtype=ckpt_dtype if args.dtype == "auto" else args.dtype, mesh=mesh)
    except Exception as e:
        return _err(f"--model: cannot load {model}: {type(e).__name__}: {e}")
    try:
        ctx = _context_length(config, args.max_model_len)
    except ValueError as e:
        return _err(f"--max-model-len: {e}")

    ids, requests, errors = [], [], []
    with open(args.input, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines carry no request
            try:
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _InputError(n, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
                i, r = _parse_line(n, raw, tokenizer, defaults, args, config, ctx)
            except _InputError as e:
                errors.append(e)
                continue
            ids.append(i)
            requests.append(r)
    for e in errors:
        print(f"{args.input}:{e.line}: {e}", file=sys.stderr)
    if errors and args.on_error == "fail":
        return _err(f"{len(errors)} bad input line(s); nothing was generated (--on-error skip to skip them)")
    if errors:
        print(f"llama4-jax generate: skipping {len(errors)} bad input line(s)", file=sys.stderr)
    if not requests:
        return _err(f"{args.input} has no valid requests")

    from tqdm import tqdm

    stop_ids = set(config.text.eos_token_id) | extra_stop
    with tqdm(total=len(requests), desc="generate", unit="prompt", disable=args.no_progress or not main_process,
              file=sys.stderr) as bar:
        completions, stats = _run(config, params, requests, tokenizer=tokenizer, stop_token_ids=stop_ids,
                                  batch_size=args.batch_size, max_model_len=ctx, logprobs=args.logprobs,
                                  kv_dtype=args.kv_cache_dtype, attention_impl=args.attention_impl,
                                  moe_impl=args.moe_impl, on_batch=bar.update, mesh=mesh)

    if not main_process:  # every process computed the same results; process 0 writes them
        return 0
    fd, tmp = tempfile.mkstemp(prefix=".generate-", suffix=".jsonl", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, c in zip(ids, completions):
                rec = {"id": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                       "prompt_tokens": len(c.prompt_token_ids)}
                if args.logprobs:
                    rec["logprobs"] = c.logprobs
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"llama4-jax generate: wrote {args.output}: {stats.summary()}"
          + (f"; skipped {len(errors)} bad line(s)" if errors else ""), file=sys.stderr)
    return 0
