"""Llama Guard 4: the dense config, parity with transformers, the preset, and `safety.classify`.

No Llama Guard 4 weights can be obtained here, so:
  * a tiny random model of its shape (no routed experts, every layer a dense SwiGLU, the
    vision tower kept) is built with transformers and compared in fp32 (matmul
    precision highest): logits within 1e-4 (as tests/test_parity.py; observed ~1e-5)
    and greedy tokens equal, with text and with an image;
  * `classify` runs through a chat template written in Llama Guard's format, on a
    "forced" model whose greedy answer is fixed (a bigram table: every layer's output
    projections are zero, so the logits depend on the last token only), which tests the
    rendering, batching and parsing of "unsafe\\nS1,S9", not any judgement;
  * `llama4-jax generate --safety-model` runs the shipped checkpoint with that forced
    model (saved as a checkpoint directory, with a vision tower) as the classifier.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import llama4_jax as L
from llama4_jax import safety
from llama4_jax.config import ConfigError, Llama4Config, from_hf, to_hf
from llama4_jax.generate import DEFAULT_MODEL
from llama4_jax.processor import ImageProcessor, special_token_ids
from tests import hf_models
from tests.test_vision import VISION

ATOL = 1e-4
SHIPPED = L.load_config(DEFAULT_MODEL)
# Scout-like attention (chunk 8, floor_scale 6, qk norm, 8 layers) with no routed experts;
# the shipped tokenizer's vocabulary and special tokens, so its chat template can drive it.
GUARD_TEXT = dataclasses.replace(
    hf_models.TEXT["scout_like"], moe_layers=(), vocab_size=SHIPPED.text.vocab_size,
    bos_token_id=SHIPPED.text.bos_token_id, eos_token_id=SHIPPED.text.eos_token_id,
    pad_token_id=SHIPPED.text.pad_token_id)
GUARD = Llama4Config(text=GUARD_TEXT, vision=VISION, architecture="Llama4ForConditionalGeneration",
                     boi_token_index=SHIPPED.boi_token_index, eoi_token_index=SHIPPED.eoi_token_index,
                     image_token_index=SHIPPED.image_token_index)

_CATEGORY_LINES = "".join(
    f"{{% if '{k}' not in excluded_category_keys %}}{k}: {v}.\n{{% endif %}}" for k, v in safety.CATEGORIES.items())
# A chat template in Llama Guard's format: one user turn asking for the assessment of the
# last message of the conversation, then the assistant header.
GUARD_TEMPLATE = (
    "{%- set excluded_category_keys = excluded_category_keys | default([]) -%}"
    "{%- set role = 'Agent' if messages[-1]['role'] == 'assistant' else 'User' -%}"
    "{{- bos_token }}<|header_start|>user<|header_end|>\n\n"
    "Task: Check if there is unsafe content in '{{ role }}' messages in conversations according to our "
    "safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    + _CATEGORY_LINES +
    "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
    "{%- for m in messages %}"
    "{%- if m['content'] is string %}{%- set text = m['content'] %}{%- else %}{%- set ns = namespace(s='') %}"
    "{%- for p in m['content'] %}{%- if p['type'] == 'text' %}{%- set ns.s = ns.s + p['text'] %}{%- endif %}"
    "{%- endfor %}{%- set text = ns.s %}{%- endif %}"
    "\n\n{{ 'Agent' if m['role'] == 'assistant' else 'User' }}: {{ text }}"
    "{%- endfor %}\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {{ role }} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
    # An expression, not template text: Jinja drops a template's trailing newline.
    "{{- '<|eot|><|header_start|>assistant<|header_end|>\n\n' }}"
)


def _tokenizer(extra_tokens=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    tok.chat_template = GUARD_TEMPLATE
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    return tok


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    model = hf_models.make_hf(GUARD, seed=15)
    path = str(tmp_path_factory.mktemp("guard") / "ckpt")
    model.save_pretrained(path)
    config, params = L.load(path, dtype="float32")
    return config, params, model


def _image_prompt(tok, config, n_text=(5, 4)):
    """Token ids `BOS t1 <image layout> t2` for one 60x100 image (a 2x3 grid + global tile)."""
    from llama4_jax.model.vision import tokens_per_tile
    from llama4_jax.processor import image_token_ids

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    out = ImageProcessor(size=VISION.image_size)([img])
    ids = ([config.text.bos_token_id] + list(rng.integers(3, 250, n_text[0]))
           + image_token_ids(out.aspect_ratios[0], tokens_per_tile(VISION), special_token_ids(tok))
           + list(rng.integers(3, 250, n_text[1])))
    return ids, img, out.pixel_values.astype(np.float32)


def test_guard_config_is_dense_and_round_trips(guard):
    config, params, _ = guard
    assert config == GUARD
    assert not any(f.is_moe for f in config.text.layer_flags)
    layer_params = params["params"]["layers"]
    assert all("mlp" in layer_params[f"layer_{j}"] and "moe" not in layer_params[f"layer_{j}"]
               for j in range(config.text.scan_period))
    assert "vision" in params["params"] and "projector" in params["params"]
    # A published dense config may say 0 experts: nothing is routed, so it loads.
    d = to_hf(GUARD)
    d["text_config"]["num_local_experts"] = 0
    assert from_hf(json.loads(json.dumps(d))).text.moe_layers == ()
    with pytest.raises(ConfigError, match="num_local_experts=0"):
        from_hf({**d, "text_config": {**d["text_config"], "moe_layers": [1]}})


def test_guard_text_logits_and_greedy_match_transformers(guard):
    config, params, model = guard
    ids = np.random.RandomState(15).randint(0, config.text.vocab_size, (2, 45))  # chunks of 8, floor_scale 6
    ref = hf_models.hf_logits(model, ids)
    err = np.abs(np.asarray(L.forward(config, params, ids)) - ref).max()
    assert err <= ATOL, err
    prompt = [config.text.bos_token_id] + list(ids[0, :20])
    ours = L.generate(config, params, [prompt], max_new_tokens=12)[0].token_ids
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                                eos_token_id=list(config.text.eos_token_id),
                                pad_token_id=config.text.pad_token_id)[0, len(prompt):].tolist()
    assert ours == theirs


def test_guard_image_logits_and_greedy_match_transformers(guard):
    config, params, model = guard
    tok = _tokenizer()
    ids, img, px = _image_prompt(tok, config)
    assert ids.count(config.image_token_index) == px.shape[0] * 9
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px), use_cache=False).logits.numpy()
    ours = np.asarray(L.forward(config, params, np.array([ids]), pixel_values=px))
    assert np.abs(ours - ref).max() <= ATOL
    # The image matters: without it the logits move by O(1).
    blank = np.array([[5 if t == config.image_token_index else t for t in ids]])
    assert np.abs(np.asarray(L.forward(config, params, blank)) - ours).max() > 0.1
    # Greedy from the prompt with its image placeholder, expanded by generate itself.
    short = ids[:6] + [special_token_ids(tok)["image"]] + ids[-4:]  # BOS t1 <|image|> t2
    out = L.generate(config, params, [short], images=[[img]], tokenizer=tok, max_new_tokens=10)[0]
    assert out.prompt_token_ids == ids
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px),
                                max_new_tokens=len(out.token_ids), do_sample=False,
                                eos_token_id=list(config.text.eos_token_id),
                                pad_token_id=config.text.pad_token_id)[0, len(ids):].tolist()
    assert out.token_ids == theirs


def test_llama_guard_4_preset_in_plan(tmp_path, capsys):
    from llama4_jax import cli, plan

    import transformers

    c = L.preset("llama-guard-4")
    assert c.text.moe_layers == () and c.vision is not None and c.text.num_hidden_layers == 48
    (tmp_path / "config.json").write_text(json.dumps(to_hf(c)))
    hf = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert list(hf.text_config.moe_layers) == [] and from_hf(hf.to_dict()) == c
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(L.abstract_params(c)))
    assert 11.9e9 < n < 12.1e9, n  # "12B"
    p = plan.plan(c, "tensor=4", weight_format="bf16")
    assert "routed experts" not in p.weights_by_part and p.weights_total == 2 * n
    assert cli.main(["plan", "--preset", "llama-guard-4", "--mesh", "tensor=4"]) == 0
    out = capsys.readouterr().out
    assert "plan for llama-guard-4" in out and "routed experts" not in out


@pytest.mark.parametrize("text, label, cats", [
    ("safe", "safe", ()),
    (" Safe\n", "safe", ()),
    ("unsafe\nS1,S9", "unsafe", ("S1", "S9")),
    ("unsafe\n S14 , S2 ", "unsafe", ("S14", "S2")),
    ("unsafe", "unsafe", ()),
    ("", "invalid", ()),
    ("maybe", "invalid", ()),
    ("unsafe\nS15", "invalid", ()),
    ("unsafe\nS1,violence", "invalid", ()),
    ("safe\nS1", "invalid", ()),
    ("unsafe\nS1\nmore", "invalid", ()),
])
def test_parse_verdict(text, label, cats):
    v = safety.parse_verdict(text)
    assert (v.label, v.categories, v.text) == (label, cats, text)
    assert v.safe == (label == "safe")
    d = v.as_dict()
    assert d["label"] == label and d["categories"] == list(cats) and ("text" in d) == (label != "safe")


def _token_id(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _forced(tok, answer: list[str], vision: bool = False):
    """A dense model whose greedy continuation of any prompt ending in the assistant
    header is `answer` (tokens) and then <|eot|>; text-only, or with GUARD's vision tower.

    Each chained token t_i gets embedding e_i (one-hot); attention and MLP outputs are
    zero, so the final hidden state is e_i and lm_head maps row i to the next token
    (image features, which replace the image tokens' embeddings, reach no other position).
    """
    text = dataclasses.replace(GUARD_TEXT, num_hidden_layers=4, no_rope_layers=(1, 1, 1, 0))
    config = dataclasses.replace(GUARD, text=text) if vision else Llama4Config(text=text)
    rng = np.random.default_rng(0)

    def fill(path, x):  # as init_params draws them (norms at 1, biases 0), without compiling it
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(x.shape, np.float32)
        return np.zeros(x.shape, np.float32) if name.endswith("bias']") else \
            (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

    p = jax.tree_util.tree_map_with_path(fill, L.abstract_params(config, dtype="float32"))["params"]
    for group in p["layers"].values():
        group["attn"]["o"][:] = 0
        group["mlp"]["down"][:] = 0
    ids = [_token_id(tok, x) for x in ["\n\n", *answer, "<|eot|>"]]
    assert len(set(ids)) == len(ids) and ids[-1] in config.text.eos_token_id
    p["embed"][:] = 0
    p["lm_head"][:] = 0
    for i, (cur, nxt) in enumerate(zip(ids, ids[1:])):
        p["embed"][cur, i] = 1.0
        p["lm_head"][i, nxt] = 10.0
    return config, {"params": p}


CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
    [{"role": "user", "content": "A much longer question, to make the batch ragged: " * 3}],
]


def test_classify_parses_a_forced_unsafe_answer_in_batches():
    tok = _tokenizer(["unsafe", "S1", "S9", "\n\n"])
    config, params = _forced(tok, ["unsafe", "\n", "S1", ",", "S9"])
    verdicts = safety.classify(config, params, CONVERSATIONS, tokenizer=tok, batch_size=2)
    assert [v.label for v in verdicts] == ["unsafe"] * 3
    assert all(v.categories == ("S1", "S9") and v.text == "unsafe\nS1,S9" for v in verdicts)
    # The rendered prompt is the template's, ending with the assistant header.
    text = safety.render(CONVERSATIONS[1], tok)
    assert "'Agent' messages" in text and text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    assert "S6: Specialized Advice" not in safety.render(CONVERSATIONS[0], tok, excluded_category_keys=["S6"])


def test_classify_safe_answer():
    tok = _tokenizer(["safe", "\n\n"])
    config, params = _forced(tok, ["safe"])
    verdicts = safety.classify(config, params, CONVERSATIONS[:2], tokenizer=tok)
    assert [(v.label, v.categories) for v in verdicts] == [("safe", ())] * 2


def test_classify_with_an_image_matches_transformers_greedy(guard, tmp_path):
    """The tiny random guard model with an image part: its answer is random text (so the
    verdict is most likely `invalid`); it must be transformers' greedy answer to the
    rendered prompt with the image expanded to its tiles, fed the same pixels."""
    from PIL import Image

    from llama4_jax.model.vision import tokens_per_tile
    from llama4_jax.processor import expand_image_ids

    config, params, model = guard
    tok = _tokenizer()
    _, img, _ = _image_prompt(tok, config)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    conv = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "ok?"}]}]
    verdict = safety.classify(config, params, [conv], tokenizer=tok, max_new_tokens=6)[0]
    assert verdict == safety.parse_verdict(verdict.text)
    text = safety.render([{"role": "user", "content": "<|image|>ok?"}], tok)
    out = ImageProcessor(size=VISION.image_size)([img])
    ids = expand_image_ids(tok(text, add_special_tokens=False)["input_ids"], out.aspect_ratios,
                           tokens_per_tile(VISION), special_token_ids(tok))
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(
            out.pixel_values.astype(np.float32)), max_new_tokens=6, do_sample=False,
            eos_token_id=list(config.text.eos_token_id), pad_token_id=config.text.pad_token_id)[0, len(ids):]
    assert verdict.text == tok.decode(ref.tolist(), skip_special_tokens=True)


def test_classify_refuses_bad_input():
    tok = _tokenizer(["safe", "\n\n"])
    config, params = _forced(tok, ["safe"])
    with pytest.raises(TypeError, match="list of conversations"):
        safety.classify(config, params, "hello", tokenizer=tok)
    with pytest.raises(ValueError, match="conversation 0 must be a non-empty list"):
        safety.classify(config, params, [[]], tokenizer=tok)
    with pytest.raises(ValueError, match="conversation 0, message 0"):
        safety.classify(config, params, [[{"content": "x"}]], tokenizer=tok)
    with pytest.raises(ValueError, match="must be the user's or the assistant's"):
        safety.classify(config, params, [[{"role": "system", "content": "x"}]], tokenizer=tok)
    with pytest.raises(ValueError, match="has no vision tower"):
        safety.classify(config, params, [[{"role": "user", "content": [{"type": "image", "path": "x.png"}]}]],
                        tokenizer=tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        safety.classify(config, params, CONVERSATIONS[:1], tokenizer=tok)



# --------------------------------------------------------------------------------------
# llama4-jax generate --safety-model
# --------------------------------------------------------------------------------------

UNSAFE = {"label": "unsafe", "categories": ["S1", "S9"], "text": "unsafe\nS1,S9"}
# As tests/test_cli_generate.py runs the shipped checkpoint (one compiled prefill/decode).
COMMON = ["--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
SYSTEM = {"role": "system", "content": "You are brief."}


@pytest.fixture(scope="module")
def unsafe_dir(tmp_path_factory):
    """A checkpoint directory (weights, config, tokenizer with the Llama Guard-format
    template) of the forced model, with a vision tower, answering `unsafe\\nS1,S9`."""
    from llama4_jax.checkpoint import save_hf

    tok = _tokenizer(["unsafe", "S1", "S9", "\n\n"])
    config, params = _forced(tok, ["unsafe", "\n", "S1", ",", "S9"], vision=True)
    path = str(tmp_path_factory.mktemp("guard_cli") / "unsafe")
    save_hf(config, params, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def classify_calls(monkeypatch):
    """The conversations of each `safety.classify` call (the real one still runs)."""
    calls, real = [], safety.classify

    def spy(config, params, conversations, **kw):
        calls.append(list(conversations))
        return real(config, params, conversations, **kw)

    monkeypatch.setattr(safety, "classify", spy)
    return calls


def _jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _records(path) -> dict:
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _text(t):
    return {"type": "text", "text": t}


def _three_prompts(tmp_path) -> str:
    """A text prompt, chat messages with a system prompt, an image prompt: one JSONL
    (the same shapes in every test, so the shipped model compiles once)."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "red.png")
    return _jsonl(tmp_path / "in.jsonl", [
        {"id": "add", "prompt": "123+456="},
        {"id": "chat", "messages": [SYSTEM, {"role": "user", "content": "Name a river."}]},
        {"id": "color", "prompt": "color?", "images": ["red.png"]},  # relative to the JSONL
    ])


@pytest.mark.parametrize("on", ["prompts", "completions", "both"])
def test_generate_records_verdicts(unsafe_dir, classify_calls, tmp_path, capsys, monkeypatch, on):
    from llama4_jax import generate_cli
    from llama4_jax.cli import main

    finished = []  # the completions the generator hands over together (one batch each)
    real_run = generate_cli.run_requests

    def run_requests(*args, on_batch, **kw):
        return real_run(*args, on_batch=lambda done: (finished.append(len(done)), on_batch(done)), **kw)

    monkeypatch.setattr(generate_cli, "run_requests", run_requests)
    inp = _three_prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--safety-model", unsafe_dir, "--safety-on", on,
                 *COMMON]) == 0
    err = capsys.readouterr().err
    recs = _records(out)
    keys = {"prompts": ["prompt"], "completions": ["completion"], "both": ["prompt", "completion"]}[on]
    assert sorted(recs) == ["add", "chat", "color"]
    for r in recs.values():
        assert r["safety"] == {k: UNSAFE for k in keys}, r
    assert f"safety: {3 * len(keys)} verdict(s), 0 safe, {3 * len(keys)} unsafe, 0 invalid" in err, err
    # One classifier call per batch of completions finished together, holding that
    # batch's conversations (which completions finish together depends on the model).
    assert sum(finished) == 3
    assert list(map(len, classify_calls)) == [n * len(keys) for n in finished]
    seen = [c for call in classify_calls for c in call]
    prompts = {
        "add": [_user(_text("123+456="))],
        "chat": [_user(_text("Name a river."))],  # the system message is left out
        "color": [_user({"type": "image", "path": str(tmp_path / "red.png")}, _text("color?"))],
    }
    expected = [conv + [{"role": "assistant", "content": [_text(recs[i]["text"])]}] if k == "completion" else conv
                for i, conv in prompts.items() for k in keys]
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, expected))


def test_generate_safety_records_a_conversation_the_classifier_refuses(unsafe_dir, monkeypatch, tmp_path, capsys):
    """A conversation the classifier refuses (here: said to be past its context) gets an
    "invalid" verdict with the error; the rest of its batch is still classified."""
    from llama4_jax.cli import main

    calls = []

    def classify(config, params, conversations, **kw):  # as generate refuses a prompt past the context
        calls.append(len(conversations))
        for i, conv in enumerate(conversations):
            if "river" in json.dumps(conv):
                raise ValueError(f"prompt {i} has 9000 tokens, longer than the context allows: at most 8191 prompt "
                                 "tokens fit a context of 8192 (max_model_len)")
        return [safety.parse_verdict("safe")] * len(conversations)

    monkeypatch.setattr(safety, "classify", classify)
    out = tmp_path / "out.jsonl"
    # One new token: every row finishes at its first token, so each harvest of the
    # continuous batching is a whole prefill (color and chat, the longest; then add).
    one_token = [*COMMON[:COMMON.index("--max-new-tokens") + 1], "1", *COMMON[COMMON.index("--max-new-tokens") + 2:]]
    assert main(["generate", "--input", _three_prompts(tmp_path), "--output", str(out), "--safety-model", unsafe_dir,
                 "--safety-on", "prompts", *one_token]) == 0
    recs = _records(out)
    assert recs["add"]["safety"] == recs["color"]["safety"] == {"prompt": {"label": "safe", "categories": []}}
    assert recs["chat"]["safety"] == {"prompt": {"label": "invalid", "categories": [], "error": (
        "--safety-model cannot classify it: the conversation has 9000 tokens, longer than the context allows: at "
        "most 8191 prompt tokens fit a context of 8192 (max_model_len)")}}
    # Batches of 2 (color and chat, the longest) and 1; the refused one's batch again one at a time.
    assert calls == [2, 1, 1, 1]
    assert "safety: 3 verdict(s), 2 safe, 0 unsafe, 1 invalid (1 could not be classified)" in capsys.readouterr().err


def test_generate_safety_resume(unsafe_dir, classify_calls, tmp_path, capsys):
    """--resume with --safety-model classifies only the redone lines; every line ends
    with its verdicts."""
    from llama4_jax.cli import main

    out = tmp_path / "out.jsonl"
    args = ["generate", "--input", _three_prompts(tmp_path), "--output", str(out), "--safety-model", unsafe_dir,
            *COMMON]
    assert main(args) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:20])  # a run killed while writing its second line
    kept = json.loads(lines[0])["id"]
    classify_calls.clear()
    assert main(args + ["--resume"]) == 0
    assert "kept 1 finished before (--resume)" in capsys.readouterr().err
    recs = _records(out)
    assert sorted(recs) == ["add", "chat", "color"] and len(out.read_text().splitlines()) == 3
    assert all(r["safety"] == {"prompt": UNSAFE, "completion": UNSAFE} for r in recs.values())
    texts = {"add": "123+456=", "chat": "Name a river.", "color": "color?"}
    redone = [next(p["text"] for p in c[0]["content"] if p["type"] == "text") for call in classify_calls for c in call]
    assert sorted(redone) == sorted(t for i, t in texts.items() if i != kept for _ in range(2))


def test_generate_safety_option_errors(unsafe_dir, tmp_path, capsys):
    """Each is one error line (exit 2, no traceback) before anything is generated."""
    import shutil

    from llama4_jax.cli import main

    inp = _jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    (tmp_path / "empty").mkdir()
    no_template = tmp_path / "no_template"
    tok = _tokenizer()
    tok.chat_template = None
    tok.save_pretrained(no_template)
    shutil.copy(f"{unsafe_dir}/config.json", no_template)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(unsafe_dir, bad_config)
    (bad_config / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(unsafe_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases = [
        (["--safety-on", "prompts"], "--safety-on needs --safety-model DIR"),
        (["--safety-model", "/nonexistent/guard"], "--safety-model: no such checkpoint directory: /nonexistent/guard"),
        (["--safety-model", str(tmp_path / "empty")], f"--safety-model: {tmp_path / 'empty'} has no config.json"),
        (["--safety-model", str(no_template)], f"--safety-model: the tokenizer of {no_template} has no chat template"),
        (["--safety-model", str(bad_config)], f"--safety-model: cannot load a tokenizer and config from {bad_config}"),
        (["--safety-model", str(no_weights)], f"--safety-model: cannot load {no_weights}: "),  # after the model loads
    ]
    for flags, message in cases:
        assert main(["generate", "--input", inp, "--output", str(out), *COMMON, *flags]) == 2, flags
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "using the default checkpoint" not in ln]
        assert len(lines) == 1 and lines[0].startswith(f"llama4-jax generate: error: {message}"), (flags, err)
        assert "Traceback" not in err and not out.exists()


def test_generate_safety_checks_lines_before_loading(unsafe_dir, tmp_path, capsys):
    """A prompt the classifier cannot read is a bad input line, reported in the first pass."""
    from llama4_jax.cli import main

    inp = _jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, {"messages": [SYSTEM]}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--safety-model", unsafe_dir, *COMMON]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: --safety-model: the prompt has no user or assistant message to classify" in err, err
    assert "1 bad input line(s); nothing was generated" in err and not out.exists()


def test_generate_safety_text_only_classifier_warns(tmp_path, capsys):
    """A classifier without a vision tower judges an image prompt on its text, and says
    so in the first pass (the bad --mesh then stops the run before anything loads)."""
    from PIL import Image

    from llama4_jax.cli import main

    text_only = tmp_path / "text_only"
    _tokenizer().save_pretrained(text_only)
    (text_only / "config.json").write_text(json.dumps(to_hf(Llama4Config(text=GUARD_TEXT))))
    Image.new("RGB", (20, 20)).save(tmp_path / "im.png")
    inp = _jsonl(tmp_path / "in.jsonl", [{"prompt": "color?", "images": ["im.png"]}, {"prompt": "1+1="}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--safety-model", str(text_only),
                 "--mesh", "nonsense=3", *COMMON]) == 2
    err = capsys.readouterr().err
    assert f"--safety-model {text_only} has no vision tower: 1 prompt(s) of {inp} have images, which are not " \
           "classified, only their text" in err, err
    assert "error: --mesh" in err and not out.exists()


def test_conversation():
    user = [SYSTEM, {"role": "user", "content": "a <|image|> b"}]
    assert safety.conversation("hi", "hello") == [_user(_text("hi")),
                                                  {"role": "assistant", "content": [_text("hello")]}]
    assert safety.conversation("hi", images=["x.png", "y.png"]) == [
        _user({"type": "image", "path": "x.png"}, {"type": "image", "path": "y.png"}, _text("hi"))]
    assert safety.conversation(user, images=["x.png"]) == [
        _user(_text("a "), {"type": "image", "path": "x.png"}, _text(" b"))]
    assert safety.conversation(user, images=["x.png"], with_images=False) == [_user(_text("a "), _text(" b"))]
    parts = [_user({"type": "image", "path": "x.png"}, _text("q"))]
    assert safety.conversation(parts, with_images=False) == [_user(_text("q"))]
    assert safety.conversation(parts) == parts
    with pytest.raises(ValueError, match="1 image\\(s\\) but 0"):
        safety.conversation([{"role": "user", "content": "no placeholder"}], images=["x.png"])
    with pytest.raises(ValueError, match="more <\\|image\\|> placeholders"):
        safety.conversation("<|image|><|image|>", images=["x.png"])
    with pytest.raises(ValueError, match="no user or assistant message"):
        safety.conversation([SYSTEM])
    with pytest.raises(TypeError, match="prompt must be"):
        safety.conversation([])
