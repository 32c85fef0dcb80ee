"""`llama4-jax generate` on the shipped checkpoint: round trip, stop strings, every bad input."""

import json
import os

import pytest

import llama4_jax
from llama4_jax.cli import main
from llama4_jax.generate import DEFAULT_MODEL

# The same batch size and token budget everywhere, so one compiled prefill/decode serves
# every test that generates.
COMMON = ["--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_default_checkpoint_tokenizer(tokenizer):
    ids = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ids.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are brief.<|eot|>")
    assert ids.endswith("<|header_start|>assistant<|header_end|>\n\n")
    config = llama4_jax.load_config(DEFAULT_MODEL)
    eot, eom = tokenizer.convert_tokens_to_ids(["<|eot|>", "<|eom|>"])
    assert {eot, eom} <= set(config.text.eos_token_id)
    assert tokenizer("hi")["input_ids"][0] == config.text.bos_token_id
    assert len(tokenizer) <= config.text.vocab_size


def test_round_trip(tmp_path, capsys, tokenizer):
    inp = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "What is the capital of France?"},
        {"id": 7, "messages": CHAT, "temperature": 0.8, "top_p": 0.9, "seed": 3},
        "",  # blank lines carry no request
        {"prompt": "One, two, three", "max_new_tokens": 5},
    ])
    out = str(tmp_path / "out.jsonl")
    assert main(["generate", "--input", inp, "--output", out, "--logprobs", *COMMON]) == 0
    err = capsys.readouterr().err
    assert "default checkpoint" in err and "3 prompts" in err and "tok/s" in err
    recs = _read(out)  # in the order they finished
    assert sorted(map(str, (r["id"] for r in recs))) == ["4", "7", "a"]  # a missing id is the line number
    recs.sort(key=lambda r: ["a", 7, 4].index(r["id"]))
    chat_ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    assert [r["prompt_tokens"] for r in recs] == [
        len(tokenizer("What is the capital of France?")["input_ids"]), len(chat_ids),
        len(tokenizer("One, two, three")["input_ids"])]
    for r, limit in zip(recs, (8, 8, 5)):
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= len(r["token_ids"]) <= limit and len(r["logprobs"]) == len(r["token_ids"])
        assert r["text"] == tokenizer.decode(r["token_ids"], skip_special_tokens=True)
        assert all(lp <= 0 for lp in r["logprobs"])
    assert len(recs[2]["token_ids"]) == 5 or recs[2]["finish_reason"] == "stop"  # its own max_new_tokens
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_cpu_devices_decode_side_by_side(tmp_path, capsys, monkeypatch):
    """--cpu-devices 2 decodes each device's rows on its own (a data mesh over
    replicated weights) and writes what one device writes; auto keeps one device for a
    checkpoint as small as the shipped one, and the memory bound caps it."""
    from llama4_jax import distributed

    inp = _write(tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(
        ["123+456=", "999+1=", "abc:123 xyz:456 qrs:789 | xyz:"])])
    outs = {}
    for n in ("1", "2"):
        out = str(tmp_path / f"out{n}.jsonl")
        assert main(["generate", "--input", inp, "--output", out, "--cpu-devices", n, *COMMON]) == 0
        assert ("decoding on 2 CPU devices" in capsys.readouterr().err) == (n == "2")
        outs[n] = sorted((r["id"], r["token_ids"]) for r in _read(out))
    assert outs["2"] == outs["1"]
    # A seq mesh of 2 CPU devices: every row on both, each reading half the cache slots.
    out = str(tmp_path / "seq.jsonl")
    assert main(["generate", "--input", inp, "--output", out, "--mesh", "seq=2", "--cpu-devices", "2", *COMMON]) == 0
    assert sorted((r["id"], r["token_ids"]) for r in _read(out)) == outs["1"]
    # Without --cpu-devices the mesh must use every device (8 here): a one-line error with the way out.
    assert main(["generate", "--input", inp, "--output", str(tmp_path / "x.jsonl"), "--mesh", "seq=2", *COMMON]) == 2
    assert "--cpu-devices N makes the mesh of N CPU devices" in capsys.readouterr().err
    assert distributed.cpu_lanes("auto", os.path.getsize(os.path.join(DEFAULT_MODEL, "model.safetensors"))) == 1
    monkeypatch.setattr(distributed, "_available_memory", lambda: 16 << 30)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert distributed.cpu_lanes("auto", 1 << 30) == 2  # 4 cores, but 2 x 4 GiB fill half of 16 GiB
    assert distributed.cpu_lanes("auto", 2 << 30) == 1
    assert distributed.cpu_lanes("auto", 32 << 20) == 4  # the cores
    with pytest.raises(ValueError, match="--cpu-devices: expected a positive integer or 'auto', got 'x'"):
        distributed.cpu_lanes("x")


def test_samples_and_top_logprobs(tmp_path, capsys, tokenizer):
    """A line's "n" (or --n) gives that many records ("sample": 0 .. n-1); "logprobs": k
    (or --logprobs [K]) adds each token's k most likely alternatives with their ids,
    decoded strings and log-probabilities. --resume redoes only the missing samples,
    and they equal those of the uninterrupted run (seeds derived from id and sample)."""
    inp = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Once upon a time", "n": 3, "temperature": 2.0, "logprobs": 3},
        {"id": "b", "prompt": "12+34="},  # --n 2, --logprobs: the chosen tokens' only
        {"id": "c", "prompt": "5+5=", "n": 1, "logprobs": False},
    ])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--n", "2", "--logprobs", *COMMON]) == 0
    assert "6 prompts" in capsys.readouterr().err  # completions: one per sample
    full = _read(out)
    recs = {(r["id"], r["sample"]): r for r in full}
    assert sorted(recs) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0)]
    for j in range(3):
        r = recs["a", j]
        assert len(r["top_logprobs"]) == len(r["token_ids"]) == len(r["logprobs"])
        for step, chosen, lp in zip(r["top_logprobs"], r["token_ids"], r["logprobs"]):
            assert [set(x) for x in step] == [{"id", "token", "logprob"}] * 3
            assert [x["token"] for x in step] == [tokenizer.decode([x["id"]]) for x in step]
            assert step[0]["logprob"] >= step[1]["logprob"] >= step[2]["logprob"]
            if chosen in [x["id"] for x in step]:
                assert lp == pytest.approx(next(x["logprob"] for x in step if x["id"] == chosen), abs=1e-6)
    assert all("logprobs" in recs["b", j] and "top_logprobs" not in recs["b", j] for j in (0, 1))
    assert "logprobs" not in recs["c", 0] and "top_logprobs" not in recs["c", 0]
    # Keep all but two samples (as a killed run would), then --resume.
    _write(out, [json.dumps(r) for r in full if (r["id"], r["sample"]) not in {("a", 1), ("b", 0)}])
    assert main(["generate", "--input", inp, "--output", str(out), "--n", "2", "--logprobs", "--resume",
                 *COMMON]) == 0
    assert "2 prompts" in capsys.readouterr().err
    again = {(r["id"], r["sample"]): r for r in _read(out)}
    assert len(again) == 6 and again.keys() == recs.keys()
    for key, r in recs.items():  # the redone samples: the same tokens (logprobs: other batch-mates, fp32)
        assert {k: v for k, v in again[key].items() if "logprobs" not in k} == \
            {k: v for k, v in r.items() if "logprobs" not in k}, key
        if "logprobs" in r:
            assert again[key]["logprobs"] == pytest.approx(r["logprobs"], abs=1e-5)


def test_stop_strings(tokenizer):
    config, params = llama4_jax.load(DEFAULT_MODEL, dtype="float32")
    prompts = ["987+654=", "Once upon a time"]  # a sum: the trained checkpoint answers with 4 digits
    kw = dict(tokenizer=tokenizer, max_new_tokens=8, batch_size=2, attention_impl="auto")  # as the CLI runs
    base = llama4_jax.generate(config, params, prompts, **kw)
    text = base[0].text
    assert len(text) >= 3, text
    stop = text[1:3]
    cut = llama4_jax.generate(config, params, prompts, stop=[stop], **kw)
    assert cut[0].finish_reason == "stop"
    assert cut[0].text == text[:text.find(stop)]
    n = len(cut[0].token_ids)
    assert cut[0].token_ids == base[0].token_ids[:n]
    assert stop not in tokenizer.decode(cut[0].token_ids[:n - 1]) and stop in tokenizer.decode(cut[0].token_ids)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "ok"', "invalid JSON: Expecting ',' delimiter"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"id": 1}', 'expected exactly one of "prompt"'),
    ('{"prompt": "x", "messages": []}', 'expected exactly one of "prompt"'),
    ('{"prompt": 5}', '"prompt" must be a string, got int'),
    ('{"messages": "hi"}', '"messages" must be a non-empty list'),
    ('{"prompt": "x", "temprature": 1}', "unknown field(s) ['temprature']"),
    ('{"prompt": "x", "temperature": -1}', "invalid sampling parameter: temperature must be a finite number >= 0"),
    ('{"prompt": "x", "top_p": 2}', "invalid sampling parameter: top_p must be in (0, 1], got 2"),
    ('{"prompt": "x", "max_new_tokens": 0}', '"max_new_tokens" must be an integer >= 1, got 0'),
    ('{"prompt": "x", "stop": [""]}', '"stop" must be a non-empty string or a list of them'),
    ('{"prompt": "x", "n": 0}', '"n" must be an integer >= 1, got 0'),
    ('{"prompt": "x", "n": 2.5}', '"n" must be an integer >= 1, got 2.5'),
    ('{"prompt": "x", "logprobs": -1}', '"logprobs" must be true, false or an integer k in [0, '),
    ('{"prompt": "x", "logprobs": "3"}', "(the top k alternatives per token), got '3'"),
    ('{"prompt": "x", "frequency_penalty": 5}', "invalid sampling parameter: frequency_penalty must be in [-2, 2], "
                                                "got 5"),
    ('{"prompt": "x", "repetition_penalty": 0}', "repetition_penalty must be a finite number > 0, got 0"),
    ('{"prompt": "x", "min_new_tokens": 9}', "min_new_tokens must be an integer in [0, max_new_tokens = 8], got 9"),
    ('{"prompt": "x", "min_new_tokens": 1.5}', "min_new_tokens must be an integer in [0, max_new_tokens = 8], got 1.5"),
    ('{"prompt": "x", "ignore_eos": 1}', '"ignore_eos" must be true or false, got 1'),
    ('{"prompt": "x", "stop_token_ids": [-1]}', '"stop_token_ids" must be token ids in [0, '),
    ('{"prompt": "x", "stop_token_ids": 5}', '"stop_token_ids" must be a list of token ids, got 5'),
    ('{"messages": [{"content": "no role"}]}', "message 0: expected {'role': str, 'content': ...}"),
    ('{"id": [1], "prompt": "x"}', '"id" must be a string or an integer, got [1]'),
    ('{"id": 1, "prompt": "x"}', "duplicate id 1 (also on line 1)"),  # line 1 has no id: its id is 1
    ('{"prompt": "x", "images": ["sub/nope.png"]}', "image file not found: {dir}/sub/nope.png"),  # the JSONL's dir
    ('{"prompt": "x", "images": ["big.png"]}', "image {dir}/big.png has 40 x 30 = 1200 pixels, more than the "
                                               "limit of 1000 (max_image_pixels)"),
    ('{"prompt": "x", "images": ["bomb.png"]}', "image {dir}/bomb.png refused as a decompression bomb"),
])
def test_bad_line_fails_with_line_number(tmp_path, capsys, monkeypatch, line, message):
    """Every line is checked before the model loads (these fail in the checking pass)."""
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    if "bomb.png" in line:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: PIL's warning (not yet its error)
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir("/")  # relative image paths must not depend on the working directory
    limit = ["--max-image-pixels", "1000"] if "big.png" in line else []
    assert main(["generate", "--input", inp, "--output", str(out), *COMMON, *limit]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: " in err and message.replace("{dir}", str(tmp_path)) in err, err
    assert "1 bad input line(s); nothing was generated" in err
    assert not out.exists()


def test_non_utf8_line_fails_with_line_number(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"prompt": "fine"}\n{"prompt": "\xff"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(inp), "--output", str(out), *COMMON]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: not valid UTF-8" in err, err
    assert not out.exists()


def test_bad_line_skipped(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": "x", "messages": CHAT}), "{not json", '{"prompt": "\xff"}', json.dumps({"id": "y", "prompt": "also"}),
             json.dumps({"id": "z", "prompt": "also", "n": 0})]
    inp.write_bytes(b"\n".join(x.encode("latin-1") for x in lines) + b"\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(inp), "--output", str(out), "--on-error", "skip", *COMMON]) == 0
    err = capsys.readouterr().err
    assert f"{inp}:2: invalid JSON" in err and f"{inp}:3: not valid UTF-8" in err and "skipped 3 bad line(s)" in err
    assert f'{inp}:5: "n" must be an integer >= 1, got 0' in err
    assert sorted(r["id"] for r in _read(out)) == ["x", "y"]


def test_prompt_longer_than_context(tmp_path, capsys, tokenizer):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "short"}, {"prompt": "the river " * 10}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--max-model-len", "16", *COMMON]) == 2
    err = capsys.readouterr().err
    n = len(tokenizer("the river " * 10)["input_ids"])
    assert f"{inp}:2: the prompt has {n} tokens, longer than the context allows: at most 15 prompt tokens " \
           "fit a context of 16" in err, err
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    assert main(["generate", "--input", inp, "--output", str(out), *COMMON]) == 2
    assert f"--output {out} exists; pass --overwrite to replace it or --resume to complete it" in \
        capsys.readouterr().err
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-k", "-3"], "top_k must be an integer >= 0, got -3"),
    (["--min-p", "2"], "min_p must be in [0, 1], got 2.0"),
    (["--seed", "-2"], "seed must be None or an integer in [0, 4294967296), got -2"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0, got 0.0"),
    (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2], got 3.0"),
    (["--frequency-penalty", "-2.5"], "frequency_penalty must be in [-2, 2], got -2.5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--min-new-tokens", "-1"], "--min-new-tokens must be >= 0, got -1"),
    (["--min-new-tokens", "9"], "--min-new-tokens (9) must be at most --max-new-tokens (8)"),
    (["--stop-token-id", "100000000"], "--stop-token-id must be token ids in [0, "),
    (["--max-model-len", "1"], "--max-model-len: max_model_len must be an integer in [2, 65536]"),
    (["--model", "/nonexistent/ckpt"], "--model: no such checkpoint directory: /nonexistent/ckpt"),
    (["--queue-size", "0"], "--queue-size must be >= 1, got 0"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be >= 1, got 0"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--logprobs", "-1"], "--logprobs must be >= 0, got -1"),
    (["--logprobs", "1000000"], "--logprobs must be at most the vocabulary size"),
    (["--cpu-devices", "0"], "--cpu-devices must be a positive integer or 'auto', got '0'"),
])
def test_bad_options(tmp_path, capsys, flags, message):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), *COMMON, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_penalties(tmp_path, capsys, tokenizer):
    """A line's "repetition_penalty" changes its completion (the shipped model's answer
    to this prompt is a character of the prompt) and equals the Python API's with the
    same penalty; the line without one is as without penalties. A penalty in the
    checkpoint's generation_config.json is checked before anything runs."""
    import shutil

    from llama4_jax import Sampling

    prompt = "What is the capital of France?"
    inp = _write(tmp_path / "in.jsonl", [{"id": "plain", "prompt": prompt},
                                         {"id": "pen", "prompt": prompt, "repetition_penalty": 2.0}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), *COMMON]) == 0
    recs = {r["id"]: r for r in _read(out)}
    config, params = llama4_jax.load(DEFAULT_MODEL)
    ids = tokenizer(prompt)["input_ids"]
    kw = dict(max_new_tokens=8, batch_size=2, tokenizer=tokenizer)
    plain, pen = llama4_jax.generate(config, params, [ids, ids], sampling=[
        Sampling(temperature=0.0), Sampling(temperature=0.0, repetition_penalty=2.0)], **kw)
    assert recs["plain"]["token_ids"] == plain.token_ids and recs["pen"]["token_ids"] == pen.token_ids
    assert pen.token_ids != plain.token_ids
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": -1.0}))
    capsys.readouterr()
    assert main(["generate", "--input", inp, "--output", str(tmp_path / "o2.jsonl"), "--model", str(model),
                 *COMMON]) == 2
    assert "generation_config.json has an invalid sampling setting: repetition_penalty must be a finite number > 0, " \
        "got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "o2.jsonl").exists()


def test_stop_controls(tmp_path, tokenizer):
    """A line's "ignore_eos", "min_new_tokens" and "stop_token_ids", and the flags
    `--stop-token-id` and `--min-new-tokens`, give the Python API's completions with the
    same settings: the shipped model answers "123+456=" with "579" and its eos token."""
    prompt = "123+456="
    seven = tokenizer.convert_tokens_to_ids("7")
    inp = _write(tmp_path / "in.jsonl", [{"id": "plain", "prompt": prompt},
                                         {"id": "ignore", "prompt": prompt, "ignore_eos": True},
                                         {"id": "min", "prompt": prompt, "min_new_tokens": 6},
                                         {"id": "seven", "prompt": prompt, "stop_token_ids": [seven]}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), *COMMON]) == 0
    recs = {r["id"]: r for r in _read(out)}
    config, params = llama4_jax.load(DEFAULT_MODEL)
    ids = [tokenizer(prompt)["input_ids"]] * 4
    api = llama4_jax.generate(config, params, ids, max_new_tokens=8, batch_size=2, tokenizer=tokenizer,
                              ignore_eos=[False, True, False, False], min_new_tokens=[0, 0, 6, 0],
                              stop_token_ids=[None, None, None, [seven]])
    assert recs["plain"]["text"] == "579" and recs["plain"]["finish_reason"] == "stop"
    for name, want in zip(("plain", "ignore", "min", "seven"), api):
        assert (recs[name]["token_ids"], recs[name]["finish_reason"]) == (want.token_ids, want.finish_reason), name
    assert len(recs["ignore"]["token_ids"]) == 8 and recs["ignore"]["finish_reason"] == "length"
    assert len(recs["min"]["token_ids"]) >= 6 and recs["min"]["text"].startswith("579")
    assert recs["seven"]["text"] == "57" and recs["seven"]["finish_reason"] == "stop"
    flags = tmp_path / "flags.jsonl"
    assert main(["generate", "--input", inp, "--output", str(flags), "--stop-token-id", str(seven),
                 "--min-new-tokens", "3", *COMMON]) == 0
    recs = {r["id"]: r for r in _read(flags)}
    # "7" is the second token: suppressed, so 3+ tokens before any stop; "min" keeps its own 6.
    assert all(len(r["token_ids"]) >= 3 for r in recs.values()) and len(recs["min"]["token_ids"]) >= 6
    assert not recs["plain"]["text"].startswith("57")


def test_min_new_tokens_from_generation_config(tmp_path, capsys):
    """generation_config.json's min_new_tokens is the default (as transformers applies
    it), below the flag and a line's key; a bad one is refused before anything runs."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    gen = json.loads((model / "generation_config.json").read_text())
    inp = _write(tmp_path / "in.jsonl", [{"id": "plain", "prompt": "123+456="},
                                         {"id": "min", "prompt": "123+456=", "min_new_tokens": 6}])
    for value, flag, want in ((6, [], 6), (6, ["--min-new-tokens", "0"], 0)):
        (model / "generation_config.json").write_text(json.dumps({**gen, "min_new_tokens": value}))
        out = tmp_path / f"out{len(flag)}.jsonl"
        assert main(["generate", "--input", inp, "--output", str(out), "--model", str(model), *COMMON, *flag]) == 0
        recs = {r["id"]: r for r in _read(out)}
        assert len(recs["min"]["token_ids"]) >= 6
        assert (len(recs["plain"]["token_ids"]) >= 6) == (want == 6), recs["plain"]  # "579" + eot: 4 tokens
    (model / "generation_config.json").write_text(json.dumps({**gen, "min_new_tokens": -2}))
    capsys.readouterr()
    assert main(["generate", "--input", inp, "--output", str(tmp_path / "bad.jsonl"), "--model", str(model),
                 *COMMON]) == 2
    assert "generation_config.json has an invalid min_new_tokens: -2 (expected an integer >= 0)" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()


def test_missing_input_and_model_files(tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    assert main(["generate", "--input", str(tmp_path / "nope.jsonl"), "--output", out]) == 2
    assert "--input: no such file" in capsys.readouterr().err
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    assert main(["generate", "--input", inp, "--output", out, "--model", str(tmp_path)]) == 2
    assert f"--model: {tmp_path} has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"architectures": ["Llama4ForConditionalGeneration"]}')
    assert main(["generate", "--input", inp, "--output", out, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # no tokenizer files: transformers' several-line reason, on one line
    assert f"--model: cannot load a tokenizer and config from {tmp_path}: " in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_output_paths_checked_before_loading(tmp_path, capsys):
    """A directory as --output, or --output naming --input, is refused at once (with
    --overwrite too), and the input is left as it was."""
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    before = open(inp).read()
    assert main(["generate", "--input", inp, "--output", str(tmp_path), "--overwrite", "--model", "/nonexistent"]) == 2
    assert f"--output {tmp_path} is a directory; name a file" in capsys.readouterr().err
    for same in (inp, str(tmp_path / "." / "in.jsonl")):
        assert main(["generate", "--input", inp, "--output", same, "--overwrite"]) == 2
        assert "is the --input file; name another file" in capsys.readouterr().err
    os.symlink(inp, tmp_path / "link.jsonl")
    assert main(["generate", "--input", inp, "--output", str(tmp_path / "link.jsonl"), "--overwrite"]) == 2
    assert "is the --input file" in capsys.readouterr().err
    assert open(inp).read() == before


_CACHE_RUN = """
import sys
import jax
from llama4_jax import engine
from llama4_jax.cli import main

hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("/cache_hits") else None)
argv = sys.argv[1:]
assert main(argv) == 0
first = len(engine.COMPILED)
engine.COMPILED.clear()  # as a new process: every executable compiled again, or loaded
jax.clear_caches()
hits.clear()
assert main(argv + ["--overwrite"]) == 0
print("executables", first, "hits", len(hits))
"""


def test_compile_cache_serves_the_next_run(tmp_path):
    """--compile-cache DIR keeps the run's executables; a run that compiles them again
    (a new process) loads every one from DIR instead. In a subprocess: jax's cache
    setting is process-wide."""
    import subprocess
    import sys

    inp = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "123+456="}])
    cache = tmp_path / "xla"
    r = subprocess.run([sys.executable, "-c", _CACHE_RUN, "generate", "--input", inp, "--output",
                        str(tmp_path / "out.jsonl"), "--compile-cache", str(cache), *COMMON],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    n, hits = (int(x) for x in r.stdout.split()[1::2])
    assert n >= 3 and hits >= n, r.stdout  # prefill, insert, decode, ... all loaded
    assert len(os.listdir(cache)) >= n


def test_compile_cache_that_cannot_be_made_warns(tmp_path, capsys):
    """A cache directory that cannot be made (here: under a file) is a warning; the
    run goes on and compiles (jax's setting is left alone)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    inp = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "123+456="}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--compile-cache", str(blocker / "xla"),
                 *COMMON]) == 0
    assert "warning: no compile cache" in capsys.readouterr().err
    assert len(_read(out)) == 1
