"""Llama Guard 4: the dense config, parity with transformers, the preset, and `safety.classify`.

No Llama Guard 4 weights can be obtained here, so:
  * a tiny random model of its shape (no routed experts, every layer a dense SwiGLU, the
    vision tower kept) is built with transformers and compared in fp32 (matmul
    precision highest): logits within 1e-4 (as tests/test_parity.py; observed ~1e-5)
    and greedy tokens equal, with text and with an image;
  * `classify` runs through a chat template written in Llama Guard's format, on a
    "forced" model whose greedy answer is fixed (a bigram table: every layer's output
    projections are zero, so the logits depend on the last token only), which tests the
    rendering, batching and parsing of "unsafe\\nS1,S9", not any judgement.
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
# Scout-like attention (chunk 8, floor_scale 6, qk norm, 12 layers) with no routed experts;
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


def _forced(tok, answer: list[str]):
    """A text-only dense model whose greedy continuation of any prompt ending in the
    assistant header is `answer` (tokens) and then <|eot|>.

    Each chained token t_i gets embedding e_i (one-hot); attention and MLP outputs are
    zero, so the final hidden state is e_i and lm_head maps row i to the next token.
    """
    config = Llama4Config(text=dataclasses.replace(GUARD_TEXT, num_hidden_layers=4, no_rope_layers=(1, 1, 1, 0)))
    p = jax.tree_util.tree_map(np.array, L.init_params(config, jax.random.key(0)))["params"]
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

