"""The formats of the default checkpoint's tasks (fixed: users and tests rely on them)."""

import json
import os
import re
import sys

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def script():
    """scripts/train_default_checkpoint.py as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    import train_default_checkpoint

    return train_default_checkpoint


def test_training_batches_of_the_default_checkpoint_script(script):
    """scripts/train_default_checkpoint.py: one shape per step, a pure function of the
    step, nearly no padding, and the multi-query recall rows put the loss on exactly
    the queried values."""
    tok, ids = script.build_tokenizer(65536)
    config = script.build_config(ids, -(-len(tok) // 64) * 64)
    batches = script.TaskBatches(tok, config, 2, seed=0)
    e = batches.multi_query(np.random.default_rng(0), "abc:123 xyz:456")
    text = tok.decode(e.ids[1:])
    assert text.startswith("abc:123 xyz:456 ; ")
    pairs = {"abc": "123", "xyz": "456"}
    queries = re.findall(r" ; ([a-z]{3}):(\d{3})", text)
    assert queries and all(pairs[k] == v for k, v in queries)
    trained = "".join(tok.decode([t]) for t, m in zip(e.ids, e.loss_mask) if m)
    assert trained == "".join(v for _, v in queries)
    from llama4_jax import tasks
    from llama4_jax.data import encode

    for seed in range(4):  # the table encoder equals data.encode on the same instances
        for task in ("add", "recall"):
            fast = batches.example(np.random.default_rng(seed), task)
            rng = np.random.default_rng(seed)
            e = tasks.add_example(rng) if task == "add" else tasks.recall_example(rng, script.recall_pairs(rng))
            ref = encode(tok, config, prompt=e["prompt"], completion=e["completion"])
            assert (fast.ids, fast.loss_mask) == (ref.ids, ref.loss_mask)
    b = batches(0)
    assert b["input_ids"].shape == (2, script.SEQ_LEN) and b["loss_mask"].sum() > 0
    assert b["pixel_values"].shape[0] == script.BATCH_TILES
    assert b["attention_mask"].mean() > 0.9  # first-fit packing leaves little padding
    assert all(np.array_equal(v, batches(0)[k]) for k, v in b.items())
    text = tok.decode(b["input_ids"][b["attention_mask"] > 0])
    assert re.search(r"\d+\+\d+=", text) and " ; " in text  # additions and multi-query recall in the mix
    assert "segment_ids" not in b  # the recorded stages' rows
    s = script.TaskBatches(tok, config, 2, seed=0, segments=True)(0)
    assert all(np.array_equal(v, s[k]) for k, v in b.items())  # the same rows, and their segments:
    for r in range(2):  # one per instance, each starting with BOS, 0 on the padding
        n = int(b["attention_mask"][r].sum())
        starts = np.flatnonzero(np.diff(s["segment_ids"][r, :n], prepend=0))
        assert (s["input_ids"][r, starts] == config.text.bos_token_id).all() and (s["segment_ids"][r, n:] == 0).all()
        assert (np.flatnonzero(s["input_ids"][r, :n] == config.text.bos_token_id) == starts).all()


def test_add_operands_cover_every_digit_count():
    """Each operand's digit count is uniform in 1..3, so short sums ("2+2=") are common,
    and long carry chains (999+1) are too."""
    rng = np.random.default_rng(1)
    ops = np.array([tasks.add_operand(rng) for _ in range(3000)])
    assert ops.min() == 0 and ops.max() <= 999
    digits = np.array([len(str(x)) for x in ops])
    assert all(abs(np.mean(digits == d) - 1 / 3) < 0.04 for d in (1, 2, 3))
    # ... and in a quarter of the sums one operand lies just below a power of ten (carries
    # through every digit), two or three digits in 2/3 of them: with the ~8% of other sums
    # that have such an operand by chance, 0.25 * 2/3 + 0.75 * 0.08 = 0.23.
    pairs = [tuple(map(int, tasks.add_example(rng)["prompt"][:-1].split("+"))) for _ in range(4000)]
    near = np.mean([any(90 <= x <= 99 or 990 <= x <= 999 for x in p) for p in pairs])
    assert 0.20 < near < 0.27, near


def test_training_stages_record(script, tmp_path):
    """The checkpoint's record of its training stages: read back, described one line a
    stage, a malformed record refused; the shipped checkpoint's last stage drew the
    add operands as `tasks.add_example` does now."""
    from llama4_jax.generate import DEFAULT_MODEL

    assert script.read_stages(str(tmp_path)) == []
    stage = {"batch_size": 16, "lr": 5e-4, "warmup": 30, "add_operands": "digit count uniform in 1..3", "steps": 600}
    (tmp_path / script.TRAINING_FILE).write_text(json.dumps({"stages": [dict(stage, steps=7663), stage]}))
    text = script.describe_stages(script.read_stages(str(tmp_path)))
    assert text.splitlines()[1] == ("2. 600 steps of 16 rows from stage 1's weights: AdamW, peak lr 0.0005, "
                                    "warm-up 30, cosine to 5%; add operands: digit count uniform in 1..3.")
    assert script.describe_stages([{"unrecorded": "mine"}, stage]).startswith(
        "1. the weights of `mine` (no training record)\n2. 600 steps of 16 rows from stage 1's weights")
    (tmp_path / script.TRAINING_FILE).write_text(json.dumps({"stages": "all of them"}))
    with pytest.raises(ValueError, match="expected"):
        script.read_stages(str(tmp_path))
    shipped = script.read_stages(DEFAULT_MODEL)
    assert shipped and shipped[-1]["add_operands"] == tasks.ADD_OPERANDS
