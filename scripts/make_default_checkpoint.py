"""Build the small default checkpoint shipped in llama4_jax/assets/tiny-llama4.

    python scripts/make_default_checkpoint.py [--out DIR] [--check]

A Hugging Face-format Llama 4 text model (config.json, model.safetensors,
generation_config.json) with RANDOM weights, and a byte-level BPE tokenizer trained
with `tokenizers` on scripts/tokenizer_corpus.txt, with Llama 4's special tokens and a
chat template in Llama 4's format. It exists so `llama4-jax generate` runs offline on a
fresh machine; its completions are meaningless until trained weights replace it.

Everything is deterministic: the same script and corpus give the same files.
--check loads the result with transformers (model and AutoTokenizer) and compares
logits with llama4_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "llama4_jax", "assets", "tiny-llama4")
CORPUS = os.path.join(HERE, "tokenizer_corpus.txt")
BASE_VOCAB = 640  # byte-level BPE tokens before the special ones (what the corpus supports)

# Llama 4's special tokens sit right after its 200000 base tokens; here they sit after
# the BASE_VOCAB base tokens in the same order, so id - BASE_VOCAB matches id - 200000
# for the tokens the chat template and the stop list use.
SPECIAL = [
    "<|begin_of_text|>",  # +0
    "<|end_of_text|>",  # +1
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",  # +2..+4
    "<|header_start|>", "<|header_end|>",  # +5, +6
    "<|eom|>",  # +7: end of message (a tool call follows)
    "<|eot|>",  # +8: end of turn
    "<|step|>",  # +9
    *[f"<|reserved_special_token_{i}|>" for i in range(6)],  # +10..+15
    "<|python_start|>", "<|python_end|>",  # +16, +17
    "<|finetune_right_pad|>",  # +18: padding
]

# Llama 4's chat format, written for this checkpoint: <|begin_of_text|>, then per message
# <|header_start|>role<|header_end|>\n\ncontent<|eot|>; content may be a string or a list of
# {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + content | trim + '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)


def build_tokenizer(max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([CORPUS], trainer)
    base = tok.get_vocab_size()
    if base > BASE_VOCAB:
        raise RuntimeError(f"BPE produced {base} tokens, more than {BASE_VOCAB}")
    # Pad the base vocabulary to BASE_VOCAB with unused (special, so never shown in text)
    # tokens, so the special ids stay fixed should the corpus support fewer merges.
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(BASE_VOCAB - base)])
    tok.add_special_tokens(SPECIAL)
    ids = {s: tok.token_to_id(s) for s in SPECIAL}
    assert all(ids[s] == BASE_VOCAB + i for i, s in enumerate(SPECIAL)), ids
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, ids[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot|>",
                                   pad_token="<|finetune_right_pad|>", model_max_length=max_len)
    fast.chat_template = CHAT_TEMPLATE
    return fast, ids


def build_config(ids, vocab_size: int):
    from llama4_jax.config import Llama4Config, RopeScaling, TextConfig

    text = TextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=4, num_experts_per_tok=1, moe_layers=(1, 3), no_rope_layers=(1, 1, 1, 0),
        attention_chunk_size=32, floor_scale=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 256), max_position_embeddings=2048,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=(ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]),
        pad_token_id=ids["<|finetune_right_pad|>"],
    )
    return Llama4Config(text=text)


def build(out: str) -> None:
    import jax

    from llama4_jax.checkpoint import save_hf
    from llama4_jax.model.text import init_params

    max_len = 2048
    tokenizer, ids = build_tokenizer(max_len)
    vocab = -(-len(tokenizer) // 64) * 64
    config = build_config(ids, vocab)
    params = init_params(config, jax.random.key(0), dtype="float32")
    tmp = tempfile.mkdtemp(prefix=".tiny-llama4-", dir=os.path.dirname(out))
    try:
        save_hf(config, params, tmp)
        tokenizer.save_pretrained(tmp)
        t = config.text
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id),
                       "pad_token_id": t.pad_token_id}, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write("# tiny-llama4 (random weights)\n\n"
                    "A ~1.2M-parameter Llama 4 text model in Hugging Face format with RANDOM weights and a\n"
                    "byte-level BPE tokenizer trained on scripts/tokenizer_corpus.txt, with Llama 4's special\n"
                    "tokens and chat format. It lets `llama4-jax generate` run offline; its output is\n"
                    "meaningless. Rebuild with `python scripts/make_default_checkpoint.py`.\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def check(out: str) -> None:
    """transformers loads the model and the tokenizer; logits match llama4_jax."""
    import numpy as np
    import torch
    import transformers

    import llama4_jax

    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    print(repr(text), ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).float().eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    config, params = llama4_jax.load(out, dtype="float32")
    ours = np.asarray(llama4_jax.forward(config, params, np.array([ids])))
    print("max abs logit difference vs transformers:", float(np.abs(ours - ref).max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="load with transformers and compare logits")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    build(args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.1f} MB): {sorted(os.listdir(args.out))}")
    if args.check:
        check(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
