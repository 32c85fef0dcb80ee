"""Batched offline inference: the `generate` Python API.

    completions = llama4_jax.generate(config, params, ["Hello", [{"role": "user", "content": "Hi"}]],
                                      tokenizer=tok, sampling=TopP(0.9, temperature=0.7), seed=1)
    completions[0].text, completions[0].token_ids, completions[0].finish_reason
    completions, stats = llama4_jax.generate(..., return_stats=True)   # GenerationStats
    samples = llama4_jax.generate(..., n=4, sampling=TopP(0.9))      # samples[i][j]: sample j of prompt i
    completions = llama4_jax.generate(..., logprobs=5)                # .logprobs and .top_logprobs (5 per token)
    completions = llama4_jax.generate(..., min_new_tokens=16, ignore_eos=[False, True])

The run itself lives in `scheduler` (batching, stop strings) over `engine` (the jitted
prefill and decode); prompts and images are rendered by `prompts`; the
`llama4-jax generate` command's file handling is `generate_cli`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .config import Llama4Config, TextConfig
from .engine import GenerationStats
from .prompts import DEFAULT_MAX_IMAGE_PIXELS, render_images
from .sampling import SamplingMethod, resolve, with_seed
from .scheduler import (Completion, Request, check_logprobs, check_n, check_request, check_stop_token_ids,
                        context_length, run_requests)

__all__ = ["generate", "Completion", "GenerationStats", "DEFAULT_MODEL", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-llama4")
DEFAULT_PREFILL_CHUNK = 8192  # prompt tokens per prefill piece for models without an attention chunk


def default_prefill_chunk(config: Llama4Config) -> int:
    """Prompt tokens per prefill piece: the attention chunk (a chunked layer's piece then
    reads at most one chunk of cache), else DEFAULT_PREFILL_CHUNK."""
    return config.text.attention_chunk_size or DEFAULT_PREFILL_CHUNK


def _per_prompt(value, n: int, name: str) -> list:
    """One value per prompt: a list/tuple of n entries, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _stop_token_lists(value, n: int, vocab_size: int) -> list[tuple[int, ...]]:
    """Extra stop tokens per prompt from `generate`'s stop_token_ids: None, one list of
    ids for every prompt, or one list (or None) per prompt."""
    if value is None:
        return [()] * n
    if isinstance(value, (list, tuple)) and value and all(x is None or isinstance(x, (list, tuple)) for x in value):
        return [check_stop_token_ids(x or (), vocab_size, f"stop_token_ids[{i}]")
                for i, x in enumerate(_per_prompt(value, n, "stop_token_ids"))]
    return [check_stop_token_ids(value, vocab_size)] * n


def generate(
    config: Llama4Config,
    params,
    prompts: Sequence[Any],
    *,
    tokenizer=None,
    sampling: SamplingMethod | Sequence[SamplingMethod] | None = None,
    seed: int = 0,
    max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    min_new_tokens: int | Sequence[int] = 0,
    ignore_eos: bool | Sequence[bool] = False,
    logprobs: bool | int | Sequence[bool | int] = False,
    n: int | Sequence[int] = 1,
    max_model_len: int | None = None,
    kv_dtype: str | None = None,
    attention_impl: str = "auto",
    moe_impl: str | None = None,
    prefill_chunk: int | None = None,
    images: Sequence[Sequence[Any] | None] | None = None,
    max_images_per_prompt: int = 8,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    image_processor=None,
    mesh=None,
    rules=None,
    return_stats: bool = False,
):
    """Complete a list of prompts; one `Completion` per prompt, in input order (with
    `n`: a list of completions per prompt).

    Args:
      config, params: from `llama4_jax.load` (or `init_params`).
      prompts: strings, chat message lists ([{"role": ..., "content": ...}, ...],
        rendered with the tokenizer's chat template and a generation prompt), or lists
        of token ids (no tokenizer needed).
      tokenizer: a transformers tokenizer (e.g. `AutoTokenizer.from_pretrained(dir)`);
        without it `Completion.text` is None.
      sampling: None (greedy), one method for every prompt (`Greedy`, `Temperature`,
        `TopK`, `TopP`, `MinP`, `Sampling`), or one per prompt. Results depend on each
        request's seed, never on batch size or batch composition. Penalties:
        `Sampling(temperature=0, repetition_penalty=1.3)` (as transformers'
        `repetition_penalty`: prompt and completion tokens), `presence_penalty`,
        `frequency_penalty` (as vLLM's: completion tokens only).
      seed: the run's seed: a method without its own seed (the default) samples prompt
        i with `sampling.derive_seed(seed, i)`, so prompts sharing a method draw
        differently and the same call draws the same again.
      n: samples per prompt, one int or one per prompt (>= 1). Each sample is a request
        of its own, drawing with its own seed (`sampling.sample_seed(s, j)` for sample j
        of a prompt whose seed is s: s itself for sample 0, so sample 0 is the n = 1
        completion); the samples of a prompt differ under temperature > 0, are equal
        under greedy, and do not depend on batch size or slots. The prompt is
        prefilled once for up to `batch_size` of its samples. Return value: with the
        default int 1 a flat list, one `Completion` per prompt, as without `n`; with
        an int > 1 or a list (even of 1s) a list per prompt of its samples,
        `out[i][j]` (`Completion.sample` == j), like vLLM's `outputs[i].outputs[j]`
        (pass `n=[k] * len(prompts)` for one structure whatever k).
      max_new_tokens: most tokens generated per prompt (also capped by the context):
        one int for every prompt or one per prompt.
      batch_size: decode slots (continuous batching: a finished row's slot is refilled
        from the queue; memory ~ weights + batch * (longest prompt + new) KV cache).
      stop: stop string(s): generation ends once the text contains one; it is cut off.
      stop_token_ids: extra stop tokens, added to the config's eos ids: one list for
        every prompt, or one list (or None) per prompt. A stop token ends its row and
        is kept in `token_ids` (finish_reason "stop").
      min_new_tokens: each prompt's stop tokens cannot be drawn (their logits are -inf,
        as transformers' `min_new_tokens` and vLLM's `min_tokens`), and its stop
        strings do not end it, before it has this many tokens; one int (default 0) or
        one per prompt, at most its max_new_tokens. Log-probabilities stay the raw
        distribution's.
      ignore_eos: the config's eos ids do not end the prompt's completion (it runs to
        max_new_tokens, a stop string, or one of its stop_token_ids); one bool or one
        per prompt.
      logprobs: False (none), True or 0 (`Completion.logprobs`: each generated
        token's log-probability), or an int k >= 1 (also `Completion.top_logprobs`: the
        k most likely tokens at each step as (id, log-probability)); one value or one
        per prompt. Both are of the model's distribution, fp32 log_softmax of the logits
        before temperature and the top-k/top-p/min-p filters (as vLLM's default), so
        the chosen token's value equals its entry among the alternatives. k is computed
        inside the decode step, rounded up to a bucket (4, 8, 16, ...) for the whole
        run and sliced per prompt, so mixed k share one compilation.
      max_model_len: context limit (default max_position_embeddings).
      kv_dtype: None (model dtype), "bfloat16", "float32" or "int8" (quantised cache).
      attention_impl, moe_impl: backends (see `model.attention.backends()`, `model.moe.moe_impls()`);
        "auto" attention picks per length and platform; moe_impl None means "ep" when
        the mesh splits the experts evenly, else "ragged".
      prefill_chunk: prompts longer than this are prefilled in equal pieces of at most
        this many tokens, each attending to the cache the earlier ones wrote, so
        activation memory is bounded by the piece, not the prompt (default: the
        attention chunk, else 8192 tokens).
      images: per prompt, None or a list of images (paths, PIL images, uint8 [H, W, 3]
        arrays) for conditional-generation checkpoints; chat messages may instead hold
        {"type": "image", "path": ...} parts. Each image fills one `<|image|>` placeholder
        (text prompts without one get them in front).
      max_images_per_prompt: a prompt with more images is refused.
      max_image_pixels: an image of more pixels is refused (files: from their header,
        before decoding).
      image_processor: a `llama4_jax.processor.ImageProcessor` (default: the model's tile
        size with transformers' defaults; `Processor.from_pretrained` reads the
        checkpoint's preprocessor_config.json).
      mesh, rules: run on a device mesh (`llama4_jax.sharding.make_mesh` or `jax.make_mesh`;
        default: the mesh of the params' shardings, if any) with params loaded onto it
        (`llama4_jax.load(path, mesh=mesh)`; a mesh over other devices raises ValueError): batches are
        split over the batch rule's axes (data-parallel), experts over `expert`
        (expert-parallel), the KV cache like the rules say. Same tokens as one device.
        A mesh that splits only the batch, over replicated params (e.g. "data=2" of CPU
        devices: `jax.config.update("jax_num_cpu_devices", 2)` before JAX starts), has
        each device prefill and decode its own rows as single-device code, and rounds
        `batch_size` up to a multiple of its devices; on CPU this uses one core per
        device (`llama4-jax generate --cpu-devices`).
      return_stats: return `(completions, stats)`, with `stats` a `GenerationStats`
        (prompt and generated token counts, prefill / decode / compile seconds, decode steps).
    """
    if isinstance(config, TextConfig):
        config = Llama4Config(text=config)
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ctx = context_length(config, max_model_len)
    if prefill_chunk is None:
        prefill_chunk = default_prefill_chunk(config)
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    samplings = [resolve(s) for s in _per_prompt(sampling, len(prompts), "sampling")]
    budgets = _per_prompt(max_new_tokens, len(prompts), "max_new_tokens")
    counts = [check_n(k) for k in _per_prompt(n, len(prompts), "n")]
    lp = [check_logprobs(k, config.text.vocab_size) for k in _per_prompt(logprobs, len(prompts), "logprobs")]
    mins = _per_prompt(min_new_tokens, len(prompts), "min_new_tokens")
    ignore = _per_prompt(ignore_eos, len(prompts), "ignore_eos")
    if any(not isinstance(x, bool) for x in ignore):
        raise ValueError(f"ignore_eos must be a bool or one bool per prompt, got {ignore_eos!r}")
    extra = _stop_token_lists(stop_token_ids, len(prompts), config.text.vocab_size)
    eos = tuple(config.text.eos_token_id)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be non-empty strings, got {stops!r}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts")
    requests = []
    for i, (p, s, m) in enumerate(zip(prompts, samplings, budgets)):
        ids, px = render_images(p, images[i] if images is not None else None, tokenizer, config, f"prompt {i}",
                                max_images_per_prompt, image_processor, max_image_pixels)
        own = tuple(sorted(set(() if ignore[i] else eos) | set(extra[i])))
        r = Request(ids, with_seed(s, seed, i), m, stops, px, samples=range(counts[i]), logprobs=lp[i],
                    stop_token_ids=own, min_new_tokens=mins[i])
        check_request(r, f"prompt {i}", config.text.vocab_size, ctx)
        requests.append(r)
    completions, stats = run_requests(config, params, requests, tokenizer=tokenizer, stop_token_ids=eos,
                                      batch_size=batch_size, max_model_len=ctx, kv_dtype=kv_dtype,
                                      attention_impl=attention_impl, moe_impl=moe_impl, prefill_chunk=prefill_chunk,
                                      mesh=mesh, rules=rules)
    if not (isinstance(n, int) and n == 1):  # one list per prompt, its samples in order
        flat = iter(completions)
        completions = [[next(flat) for _ in range(k)] for k in counts]
    return (completions, stats) if return_stats else completions
