"""The synthetic tasks the shipped checkpoint is trained on, and their grading.

Formats (fixed; users and tests rely on them); a completion is graded by exact match
of its stripped text:

* add:    prompt "{a}+{b}=" with 0 <= a, b <= 999            -> "{a+b}"
          each operand's digit count uniform in 1..3, then its value uniform
          among the numbers of that many digits (drawn uniformly from 0..999,
          nine operands in ten would have three digits and the model would
          rarely see "2+2=" or "45+7="); in a quarter of them one operand
          lies just below a power of ten (999+1 carries through every digit)
* recall: prompt "{k1}:{v1} {k2}:{v2} ... {kn}:{vn} | {kq}:"  -> "{vq}"
          n distinct keys of three random lowercase letters, values 100..999,
          kq one of the keys
* color:  prompt "color?" with one image filled with one color (each RGB channel
          within +-20 of the pure color, 32 to 512 pixels a side, any aspect
          ratio)                                              -> the color's name
"""

from __future__ import annotations

import string
import zlib

import numpy as np

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "black": (0, 0, 0), "white": (255, 255, 255), "orange": (255, 165, 0), "purple": (128, 0, 128),
}


def number_with_digits(rng: np.random.Generator, digits: int) -> int:
    """Uniform among the numbers of that many digits (1: 0..9, 2: 10..99, ...)."""
    return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))


def add_operand(rng: np.random.Generator) -> int:
    """0..999 with its digit count uniform in 1..3 (0..9, 10..99, 100..999 a third each)."""
    return number_with_digits(rng, int(rng.integers(1, 4)))


# The share of additions whose one operand lies just below a power of ten (0..9,
# 90..99, 990..999): their sums carry through every digit (999+1, 97+8), which operands
# drawn by digit count alone make rare (under 1% of three-digit plus one-digit sums).
CARRY_SHARE = 0.25
# How `add_example` draws its operands, in words (recorded with each training stage of
# the shipped checkpoint; its first stage drew them uniformly from 0..999).
ADD_OPERANDS = "digit count uniform in 1..3, a quarter with one operand in 0..9, 90..99 or 990..999"


def add_example(rng: np.random.Generator) -> dict:
    a, b = add_operand(rng), add_operand(rng)
    if rng.random() < CARRY_SHARE:
        a = 10 ** len(str(a)) - 1 - int(rng.integers(10))
        if rng.random() < 0.5:
            a, b = b, a
    return {"task": "add", "prompt": f"{a}+{b}=", "completion": str(a + b)}


def recall_prompt_tokens(n: int) -> int:
    """Characters of a recall prompt with n pairs (one token each with a byte tokenizer)."""
    return 8 * n - 1 + 3 + 4


def recall_example(rng: np.random.Generator, n: int) -> dict:
    """n distinct three-letter keys with three-digit values; one of them is asked."""
    if n < 1:
        raise ValueError(f"recall needs n >= 1 pairs, got {n}")
    letters = np.array(list(string.ascii_lowercase))
    keys: dict[str, None] = {}
    while len(keys) < n:
        for k in rng.choice(letters, (2 * (n - len(keys)) + 4, 3)):
            keys.setdefault("".join(k), None)
            if len(keys) == n:
                break
    keys = list(keys)
    values = rng.integers(100, 1000, n)
    q = int(rng.integers(n))
    body = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    return {"task": "recall", "prompt": f"{body} | {keys[q]}:", "completion": str(values[q])}


def color_image(rng: np.random.Generator, name: str) -> np.ndarray:
    """uint8 [H, W, 3]: the pure color +-20 per channel (one draw per image), random size."""
    h, w = (int(x) for x in rng.integers(32, 513, 2))
    rgb = np.clip(np.asarray(COLORS[name]) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
    return np.broadcast_to(rgb, (h, w, 3)).copy()


def color_example(rng: np.random.Generator) -> dict:
    name = str(rng.choice(list(COLORS)))
    return {"task": "color", "prompt": "color?", "completion": name, "image": color_image(rng, name)}


def grade(completion: str, expected: str) -> bool:
    """Exact match of the stripped completion text."""
    return completion.strip() == expected.strip()


def make_examples(task: str, n: int, seed: int, *, recall_pairs: tuple[int, int] = (1, 62)) -> list[dict]:
    """n fresh instances of a task (recall: pair counts uniform in recall_pairs, inclusive)."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    if task == "add":
        return [add_example(rng) for _ in range(n)]
    if task == "recall":
        lo, hi = recall_pairs
        return [recall_example(rng, int(rng.integers(lo, hi + 1))) for _ in range(n)]
    if task == "color":
        return [color_example(rng) for _ in range(n)]
    raise ValueError(f"unknown task {task!r}; tasks: add, recall, color")


def evaluate(config, params, tokenizer, examples: list[dict], *, image_processor=None, batch_size: int = 16,
             max_new_tokens: int = 8, attention_impl: str = "auto") -> tuple[float, list[str]]:
    """Greedy completions of `examples` graded by exact match: (accuracy, completions)."""
    from .generate import generate

    prompts = [e["prompt"] for e in examples]
    images = [[e["image"]] if "image" in e else None for e in examples]
    outs = generate(config, params, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, images=images if any(images) else None,
                    image_processor=image_processor, attention_impl=attention_impl)
    texts = [o.text for o in outs]
    acc = float(np.mean([grade(t, e["completion"]) for t, e in zip(texts, examples)]))
    return acc, texts
