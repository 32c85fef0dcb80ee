"""Training data: examples -> token ids with a loss mask, packed into fixed-length rows.

An example is text (`{"text": ...}`: loss on every token after the first) or a prompt
and its completion (`{"prompt": ..., "completion": ...}`, optionally `"images"`: loss
on the completion and the end-of-turn token only). Prompts are rendered exactly as
`generate` renders them (the tokenizer's BOS, images expanded to their tiles' token
layout), so what is trained is what is asked at inference.

Packing: examples are laid end to end into rows of `seq_len` tokens in order; an
example that does not fit the rest of a row starts the next one, the rest of the row
is padding (attention_mask 0). Each example of a row is a segment of its own
(`segment_ids`): it attends only to itself and its positions start at 0, so it is
trained exactly as it is computed alone (at inference, a prompt is alone in its
row), and its first token is not a target of the example before it
(`train.loss_fn`). Text longer than a row is split across rows, each piece a segment;
a prompt with its completion must fit one row.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Sequence

import numpy as np

from .config import Llama4Config
from .prompts import render_images


class DataError(ValueError):
    """A training example that cannot be used (the message names its line)."""


@dataclasses.dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]
    pixel_values: np.ndarray | None = None  # [tiles, 3, S, S] for the example's <|patch|> tokens
    splittable: bool = False  # plain text may be split across rows


def end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids("<|eot|>")
    if tid is None or tid == tokenizer.unk_token_id:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise DataError("the tokenizer has neither <|eot|> nor an eos token to end a completion with")
    return int(tid)


def encode(tokenizer, config: Llama4Config, *, text=None, prompt=None, completion=None, images=None,
           image_processor=None, where: str = "example") -> Example:
    """One example -> Example (ids with the loss mask and the image tiles)."""
    if text is not None:
        if prompt is not None or completion is not None or images:
            raise DataError(f'{where}: give either "text" or "prompt" + "completion", not both')
        if not isinstance(text, str) or not text:
            raise DataError(f'{where}: "text" must be a non-empty string')
        ids = list(tokenizer(text)["input_ids"])
        return Example(ids, [0] + [1] * (len(ids) - 1), splittable=True)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f'{where}: expected "text", or "prompt" and "completion" (strings)')
    try:
        ids, px = render_images(prompt, images, tokenizer, config, where, 64, image_processor)
    except ValueError as e:
        raise DataError(str(e)) from None
    comp = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [end_of_turn_id(tokenizer)]
    return Example(list(ids) + comp, [0] * len(ids) + [1] * len(comp), px)


_KEYS = {"text", "prompt", "completion", "images", "id"}


def read_jsonl(path: str, tokenizer, config: Llama4Config, image_processor=None) -> list[Example]:
    """Examples of a JSONL file; raises DataError naming the line of a bad one."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(d, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
            unknown = sorted(set(d) - _KEYS)
            if unknown:
                raise DataError(f"{path}:{n}: unknown field(s) {unknown}; allowed: {sorted(_KEYS)}")
            images = d.get("images")
            if images is not None and (not isinstance(images, list) or not all(isinstance(x, str) for x in images)):
                raise DataError(f'{path}:{n}: "images" must be a list of image file paths')
            out.append(encode(tokenizer, config, text=d.get("text"), prompt=d.get("prompt"),
                              completion=d.get("completion"), images=images, image_processor=image_processor,
                              where=f"{path}:{n}"))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


@dataclasses.dataclass
class Packed:
    """Rows of `seq_len` tokens: input_ids, attention_mask, loss_mask int32 [N, L];
    tiles[i]: the image tiles of row i ([n_i, 3, S, S] or None); segment_ids int32
    [N, L]: which example of its row each token belongs to (1, 2, ...; 0 for padding),
    or None for rows whose tokens may attend to every earlier token of the row."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    tiles: list
    segment_ids: np.ndarray | None = None

    def __len__(self):
        return self.input_ids.shape[0]


def pack(examples: Iterable[Example], seq_len: int, pad_id: int) -> Packed:
    """Lay examples end to end into rows of seq_len tokens (see the module docstring)."""
    rows, cur = [], None

    def new_row():
        return {"ids": [], "loss": [], "tiles": [], "seg": []}

    for i, ex in enumerate(examples):
        pieces = [ex]
        if len(ex.ids) > seq_len:
            if not ex.splittable:
                raise DataError(f"example {i + 1} has {len(ex.ids)} tokens, more than --seq-len {seq_len}; "
                                f"shorten it or raise --seq-len")
            pieces = [Example(ex.ids[j:j + seq_len], ex.loss_mask[j:j + seq_len])
                      for j in range(0, len(ex.ids), seq_len)]
        for p in pieces:
            if cur is None or len(cur["ids"]) + len(p.ids) > seq_len:
                if cur is not None:
                    rows.append(cur)
                cur = new_row()
            cur["seg"] += [(cur["seg"][-1] if cur["seg"] else 0) + 1] * len(p.ids)
            cur["ids"] += p.ids
            cur["loss"] += p.loss_mask
            if p.pixel_values is not None:
                cur["tiles"].append(p.pixel_values)
    if cur is not None and cur["ids"]:
        rows.append(cur)
    if not rows:
        raise DataError("no examples to pack")
    n = len(rows)
    ids = np.full((n, seq_len), pad_id, np.int32)
    att = np.zeros((n, seq_len), np.int32)
    loss = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        k = len(row["ids"])
        ids[r, :k], att[r, :k], loss[r, :k], seg[r, :k] = row["ids"], 1, row["loss"], row["seg"]
    tiles = [np.concatenate(r["tiles"]) if r["tiles"] else None for r in rows]
    return Packed(ids, att, loss, tiles, seg)


def tile_bucket(n: int) -> int:
    """Tiles a batch's pixel_values is padded to: the next power of two (few shapes)."""
    return 1 << max(0, n - 1).bit_length()


def make_batch(packed: Packed, rows: Sequence[int], *, num_tiles: int | None = None) -> dict:
    """The batch of the given rows; image tiles concatenated in row order and padded
    with zero tiles to num_tiles (default `tile_bucket` of their count; extra tiles are
    never read by the model)."""
    rows = np.asarray(rows)
    batch = {"input_ids": packed.input_ids[rows], "attention_mask": packed.attention_mask[rows],
             "loss_mask": packed.loss_mask[rows]}
    if packed.segment_ids is not None:
        batch["segment_ids"] = packed.segment_ids[rows]
    tiles = [packed.tiles[r] for r in rows if packed.tiles[r] is not None]
    if tiles:
        px = np.concatenate(tiles).astype(np.float32)
        pad = (num_tiles or tile_bucket(px.shape[0])) - px.shape[0]
        if pad < 0:
            raise DataError(f"the batch holds {px.shape[0]} image tiles, more than num_tiles={num_tiles}")
        batch["pixel_values"] = np.concatenate([px, np.zeros((pad, *px.shape[1:]), px.dtype)]) if pad else px
    return batch


def batch_rows(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of the batch of `step`: epochs of seeded permutations, a pure
    function of (step, seed), so a resumed run sees exactly the batches it would have."""
    out, perms = [], {}
    first = step * batch_size
    for j in range(first, first + batch_size):
        epoch, k = divmod(j, num_rows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out.append(perms[epoch][k])
    return np.asarray(out)


class Prefetch:
    """`batches(step)` computed ahead in worker processes.

        with Prefetch(batches, workers=8) as fetch:
            trainer.fit(config, params, fetch, ...)

    `batches` must be a picklable pure function of the step (a module-level function or
    an instance of a module-level class): the workers compute steps s+1 .. s+depth while
    step s trains, and `fetch(s)` returns exactly `batches(s)`. A call out of sequence
    (a resumed run) drops what was queued and starts again from that step. The workers
    are started with "spawn" (no fork of a process whose runtime holds threads) and run
    JAX on the CPU only, so they never claim an accelerator.
    """

    def __init__(self, batches: Callable[[int], dict], *, workers: int, depth: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.batches, self.workers, self.depth = batches, workers, depth or 2 * workers
        self._pool, self._queued = None, {}

    def _start(self):
        import concurrent.futures as cf
        import multiprocessing as mp
        import os

        # The children inherit the environment at start: keep their JAX off any accelerator.
        saved = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"
        try:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        finally:
            if saved is None:
                del os.environ["JAX_PLATFORMS"]
            else:
                os.environ["JAX_PLATFORMS"] = saved

    def __call__(self, step: int) -> dict:
        if self._pool is None:
            self._start()
        if step not in self._queued:
            for f in self._queued.values():
                f.cancel()
            self._queued = {}
        for s in range(step, step + self.depth + 1):
            if s not in self._queued:
                self._queued[s] = self._pool.submit(self.batches, s)
        return self._queued.pop(step).result()

    def close(self):
        if self._pool is not None:
            for f in self._queued.values():
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._queued = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
