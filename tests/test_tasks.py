"""The formats of the default checkpoint's tasks (fixed: users and tests rely on them)."""

import re

import numpy as np

from llama4_jax import tasks


def test_formats():
    rng = np.random.default_rng(0)
    for _ in range(200):
        e = tasks.add_example(rng)
        a, b = map(int, re.fullmatch(r"(\d{1,3})\+(\d{1,3})=", e["prompt"]).groups())
        assert e["completion"] == str(a + b)
        n = int(rng.integers(1, 40))
        e = tasks.recall_example(rng, n)
        m = re.fullmatch(r"((?:[a-z]{3}:\d{3} )*[a-z]{3}:\d{3}) \| ([a-z]{3}):", e["prompt"])
        pairs = dict(p.split(":") for p in m.group(1).split(" "))
        assert len(pairs) == n and all(100 <= int(v) <= 999 for v in pairs.values())
        assert pairs[m.group(2)] == e["completion"]
        assert len(e["prompt"]) == tasks.recall_prompt_tokens(n)
    for _ in range(50):
        e = tasks.color_example(rng)
        img, ref = e["image"], np.asarray(tasks.COLORS[e["completion"]])
        assert img.dtype == np.uint8 and 32 <= img.shape[0] <= 512 and 32 <= img.shape[1] <= 512
        assert (np.abs(img.reshape(-1, 3).astype(int) - ref).max(0) <= 20).all()
        assert e["prompt"] == "color?"


def test_make_examples_and_grade():
    a = tasks.make_examples("recall", 5, seed=1, recall_pairs=(3, 3))
    assert a == tasks.make_examples("recall", 5, seed=1, recall_pairs=(3, 3))  # seeded
    assert all(e["prompt"].count(":") == 4 for e in a)
    assert tasks.grade(" 579\n", "579") and not tasks.grade("5790", "579")
