"""The `llama4-jax generate` command: JSONL prompts in, JSONL completions out.

    llama4-jax generate --model DIR --input prompts.jsonl --output out.jsonl [--resume | --overwrite]
        [--safety-model GUARD_DIR [--safety-on prompts|completions|both]]

Files are handled so that a long run loses at most the prompts in flight:
  * every path is checked before anything is loaded: the input exists and is not the
    output, the output is not a directory, and an existing output is refused unless
    `--resume` (keep it, do the rest) or `--overwrite` (start it again);
  * the input is read twice, lazily, one line at a time: a first pass checks every
    line (JSON, fields, tokens, the context, image headers: see `prompts.check_image_file`)
    and reports each bad one with its line number before the model is loaded; the
    second reads `--queue-size` requests at a time, renders their images, and runs
    them. A file need not fit in memory;
  * each completion is appended to the output as soon as it is done, one JSON object
    per line with its `id` and `sample` (0 .. n - 1: a line with `"n": 3` gives three
    records), flushed, so the file is valid JSONL at any moment (in the order
    completions finish, not the input order);
  * `--resume` skips the (id, sample) pairs already in the output and appends the rest
    (a sample draws with a seed derived from its id and index, so a resumed line gives
    the samples an uninterrupted run would); a truncated last line (a run killed
    mid-write) is dropped and redone;
  * SIGTERM or Ctrl-C stops the run after the line being written: the output holds
    every finished prompt, and `--resume` completes it.
The output is created with the process's umask, as any file the user writes.

`--safety-model` (a Llama Guard 4 checkpoint, `safety`) classifies each prompt and/or
completion: its tokenizer, config and chat template are checked, and every line's
conversation rendered through the template, in the first pass; its weights load right
after the model's (same --dtype and --mesh); each batch of finished completions is
classified in one batched call and written with its verdicts.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import signal
import sys

import jax

from . import distributed, engine, safety
from .generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, default_prefill_chunk
from .prompts import DEFAULT_MAX_IMAGE_PIXELS, check_image_file, image_processor_for, render, render_images
from .processor import load_tokenizer
from .sampling import Sampling, with_seed
from .scheduler import (Request, check_logprobs, check_n, check_request, check_stop_token_ids, context_length,
                        run_requests)

__all__ = ["add_arguments", "run"]

PROG = "llama4-jax generate"
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
_LINE_KEYS = {"id", "prompt", "messages", "images", "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids",
              "ignore_eos", "n", "logprobs", *_SAMPLING_KEYS}


class _InputError(ValueError):
    """A bad input line; str() is the message, `line` its 1-based number."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _Interrupted(Exception):
    """SIGTERM arrived: stop after the line being written."""


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint directory (Hugging Face format with tokenizer files, or converted); "
                             "default: the small trained checkpoint shipped with the package")
    parser.add_argument("--input", required=True,
                        help='JSONL, one request per line: {"id": ..., "prompt": "..."} or {"id": ..., '
                             '"messages": [...]}, optionally with "images" (paths, relative to the file\'s '
                             "directory), temperature, top_p, top_k, min_p, seed, repetition_penalty, presence_penalty, "
                             "frequency_penalty, max_new_tokens, stop, n, logprobs")
    parser.add_argument("--output", required=True,
                        help="JSONL of completions, one line per sample with its id and sample index, written as "
                             "each finishes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    mode.add_argument("--resume", action="store_true",
                      help="keep an existing --output, skip the ids it holds and append the rest")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=1024,
                        help="requests read ahead and sorted by length together (memory ~ their tokens and images)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                        help="no stop token or stop string ends a completion before N tokens (default: the "
                             "checkpoint's generation_config.json min_new_tokens, as transformers, else 0; a line's "
                             '"min_new_tokens" overrides it)')
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (the default unless generation_config.json says otherwise)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="> 0, 1 = off: divides positive logits (multiplies negative ones) of tokens in the prompt "
                             "or completion, as transformers' repetition_penalty")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="in [-2, 2]: subtracted from tokens already generated (as vLLM / OpenAI)")
    parser.add_argument("--frequency-penalty", type=float, default=None,
                        help="in [-2, 2]: times a token's count in the completion, subtracted (as vLLM / OpenAI)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the run's seed: a request without its own seed samples with one derived from this "
                             "and its id")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                        help='stop token besides the checkpoint\'s eos tokens (repeatable; a line\'s "stop_token_ids" '
                             "adds its own)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="the checkpoint's eos tokens do not end completions (they run to --max-new-tokens, a "
                             'stop string or a stop token; a line\'s "ignore_eos" overrides it)')
    parser.add_argument("--n", type=int, default=1, metavar="N",
                        help='samples per request (a line\'s "n" overrides it); each sample is its own output record '
                             '("sample": 0 .. N-1) with its own seed')
    parser.add_argument("--logprobs", type=int, nargs="?", const=0, default=None, metavar="K",
                        help='write each generated token\'s log-probability ("logprobs"); with K >= 1 also its K most '
                             'likely alternatives ("top_logprobs": [{"id", "token", "logprob"}, ...] per token); '
                             "of the model's distribution before temperature and filters. A line's \"logprobs\" (true, "
                             "false or K) overrides it")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="parameter dtype (auto: the checkpoint's)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16", "int8"],
                        help="KV cache dtype (default: the parameter dtype)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="a malformed input line fails the run before any work (default) or is skipped")
    parser.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "blockwise", "pallas"],
                        help="attention backend of prefill (decode steps read the cache in place): auto (the "
                             "platform's choice: on CPU xla for short contexts, blockwise for long ones; on GPU xla "
                             "while its scores fit 4 GiB), xla, blockwise or pallas")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                        help="prefill prompts longer than N tokens in equal pieces of at most N (bounds "
                             "activation memory; default: the model's attention chunk, else 8192)")
    parser.add_argument("--moe-impl", default=None, choices=["ragged", "dense", "ep"],
                        help="MoE strategy (default: ep when --mesh splits the experts, else ragged)")
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help='device mesh, e.g. "data=2,expert=4" (axes data, fsdp, expert, tensor, seq): the model '
                             "is loaded straight onto it and batches run data- and expert-parallel; seq=N alone "
                             "splits every layer's KV cache slots, each device reading its share (long contexts)")
    parser.add_argument("--cpu-devices", default="auto", metavar="N",
                        help="on CPU, without --mesh: decode each batch's rows on N devices side by side, one per "
                             "core (XLA runs a decode step on about one core; each device holds a copy of the "
                             "weights). auto (default): one for checkpoints under 32 MiB (their steps are per-op "
                             "overhead), else the cores, at most 8, as many as fit in half the free memory; 1: off. "
                             "With --mesh: the CPU devices it is made of (--mesh seq=2 --cpu-devices 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="keep compiled executables in DIR, so the next run with the same model and shapes "
                            "skips XLA compilation (default: $LLAMA4_JAX_COMPILE_CACHE, else "
                            "~/.cache/llama4_jax/xla; a JAX_COMPILATION_CACHE_DIR already set is kept)")
    cache.add_argument("--no-compile-cache", action="store_true", help="compile everything in this run")
    parser.add_argument("--max-images-per-prompt", type=int, default=8,
                        help='most images one request may carry ("images": [paths] or image parts of "messages")')
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="an image of more pixels is refused, from its header, before it is decoded")
    parser.add_argument("--safety-model", default=None, metavar="DIR",
                        help="a Llama Guard 4 checkpoint directory (weights, tokenizer with its chat template): "
                             "classify each prompt and/or completion (--safety-on) and record the verdicts in its "
                             'output line, "safety": {"prompt": V, "completion": V} with V = {"label": "safe" | '
                             '"unsafe" | "invalid", "categories": ["S1", ...], "text": the answer (unless safe)}; '
                             '"invalid" (an unreadable answer, or with "error" a conversation the classifier cannot '
                             "take, e.g. longer than its context) is never safe. Each batch of finished completions is "
                             "classified together (--batch-size rows), then written. Images go to the classifier with "
                             "the text (if it has no vision tower, only the text is classified, with a warning). Real "
                             "verdicts need the real checkpoint (meta-llama/Llama-Guard-4-12B)")
    parser.add_argument("--safety-on", default=None, choices=["prompts", "completions", "both"],
                        help="what --safety-model classifies: the prompt (its user and assistant turns; system "
                             "messages are left out), the completion (as the assistant's reply to the prompt), or "
                             "both (default)")
    distributed.add_arguments(parser)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _checkpoint_defaults(path: str) -> tuple[dict, set[int], str, object]:
    """(sampling defaults, extra stop ids, dtype name, min_new_tokens as written or None)
    from generation_config.json / config.json."""
    gen = {}
    gpath = os.path.join(path, "generation_config.json")
    if os.path.exists(gpath):
        gen = _read_json(gpath)
    defaults = {}
    if gen.get("do_sample"):
        for k in ("temperature", "top_p", "top_k", "min_p"):
            if gen.get(k) is not None:
                defaults[k] = gen[k]
    if gen.get("repetition_penalty") is not None:  # transformers applies it with or without sampling
        defaults["repetition_penalty"] = gen["repetition_penalty"]
    eos = gen.get("eos_token_id")
    stop_ids = set([eos] if isinstance(eos, int) else eos or [])
    dtype = "bfloat16"
    cpath = os.path.join(path, "config.json")
    if os.path.exists(cpath):
        c = _read_json(cpath)
        name = c.get("torch_dtype") or c.get("dtype") or (c.get("text_config") or {}).get("torch_dtype")
        if name in ("float32", "bfloat16", "float16"):
            dtype = name
    return defaults, stop_ids, dtype, gen.get("min_new_tokens")


def _id_key(i) -> str:
    """A hashable, type-exact key of a JSON id (7 and "7" differ)."""
    return json.dumps(i, sort_keys=True)


def _lines(path: str):
    """(line number, text) of each non-blank line, read lazily; invalid UTF-8 is an
    `_InputError` in place of the text."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines carry no request
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, _InputError(n, f"not valid UTF-8 ({e.reason} at byte {e.start})")


def _one_line(e: Exception) -> str:
    """An exception's message on one line (transformers' and jinja's span several)."""
    msg = " ".join(str(e).split())
    return msg if isinstance(e, ValueError) and msg else f"{type(e).__name__}: {msg}"


class _Safety:
    """--safety-model: the classifier, what it classifies, and its verdict counts."""

    def __init__(self, args, path: str, tokenizer, config):
        self.args, self.path, self.tokenizer, self.config = args, path, tokenizer, config
        on = args.safety_on or "both"
        self.keys = [k for k, flag in (("prompt", on != "completions"), ("completion", on != "prompts")) if flag]
        self.vision = config.vision is not None
        self.params = None
        self.text_only = 0  # prompts with images judged on their text (no vision tower)
        self.counts = collections.Counter()

    def _conversations(self, prompt, images, completion: str) -> list[list[dict]]:
        kw = dict(images=images, with_images=self.vision)
        return [safety.conversation(prompt, completion if k == "completion" else None, **kw) for k in self.keys]

    def check(self, prompt, images) -> None:
        """Render this line's conversations (a stand-in completion) through the chat
        template: raises what safety.conversation or the template raises."""
        from .processor import collect_message_images

        for conv in self._conversations(prompt, images, "..."):
            safety.render(collect_message_images(conv)[0], self.tokenizer)
        if not self.vision and any(isinstance(p, dict) and p.get("type") == "image"
                                   for m in safety.conversation(prompt, images=images) for p in m["content"]):
            self.text_only += 1

    def load(self, mesh) -> None:
        from . import load

        dtype = _checkpoint_defaults(self.path)[2] if self.args.dtype == "auto" else self.args.dtype
        _, self.params = load(self.path, dtype=dtype, mesh=mesh)

    def _classify(self, conversations: list, mesh) -> list[dict]:
        """Verdict dicts from one batched call. If the classifier refuses one (longer than
        its context), each conversation alone: a refused one gets an "invalid" verdict
        with the "error"."""
        try:
            return [v.as_dict() for v in safety.classify(
                self.config, self.params, conversations, tokenizer=self.tokenizer, batch_size=self.args.batch_size,
                image_processor=image_processor_for(self.path, self.config),
                max_images_per_prompt=self.args.max_images_per_prompt, max_image_pixels=self.args.max_image_pixels,
                mesh=mesh)]
        except ValueError as e:
            if len(conversations) == 1:  # generate and classify name it by its index in the call
                msg = re.sub(r"^(prompt|conversation) 0\b", "the conversation", _one_line(e))
                return [{"label": "invalid", "categories": [], "error": f"--safety-model cannot classify it: {msg}"}]
        return [d for conv in conversations for d in self._classify([conv], mesh)]

    def verdicts(self, items: list[tuple[tuple, str]], mesh) -> list[dict]:
        """One "safety" record per ((prompt, images), completion text), classified together."""
        convs = [c for source, text in items for c in self._conversations(*source, text)]
        flat = iter(self._classify(convs, mesh))
        records = [{k: next(flat) for k in self.keys} for _ in items]
        for rec in records:
            self.counts.update(v["label"] if "error" not in v else "error" for v in rec.values())
        return records

    def summary(self) -> str:
        c = self.counts
        errors = f" ({c['error']} could not be classified)" if c["error"] else ""
        return (f"safety: {sum(c.values())} verdict(s), {c['safe']} safe, {c['unsafe']} unsafe, "
                f"{c['invalid'] + c['error']} invalid{errors}")


class _Parser:
    """Input lines -> (id, Request, what --safety-model classifies), checked against the
    model, the classifier and the run's options."""

    def __init__(self, args, tokenizer, config, ctx: int, defaults: dict, eos: set[int], min_new: int,
                 guard: _Safety | None = None):
        self.args, self.tokenizer, self.config, self.ctx, self.defaults = args, tokenizer, config, ctx, defaults
        self.eos = eos  # the checkpoint's eos tokens: every request's stop tokens but with "ignore_eos"
        self.min_new = min_new  # a line's default min_new_tokens (capped by its max_new_tokens)
        self.guard = guard
        self.base = os.path.dirname(os.path.abspath(args.input))

    def parse(self, n: int, raw: str, *, decode_images: bool):
        """(id, Request, (prompt, images)) of line n; the last is what --safety-model
        classifies (None without it). decode_images=False (the checking pass): image
        files are checked from their headers only, and no pixels are made, and the
        classifier's conversations are rendered through its chat template."""
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
            raise _InputError(n, 'expected exactly one of "prompt" (a string) or "messages" (a list of chat '
                                 'messages)')
        if "prompt" in d and not isinstance(d["prompt"], str):
            raise _InputError(n, f'"prompt" must be a string, got {type(d["prompt"]).__name__}')
        if "messages" in d and (not isinstance(d["messages"], list) or not d["messages"]
                                or not all(isinstance(m, dict) for m in d["messages"])):
            raise _InputError(n, '"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
        rid = d.get("id", n)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise _InputError(n, f'"id" must be a string or an integer, got {rid!r}')
        try:
            samp = Sampling(**{**self.defaults, **{k: d[k] for k in _SAMPLING_KEYS if k in d}})
        except (ValueError, TypeError) as e:
            raise _InputError(n, f"invalid sampling parameter: {e}") from None
        max_new = d.get("max_new_tokens", self.args.max_new_tokens)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise _InputError(n, f'"max_new_tokens" must be an integer >= 1, got {max_new!r}')
        try:
            count = check_n(d.get("n", self.args.n), '"n"')
            logprobs = check_logprobs(d.get("logprobs", self.args.logprobs), self.config.text.vocab_size,
                                      '"logprobs"')
        except ValueError as e:
            raise _InputError(n, str(e)) from None
        stop = d.get("stop", self.args.stop)
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _InputError(n, f'"stop" must be a non-empty string or a list of them, got {stop!r}')
        ignore_eos = d.get("ignore_eos", self.args.ignore_eos)
        if not isinstance(ignore_eos, bool):
            raise _InputError(n, f'"ignore_eos" must be true or false, got {ignore_eos!r}')
        try:
            own = check_stop_token_ids(d.get("stop_token_ids", []), self.config.text.vocab_size, '"stop_token_ids"')
        except ValueError as e:
            raise _InputError(n, str(e)) from None
        stop_ids = tuple(sorted((set() if ignore_eos else self.eos) | set(self.args.stop_token_id) | set(own)))
        images = d.get("images")
        if images is not None and (not isinstance(images, list) or not all(isinstance(x, str) and x for x in images)):
            raise _InputError(n, f'"images" must be a list of image file paths, got {images!r}')
        if images:  # relative to the JSONL file, not to wherever the command runs
            images = [os.path.join(self.base, os.path.expanduser(p)) for p in images]
        prompt, where = d.get("prompt", d.get("messages")), "the prompt"
        try:
            if decode_images:
                ids, px = render_images(prompt, images, self.tokenizer, self.config, where,
                                        self.args.max_images_per_prompt, image_processor_for(self.args.model,
                                                                                              self.config),
                                        self.args.max_image_pixels)
            else:
                ids, px = self._check_images(prompt, images, where), None
            r = Request(ids, with_seed(samp, self.args.seed, rid), max_new, tuple(stop), px, samples=range(count),
                        logprobs=logprobs, stop_token_ids=stop_ids,
                        min_new_tokens=d.get("min_new_tokens", min(self.min_new, max_new)))
            check_request(r, where, self.config.text.vocab_size, self.ctx)
        except ValueError as e:
            raise _InputError(n, str(e)) from None
        except Exception as e:  # chat template errors come from jinja
            raise _InputError(n, f"cannot render the prompt: {type(e).__name__}: {e}") from None
        source = None
        if self.guard is not None:
            source = (prompt, images)
            if not decode_images:
                try:
                    self.guard.check(*source)
                except ValueError as e:  # from safety.conversation
                    raise _InputError(n, f"--safety-model: {_one_line(e)}") from None
                except Exception as e:  # the template's own errors come from jinja
                    raise _InputError(n, f"--safety-model: its chat template cannot render this prompt: "
                                         f"{_one_line(e)}") from None
        return rid, r, source

    def _check_images(self, prompt, images, where: str) -> list[int]:
        """The text's ids (image placeholders unexpanded) after checking every image
        file's header; the expanded length is checked when the images are decoded."""
        from .processor import ImageError, collect_message_images

        if isinstance(prompt, list):
            prompt, found = collect_message_images(prompt)
            images = list(images or []) + [p for p in found if isinstance(p, (str, os.PathLike))]
        try:
            if images and self.config.vision is None:
                raise ImageError(f"{len(images)} image(s) given, but the checkpoint has no vision tower "
                                 f"({self.config.architecture})")
            if len(images or ()) > self.args.max_images_per_prompt:
                raise ImageError(f"{len(images)} images, more than the limit of {self.args.max_images_per_prompt} "
                                 "per prompt (max_images_per_prompt)")
            for p in images or ():
                check_image_file(p, self.args.max_image_pixels)
        except ImageError as e:
            raise ValueError(f"{where}: {e}") from None
        return render(prompt, self.tokenizer, where)


def _finished_ids(path: str) -> tuple[set[tuple[str, int]], int]:
    """((id key, sample) of the records in an existing output, byte length of its valid
    part); a record without "sample" is sample 0.

    Read line by line. A last line that is cut short (no newline: the run was killed
    mid-write) is left out of the valid part, to be redone; a line that is not a
    record anywhere else raises ValueError (the file is not one of ours, or was
    edited: we do not guess)."""
    done, good = set(), 0
    with open(path, "rb") as f:
        for k, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # cut short
            if line.strip():
                try:
                    rec = json.loads(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    rec = None
                if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("sample", 0), int):
                    raise ValueError(f"--resume: {path}:{k} is not a completion record; not resuming over it")
                done.add((_id_key(rec["id"]), rec.get("sample", 0)))
            good += len(line)
    return done, good


def _weight_bytes(model: str) -> int:
    """Bytes of the checkpoint's safetensors files (0 if none are found)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(model) if e.name.endswith(".safetensors") and e.is_file())
    except OSError:
        return 0


def _err(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _check_paths(args) -> str | None:
    """The error message of bad --input / --output paths, or None."""
    if not os.path.isfile(args.input):
        return f"--input: no such file: {args.input}"
    if os.path.isdir(args.output):
        return f"--output {args.output} is a directory; name a file"
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output) or \
            os.path.realpath(args.input) == os.path.realpath(args.output):
        return f"--output {args.output} is the --input file; name another file"
    if os.path.exists(args.output) and not (args.overwrite or args.resume):
        return f"--output {args.output} exists; pass --overwrite to replace it or --resume to complete it"
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        return f"--output: directory {out_dir} does not exist"
    if not os.access(out_dir, os.W_OK) or os.path.exists(args.output) and not os.access(args.output, os.W_OK):
        return f"--output {args.output} is not writable"
    return None


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM raises `_Interrupted` in the main thread for the duration (elsewhere: nothing)."""
    def handler(signum, frame):
        raise _Interrupted()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args) -> int:
    # Cheap checks first, before anything is loaded.
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--min-new-tokens", args.min_new_tokens or 0, 0),
                             ("--n", args.n, 1), ("--logprobs", 0 if args.logprobs is None else args.logprobs, 0),
                             ("--queue-size", args.queue_size, 1), ("--max-images-per-prompt",
                                                                    args.max_images_per_prompt, 0),
                             ("--max-image-pixels", args.max_image_pixels, 1),
                             ("--prefill-chunk", 1 if args.prefill_chunk is None else args.prefill_chunk, 1)):
        if value < low:
            return _err(f"{flag} must be >= {low}, got {value}")
    if (args.min_new_tokens or 0) > args.max_new_tokens:
        return _err(f"--min-new-tokens ({args.min_new_tokens}) must be at most --max-new-tokens "
                    f"({args.max_new_tokens})")
    if args.cpu_devices != "auto" and not (args.cpu_devices.isdigit() and int(args.cpu_devices) >= 1):
        return _err(f"--cpu-devices must be a positive integer or 'auto', got {args.cpu_devices!r}")
    flags = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
             "frequency_penalty": args.frequency_penalty}
    try:
        Sampling(**{k: v for k, v in flags.items() if v is not None}, seed=args.seed)
    except ValueError as e:
        return _err(f"invalid sampling option: {e}")
    if any(not s for s in args.stop):
        return _err("--stop must not be empty")
    if args.safety_on and not args.safety_model:
        return _err("--safety-on needs --safety-model DIR (the classifier)")
    bad_path = _check_paths(args)
    if bad_path:
        return _err(bad_path)
    # --no-compile-cache, else --compile-cache, else a cache jax was already given, else ours.
    cache_dir = None if args.no_compile_cache or (not args.compile_cache and jax.config.jax_compilation_cache_dir) \
        else args.compile_cache or engine.default_compile_cache()
    if cache_dir is not None:
        try:
            engine.use_compile_cache(cache_dir)
        except OSError as e:  # a read-only home: run, compiling everything
            print(f"{PROG}: warning: no compile cache ({cache_dir}: {e.strerror}); compiling everything",
                  file=sys.stderr)
    finished, valid_bytes = set(), 0
    if args.resume and os.path.exists(args.output):
        try:
            finished, valid_bytes = _finished_ids(args.output)
        except ValueError as e:
            return _err(str(e))
    model = args.model
    if not os.path.isdir(model):
        return _err(f"--model: no such checkpoint directory: {model}")
    if not os.path.exists(os.path.join(model, "config.json")):
        return _err(f"--model: {model} has no config.json (expected a Hugging Face-format checkpoint)")
    guard_dir = args.safety_model
    if guard_dir is not None and not os.path.isdir(guard_dir):
        return _err(f"--safety-model: no such checkpoint directory: {guard_dir}")
    if guard_dir is not None and not os.path.exists(os.path.join(guard_dir, "config.json")):
        return _err(f"--safety-model: {guard_dir} has no config.json (expected a Llama Guard 4 checkpoint in "
                    "Hugging Face format)")
    if os.path.abspath(model) == DEFAULT_MODEL:
        print(f"{PROG}: using the default checkpoint (a small model trained on the add, recall and color tasks of "
              "llama4_jax.tasks; see its README)", file=sys.stderr)

    from . import load, load_config

    defaults, extra_stop, ckpt_dtype, min_new = _checkpoint_defaults(model)
    if args.min_new_tokens is not None:
        min_new = args.min_new_tokens
    elif min_new is None:
        min_new = 0
    elif not isinstance(min_new, int) or isinstance(min_new, bool) or min_new < 0:
        return _err(f"--model: {model}'s generation_config.json has an invalid min_new_tokens: {min_new!r} (expected "
                    "an integer >= 0)")
    defaults = {**defaults, **{k: v for k, v in flags.items() if v is not None}}
    defaults.setdefault("temperature", 0.0)
    try:  # the flags are checked above: what fails here came from generation_config.json
        Sampling(**defaults)
    except (ValueError, TypeError) as e:
        return _err(f"--model: {model}'s generation_config.json has an invalid sampling setting: {e}")
    try:
        tokenizer = load_tokenizer(model)
        config = load_config(model)
    except Exception as e:
        return _err(f"--model: cannot load a tokenizer and config from {model}: {_one_line(e)}")
    try:
        ctx = context_length(config, args.max_model_len)
    except ValueError as e:
        return _err(f"--max-model-len: {e}")
    try:
        check_stop_token_ids(args.stop_token_id, config.text.vocab_size, "--stop-token-id")
    except ValueError as e:
        return _err(str(e))
    if (args.logprobs or 0) > config.text.vocab_size:
        return _err(f"--logprobs must be at most the vocabulary size {config.text.vocab_size}, got {args.logprobs}")
    guard = None
    if guard_dir is not None:
        try:
            guard_tokenizer = load_tokenizer(guard_dir)
            guard = _Safety(args, guard_dir, guard_tokenizer, load_config(guard_dir))
        except Exception as e:
            return _err(f"--safety-model: cannot load a tokenizer and config from {guard_dir}: {_one_line(e)}")
        if not getattr(guard.tokenizer, "chat_template", None):
            return _err(f"--safety-model: the tokenizer of {guard_dir} has no chat template (Llama Guard's asks the "
                        "model for its verdict)")

    # Pass 1: check every line before the model is loaded.
    eos = set(config.text.eos_token_id) | extra_stop
    parser = _Parser(args, tokenizer, config, ctx, defaults, eos, min_new, guard)
    # todo: samples to make; partial[n]: the samples of line n still to make if some are written (--resume).
    errors, seen, todo, done_lines, partial = {}, {}, 0, set(), {}
    for n, raw in _lines(args.input):
        try:
            if isinstance(raw, _InputError):
                raise raw
            rid, r, _ = parser.parse(n, raw, decode_images=False)
            key = _id_key(rid)
            if key in seen:
                raise _InputError(n, f"duplicate id {rid!r} (also on line {seen[key]})")
            seen[key] = n
            left = [j for j in r.samples if (key, j) not in finished] if finished else r.samples
            if not left:
                done_lines.add(n)
            elif len(left) < len(r.samples):
                partial[n] = tuple(left)
            todo += len(left)
        except _InputError as e:
            errors[n] = e
            print(f"{args.input}:{n}: {e}", file=sys.stderr)
    del seen
    if errors and args.on_error == "fail":
        return _err(f"{len(errors)} bad input line(s); nothing was generated (--on-error skip to skip them)")
    if errors:
        print(f"{PROG}: skipping {len(errors)} bad input line(s)", file=sys.stderr)
    if not todo and not finished:
        return _err(f"{args.input} has no valid requests")
    if not todo:
        print(f"{PROG}: {args.output} already holds every request of {args.input}; nothing to do", file=sys.stderr)
        return 0
    if guard is not None and guard.text_only:
        print(f"{PROG}: warning: --safety-model {guard_dir} has no vision tower: {guard.text_only} prompt(s) of "
              f"{args.input} have images, which are not classified, only their text", file=sys.stderr)

    try:
        mesh, main_process = distributed.start(args, PROG, weight_bytes=_weight_bytes(model))
    except ValueError as e:
        return _err(str(e))
    try:
        config, params = load(model, dtype=ckpt_dtype if args.dtype == "auto" else args.dtype, mesh=mesh)
    except Exception as e:
        return _err(f"--model: cannot load {model}: {type(e).__name__}: {e}")
    if guard is not None:
        try:
            guard.load(mesh)
        except Exception as e:
            return _err(f"--safety-model: cannot load {guard_dir}: {_one_line(e)}")

    from tqdm import tqdm

    from .engine import GenerationStats

    stats, written, late_errors = GenerationStats(), 0, 0
    token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))  # top_logprobs' "token"
    out = None
    if main_process:  # every process computes the same results; process 0 writes them
        if args.resume and os.path.exists(args.output):
            with open(args.output, "r+b") as f:
                f.truncate(valid_bytes)  # a cut-short last line is redone
            out = open(args.output, "a", encoding="utf-8")
        else:
            out = open(args.output, "w", encoding="utf-8")
    run_kw = dict(tokenizer=tokenizer, stop_token_ids=eos,
                  batch_size=args.batch_size, max_model_len=ctx, kv_dtype=args.kv_cache_dtype,
                  attention_impl=args.attention_impl, moe_impl=args.moe_impl, mesh=mesh, stats=stats,
                  prefill_chunk=args.prefill_chunk or default_prefill_chunk(config))
    try:
        with _sigterm_stops(), tqdm(total=todo, desc="generate", unit="completion", file=sys.stderr,
                                    disable=args.no_progress or not main_process) as bar:
            queue: list[tuple[object, Request, tuple | None]] = []  # (id, request, what --safety-model reads)

            def write_batch(done):
                """Write a finished batch's lines (with their verdicts, classified together), each flushed."""
                nonlocal written
                verdicts = [None] * len(done)
                if guard is not None:  # every process classifies (the classifier may span them all)
                    verdicts = guard.verdicts([(queue[k][2], c.text) for k, c in done], mesh)
                for (k, c), verdict in zip(done, verdicts):
                    bar.update(1)
                    if out is None:
                        continue
                    rec = {"id": queue[k][0], "sample": c.sample, "text": c.text, "token_ids": c.token_ids,
                           "finish_reason": c.finish_reason, "prompt_tokens": len(c.prompt_token_ids)}
                    if c.logprobs is not None:
                        rec["logprobs"] = c.logprobs
                    if c.top_logprobs is not None:
                        rec["top_logprobs"] = [[{"id": t, "token": token_text(t), "logprob": lp} for t, lp in step]
                                               for step in c.top_logprobs]
                    if verdict is not None:
                        rec["safety"] = verdict
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one whole line, then flushed
                    out.flush()
                    written += 1

            def flush_queue():
                run_requests(config, params, [r for _, r, _ in queue], on_batch=write_batch, **run_kw)
                queue.clear()

            # Pass 2: read lazily, --queue-size requests at a time, images decoded when queued.
            for n, raw in _lines(args.input):
                if n in errors or n in done_lines:  # checked bad, or finished before (--resume)
                    continue
                try:
                    rid, r, source = parser.parse(n, raw, decode_images=True)
                except _InputError as e:  # only image prompts can fail here (their expanded length)
                    print(f"{args.input}:{n}: {e}", file=sys.stderr)
                    if args.on_error == "fail":
                        raise
                    late_errors += 1
                    continue
                if n in partial:  # --resume: only the samples not written yet
                    r.samples = partial[n]
                queue.append((rid, r, source))
                if len(queue) >= args.queue_size:
                    flush_queue()
            if queue:
                flush_queue()
    except (_Interrupted, KeyboardInterrupt):
        print(f"{PROG}: interrupted: {written} completion(s) written to {args.output} this run; run again with "
              "--resume to do the rest", file=sys.stderr)
        return 130
    except _InputError:
        return _err(f"stopped at a bad input line; {written} completion(s) written to {args.output} "
                    "(--resume continues, --on-error skip skips such lines)")
    finally:
        if out is not None:
            out.close()
    if main_process:
        skipped = len(errors) + late_errors
        kept = f"; kept {len(finished)} finished before (--resume)" if finished else ""
        print(f"{PROG}: wrote {args.output}: {stats.summary()}{kept}"
              + (f"; skipped {skipped} bad line(s)" if skipped else "")
              + (f"; {guard.summary()}" if guard is not None else ""), file=sys.stderr)
    return 0
