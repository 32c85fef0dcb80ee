"""Build the small default checkpoint shipped in llama4_jax/assets/tiny-llama4.

    python scripts/make_default_checkpoint.py [--out DIR] [--check]

A Hugging Face-format Llama 4 model (config.json, model.safetensors,
generation_config.json, preprocessor_config.json) with RANDOM weights: a small text
decoder and a small vision tower (112-pixel tiles, 16 tokens per tile), so the command
takes images too; and a byte-level BPE tokenizer trained
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
    *[f"<|reserved_special_token_{i}|>" for i in range(6, 67)],  # +19..+79
    "<|image_start|>", "<|image_end|>",  # +80, +81
    "<|vision_reserved_special_token_0|>", "<|vision_reserved_special_token_1|>",  # +82, +83
    "<|tile_x_separator|>", "<|tile_y_separator|>",  # +84, +85
    *[f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)],  # +86..+89
    "<|image|>",  # +90: where an image goes in the chat text
    "<|vision_reserved_special_token_6|>",  # +91
    "<|patch|>",  # +92: one image feature
]

# Llama 4's chat format, written for this checkpoint: <|begin_of_text|>, then per message
# <|header_start|>role<|header_end|>\n\ncontent<|eot|>; content may be a string or a list of
# {"type": "text", "text": ...} and {"type": "image"} parts (an image renders as <|image|>).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set ns = namespace(s='') %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set ns.s = ns.s + '<|image|>' %}"
    "{%- elif part['type'] == 'text' %}{%- set ns.s = ns.s + part['text'] %}{%- endif %}"
    "{%- endfor %}{%- set content = ns.s %}{%- endif %}"
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


# The vision tower: 112-pixel tiles of 14-pixel patches (8 x 8 grid, 16 tokens per tile
# after the pixel shuffle), width 64 (4 heads of 16), 2 layers, adapter width 128.
TILE = 112


def build_config(ids, vocab_size: int):
    from llama4_jax.config import Llama4Config, RopeScaling, TextConfig, VisionConfig

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
    vision = VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          vision_output_dim=128, image_size=TILE, patch_size=14, projector_input_dim=128,
                          projector_output_dim=128)
    return Llama4Config(text=text, vision=vision, architecture="Llama4ForConditionalGeneration",
                        boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"],
                        image_token_index=ids["<|patch|>"])


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
        # transformers' Llama4ImageProcessor / Llama4Processor settings (tile size TILE).
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
                       "size": {"height": TILE, "width": TILE}, "max_patches": 16, "resize_to_max_canvas": False,
                       "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
                       "resample": 2}, f, indent=2)
        with open(os.path.join(tmp, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "Llama4Processor", "patch_size": 14, "pixel_shuffle_ratio": 0.5}, f,
                      indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write("# tiny-llama4 (random weights)\n\n"
                    "A ~1.4M-parameter Llama 4 model (text decoder and a small vision tower with 112-pixel\n"
                    "tiles) in Hugging Face format with RANDOM weights and a byte-level BPE tokenizer trained\n"
                    "on scripts/tokenizer_corpus.txt, with Llama 4's special tokens and chat format. It lets\n"
                    "`llama4-jax generate` run offline, with images too; its output is meaningless.\n"
                    "Rebuild with `python scripts/make_default_checkpoint.py`.\n")
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
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(out, local_files_only=True,
                                                                        dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits.numpy()
    config, params = llama4_jax.load(out, dtype="float32")
    ours = np.asarray(llama4_jax.forward(config, params, np.array([ids])))
    print("max abs logit difference vs transformers:", float(np.abs(ours - ref).max()))

    from llama4_jax.generate import _render_images

    image = np.random.default_rng(0).integers(0, 256, (150, 260, 3), dtype=np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    ids, px = _render_images(msgs, None, tok, config, "check", 8)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px.astype(np.float32))).logits
    ours = np.asarray(llama4_jax.forward(config, params, np.array([ids]), pixel_values=px.astype(np.float32)))
    print(f"with an image ({px.shape[0]} tiles, {len(ids)} tokens): max abs logit difference vs transformers:",
          float(np.abs(ours - ref.numpy()).max()))


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
