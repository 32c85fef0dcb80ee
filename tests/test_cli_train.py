"""`llama4-jax train` on the shipped checkpoint: a short run whose output transformers and
`generate` load, packing, and every bad input (clear message, nothing written)."""

import json
import os

import numpy as np
import pytest

import llama4_jax
from llama4_jax import data
from llama4_jax.cli import main
from llama4_jax.generate import DEFAULT_MODEL

COMMON = ["--steps", "2", "--batch-size", "2", "--seq-len", "64", "--no-progress", "--save-every", "1"]


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)


def test_train_writes_a_checkpoint_transformers_and_generate_load(tmp_path, capsys):
    import torch
    import transformers

    inp = _write(tmp_path / "train.jsonl", [
        {"prompt": "12+30=", "completion": "42"},
        {"text": "a plain text document " * 3},
        {"prompt": "ab:123 cd:456 | cd:", "completion": "456"},
    ])
    out = str(tmp_path / "out")
    # Distilled from the shipped checkpoint itself, with the dynamic weight.
    assert main(["train", "--model", DEFAULT_MODEL, "--data", inp, "--out", out, "--teacher", DEFAULT_MODEL,
                 "--distill-weight", "dynamic", *COMMON]) == 0
    err = capsys.readouterr().err
    assert "3 examples" in err and "wrote" in err
    assert os.path.isdir(out + ".ckpt")
    logged = [json.loads(x) for x in open(os.path.join(out + ".ckpt", "metrics.jsonl"))]
    assert logged[-1]["step"] == 2 and "distill" in logged[-1] and 0 <= logged[-1]["alpha"] <= 1
    config, params = llama4_jax.load(out, dtype="float32")
    ids = np.array([[config.text.bos_token_id, 20, 21, 22]])
    ours = np.asarray(llama4_jax.forward(config, params, ids))
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(out, local_files_only=True,
                                                                        dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-4
    _, base = llama4_jax.load(DEFAULT_MODEL, dtype="float32")
    assert not np.allclose(np.asarray(base["params"]["embed"]), np.asarray(params["params"]["embed"]))
    # An existing --out needs --overwrite; the existing output is kept.
    assert main(["train", "--model", DEFAULT_MODEL, "--data", inp, "--out", out, *COMMON]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "config.json"))


def test_packing_and_loss_masks(tokenizer):
    config = llama4_jax.load_config(DEFAULT_MODEL)
    exs = [data.encode(tokenizer, config, prompt="1+2=", completion="3"),
           data.encode(tokenizer, config, text="hello world")]
    p = exs[0]
    assert p.ids[0] == config.text.bos_token_id
    assert p.loss_mask == [0] * (len(p.ids) - 2) + [1, 1]  # the completion and its end-of-turn token
    assert p.ids[-1] == data.end_of_turn_id(tokenizer)
    packed = data.pack(exs, 32, 0)
    n0, n1 = len(exs[0].ids), len(exs[1].ids)
    assert len(packed) == 1 and packed.attention_mask[0].sum() == n0 + n1
    assert packed.segment_ids[0].tolist() == [1] * n0 + [2] * n1 + [0] * (32 - n0 - n1)  # one segment an example
    assert data.make_batch(packed, [0])["segment_ids"].shape == (1, 32)
    long = data.encode(tokenizer, config, text="x" * 70)
    assert len(data.pack([long], 32, 0)) == 3  # text is split across rows
    with pytest.raises(data.DataError, match="more than --seq-len"):
        data.pack([data.encode(tokenizer, config, prompt="x" * 40, completion="y")], 32, 0)
    rows = [data.batch_rows(10, 4, s, seed=3) for s in range(5)]
    assert sorted(np.concatenate(rows[:2]).tolist() + rows[2][:2].tolist()) == list(range(10))  # an epoch
    assert (data.batch_rows(10, 4, 3, seed=3) == rows[3]).all()  # a pure function of the step


@pytest.mark.parametrize("lines, message", [
    (None, "no such file"),
    ([], "empty"),
    (['{"prompt": "1+1=", "completion": "2"}', "{not json"], "train.jsonl:2: invalid JSON"),
    (['{"prompt": "1+1="}'], ':1: expected "text", or "prompt" and "completion"'),
    (['{"text": "hi", "label": 3}'], ":1: unknown field"),
    (['[1, 2]'], ":1: expected a JSON object"),
])
def test_bad_data(tmp_path, capsys, lines, message):
    path = str(tmp_path / "train.jsonl")
    if lines is not None:
        with open(path, "w") as f:
            f.write("\n".join(lines))
    out = str(tmp_path / "out")
    assert main(["train", "--model", DEFAULT_MODEL, "--data", path, "--out", out, *COMMON]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_non_utf8_line(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    assert main(["train", "--model", DEFAULT_MODEL, "--data", str(path), "--out", str(tmp_path / "o"), *COMMON]) == 2
    assert "train.jsonl:2: not valid UTF-8" in capsys.readouterr().err


def test_bad_options(tmp_path, capsys):
    inp = _write(tmp_path / "train.jsonl", [{"text": "hello"}])
    out = str(tmp_path / "out")
    ctx = llama4_jax.load_config(DEFAULT_MODEL).text.max_position_embeddings
    cases = [
        (["--seq-len", str(ctx + 1)], "above the model's context"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--distill-weight", "often"], "--distill-weight"),
        (["--teacher", str(tmp_path)], "--teacher"),
    ]
    for extra, message in cases:
        argv = ["train", "--model", DEFAULT_MODEL, "--data", inp, "--out", out, *COMMON, *extra]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", inp, "--out", out, *COMMON]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_teacher_with_another_vocabulary(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    cfg = json.load(open(os.path.join(DEFAULT_MODEL, "config.json")))
    cfg["text_config"]["vocab_size"] += 64
    (teacher / "config.json").write_text(json.dumps(cfg))
    inp = _write(tmp_path / "train.jsonl", [{"text": "hello"}])
    argv = ["train", "--model", DEFAULT_MODEL, "--data", inp, "--out", str(tmp_path / "o"), "--teacher",
            str(teacher), *COMMON]
    assert main(argv) == 2
    assert "same vocabulary" in capsys.readouterr().err
