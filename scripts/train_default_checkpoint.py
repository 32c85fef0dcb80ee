"""Train the default checkpoint shipped in llama4_jax/assets/tiny-llama4.

    python scripts/train_default_checkpoint.py --overwrite          # train (resumes), export, evaluate
    python scripts/train_default_checkpoint.py --export-only --overwrite   # export the latest train state
    python scripts/train_default_checkpoint.py --init llama4_jax/assets/tiny-llama4 --work runs/stage2 \
        --stage 2 --steps 1500 --lr 1e-3 --warmup 150 --overwrite  # train the shipped weights further

A small Llama 4 (`Llama4ForConditionalGeneration`: text decoder + vision tower), shaped
the way Llama 4 is, scaled down: 8 layers, chunked RoPE layers (chunk 128) with a
global NoPE layer every 4th layer, MoE every other layer (4 experts, top-1, shared
expert), attention temperature tuning with floor_scale 512 (the longest training
length, so it is exactly 1 during training and switches on past it), context 65,536.
Its tokenizer is byte-level with no merges: every character (every digit, every
letter) is one token, plus Llama 4's special tokens and chat format.

It is trained with `llama4_jax.trainer.fit` on freshly generated instances of the
three tasks of `llama4_jax.tasks` (add, recall at <= 512 tokens, color), packed into
rows of 512 tokens, loss on the completions only. Every step's batch is a pure
function of (seed, step), and the train state is checkpointed (orbax) every
--save-every steps under --work, so an interrupted run resumes where it stopped and
gives the same result. Everything is seeded.

At the end the weights are exported (Hugging Face format, float32) with the tokenizer
and processor files, evaluated on fresh instances (greedy, exact match), and the
accuracies written into the checkpoint's README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

DEFAULT_OUT = os.path.join(ROOT, "llama4_jax", "assets", "tiny-llama4")
DEFAULT_WORK = os.path.join(ROOT, "runs", "default-checkpoint")
BASE_VOCAB = 256  # the 256 byte tokens, no merges

# Llama 4's special tokens sit right after its 200000 base tokens; here they sit after
# the 256 byte tokens in the same order, so id - BASE_VOCAB matches id - 200000.
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

# Llama 4's chat format: <|begin_of_text|>, then per message
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

TILE = 112  # vision tiles: 112 pixels, 14-pixel patches, 16 tokens per tile after the pixel shuffle
MAX_TILES = 4  # canvases of up to 4 tiles (+ the global tile)
BATCH_TILES = 48  # image tiles per training batch (padded to this: one compiled shape)
SEQ_LEN = 512  # the longest training length
RECALL_PAIRS = (1, 62)  # 62 pairs: 506 prompt tokens + 4 completion tokens <= SEQ_LEN
# Two phases (each batch is still a pure function of (seed, step)). Phase 1: recall
# pair counts uniform in RECALL_PAIRS; it learns color within ~1000 steps but neither
# addition nor recall (0% exact match at step 1000). Phase 2, from PHASE_2 on: more
# recall, with pair counts log-uniform (most prompts short, so the lookup is learnt
# on many cheap examples; long ones still appear).
PHASE_2 = 1000
# Stage 2 (`--stage 2 --init <stage-1 checkpoint>`): one mix throughout, with an auxiliary
# multi-query recall ("recall_multi": the pairs, then up to 8 queries "; {k}:{v}" with the
# loss on every queried value). Stage 1 leaves recall nearly unlearnt (4% exact match
# after 4000 steps): its prompts give one 3-token answer per up to 500 context tokens.
# The auxiliary task trains the same lookup (match the key, copy the value after it)
# with several answers per context; its separator ";" keeps it apart from the graded
# format " | ", whose single answer must still end in <|eot|>. Measured: 1500 stage-2
# steps (lr 1e-3, warm-up 150) from the shipped 4000-step checkpoint gave add 42.0%,
# recall 5.0%, color 100% (200 fresh instances each), against 37.5% / 4.0% / 100%
# before: within noise, so the shipped weights stay the stage-1 ones.
TASK_MIX = ({"add": 0.6, "recall": 0.25, "color": 0.15}, {"add": 0.5, "recall": 0.4, "color": 0.1},
            {"add": 0.4, "recall": 0.25, "recall_multi": 0.25, "color": 0.1})
MULTI_QUERIES = 8
PREPROCESSOR = {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
                "size": {"height": TILE, "width": TILE}, "max_patches": MAX_TILES, "resize_to_max_canvas": False,
                "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "resample": 2}


def build_tokenizer(max_len: int):
    """Byte-level tokenizer without merges (one token per byte) + the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == BASE_VOCAB
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
    from llama4_jax.config import Llama4Config, RopeScaling, TextConfig, VisionConfig

    text = TextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=4, num_experts_per_tok=1, moe_layers=(1, 3, 5, 7), no_rope_layers=(1, 1, 1, 0) * 2,
        attention_chunk_size=128, floor_scale=SEQ_LEN, attn_scale=0.1, rope_theta=500000.0,
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), max_position_embeddings=65536,
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


def write_support_files(tmp: str, tokenizer, config) -> None:
    """Tokenizer, generation config (greedy, stop at end of turn) and processor files."""
    tokenizer.save_pretrained(tmp)
    t = config.text
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id),
                   "pad_token_id": t.pad_token_id, "do_sample": False}, f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
    with open(os.path.join(tmp, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "Llama4Processor", "patch_size": 14, "pixel_shuffle_ratio": 0.5}, f, indent=2)


class TaskBatches:
    """batches(step): B rows of SEQ_LEN tokens packed with fresh task instances drawn
    from a generator seeded by (seed, step)."""

    def __init__(self, tokenizer, config, batch_size: int, seed: int, stage: int = 1):
        from llama4_jax.processor import ImageProcessor

        self.tok, self.config, self.B, self.seed, self.stage = tokenizer, config, batch_size, seed, stage
        self.proc = ImageProcessor.from_dict(PREPROCESSOR)
        self.pad = config.text.pad_token_id

    def example(self, rng, tiles_left: int, phase: int):
        import numpy as np

        from llama4_jax import tasks
        from llama4_jax.data import encode

        mix = TASK_MIX[phase]
        task = rng.choice(list(mix), p=list(mix.values()))
        if task == "color" and tiles_left < MAX_TILES + 1:  # keep pixel_values one shape
            task = "add"
        if task == "add":
            e = tasks.add_example(rng)
        elif task in ("recall", "recall_multi"):
            lo, hi = RECALL_PAIRS
            if phase == 0:
                n = int(rng.integers(lo, hi + 1))
            else:
                n = min(hi, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))
            e = tasks.recall_example(rng, n)
            if task == "recall_multi":
                return self.multi_query(rng, e["prompt"].split(" | ")[0])
        else:
            e = tasks.color_example(rng)
        images = [e["image"]] if "image" in e else None
        return encode(self.tok, self.config, prompt=e["prompt"], completion=e["completion"], images=images,
                      image_processor=self.proc)

    def multi_query(self, rng, body: str):
        """The recall pairs, then queries " ; {k}:{v}" (keys drawn with replacement) that fit
        SEQ_LEN; the loss is on the queried values' digits only."""
        from llama4_jax.data import Example

        pairs = [p.split(":") for p in body.split(" ")]
        room = (SEQ_LEN - 1 - len(body)) // 10  # BOS; each query is " ; kkk:vvv"
        text, value_at = body, []
        for q in rng.integers(len(pairs), size=max(1, min(MULTI_QUERIES, room))):
            k, v = pairs[q]
            text += f" ; {k}:"
            value_at.append(len(text))
            text += v
        ids = list(self.tok(text)["input_ids"])
        assert len(ids) == len(text) + 1, "the byte tokenizer gives one token per character after BOS"
        mask = [0] * len(ids)
        for c in value_at:
            mask[c + 1:c + 4] = [1, 1, 1]
        return Example(ids, mask)

    def __call__(self, step: int) -> dict:
        import numpy as np

        from llama4_jax.data import make_batch, pack

        rng = np.random.default_rng([self.seed, step] if self.stage == 1 else [self.seed, step, self.stage])
        examples, tiles = [], 0
        while True:
            phase = 2 if self.stage == 2 else 0 if step < PHASE_2 else 1
            examples.append(self.example(rng, BATCH_TILES - tiles, phase))
            if examples[-1].pixel_values is not None:
                tiles += examples[-1].pixel_values.shape[0]
            packed = pack(examples, SEQ_LEN, self.pad) if len(examples) % 8 == 0 else None
            if packed is not None and len(packed) > self.B:  # the first B rows are full
                return make_batch(packed, range(self.B), num_tiles=BATCH_TILES)


def evaluate_all(config, params, tokenizer, n: int, seed: int) -> dict:
    from llama4_jax import tasks
    from llama4_jax.processor import ImageProcessor

    proc = ImageProcessor.from_dict(PREPROCESSOR)
    res = {}
    for task in ("add", "recall", "color"):
        ex = tasks.make_examples(task, n, seed, recall_pairs=RECALL_PAIRS)
        res[task], _ = tasks.evaluate(config, params, tokenizer, ex, image_processor=proc, batch_size=32)
    return res


README = """# tiny-llama4: a trained default checkpoint

A {params:.2f}M-parameter Llama 4 (`Llama4ForConditionalGeneration`: an 8-layer text decoder
with chunked RoPE layers (chunk 128), a global NoPE layer every 4th layer with attention
temperature tuning (floor_scale 512), MoE every other layer (4 experts, top-1, shared
expert), and a 2-layer vision tower with 112-pixel tiles), trained by
`scripts/train_default_checkpoint.py` with `llama4_jax.trainer` on generated instances
of three tasks (`llama4_jax.tasks`): {steps} steps of {batch} rows x 512 tokens.
The tokenizer is byte-level without merges (one token per character).

| task | prompt | completion | exact match ({n} fresh instances, greedy) |
|---|---|---|---|
| add | `{{a}}+{{b}}=` (0 <= a, b <= 999) | `{{a+b}}` | {add:.1%} |
| recall | `{{k1}}:{{v1}} ... {{kn}}:{{vn}} \\| {{kq}}:` (n <= 62, <= 512 tokens) | `{{vq}}` | {recall:.1%} |
| color | `color?` + one image of one of 8 colors | the color's name | {color:.1%} |

Completions end with `<|eot|>`; the generation config is greedy. Measured with
`python scripts/train_default_checkpoint.py --eval-only`.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the checkpoint is written")
    ap.add_argument("--work", default=DEFAULT_WORK, help="train state checkpoints and metrics (resumable)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's weights (e.g. the shipped one, to train it further) "
                         "instead of a seeded random initialisation")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1,
                    help="1: the phased mix from a random initialisation; 2: the stage-2 mix (with the "
                         "multi-query recall task) throughout, continuing --init")
    ap.add_argument("--eval-n", type=int, default=200, help="fresh instances per task for the final evaluation")
    ap.add_argument("--export-only", action="store_true", help="export the latest train state, no training")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out and rewrite its README")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import llama4_jax
    from llama4_jax import train, trainer
    from llama4_jax.checkpoint import atomic_dir, save_hf
    from llama4_jax.model.text import init_params

    if os.path.exists(args.out) and not (args.overwrite or args.eval_only):
        print(f"{args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    tokenizer, ids = build_tokenizer(65536)
    vocab = -(-len(tokenizer) // 64) * 64
    config = build_config(ids, vocab)
    tc = train.TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                           min_lr_ratio=0.05, weight_decay=0.1, b2=0.98, grad_clip=1.0)

    if not args.eval_only:
        if args.stage == 2 and not args.init:
            print("--stage 2 continues a stage-1 checkpoint: pass --init DIR", file=sys.stderr)
            return 2
        if args.init:
            init_config, params = llama4_jax.load(args.init, dtype="float32")
            if init_config != config:
                print(f"--init {args.init} has another config than this script builds", file=sys.stderr)
                return 2
        else:
            params = init_params(config, jax.random.key(args.seed), dtype="float32")
        os.makedirs(args.work, exist_ok=True)
        t0 = time.time()

        def on_log(step, m):
            if step % 500 == 0:
                print(f"step {step}: loss {m['loss']:.4f} acc {m['accuracy']:.3f} ({time.time() - t0:.0f} s)",
                      flush=True)

        state, _ = trainer.fit(config, params, TaskBatches(tokenizer, config, args.batch_size, args.seed, args.stage),
                               train_config=tc, steps=0 if args.export_only else args.steps,
                               ckpt_dir=os.path.join(args.work, "ckpt"), save_every=args.save_every,
                               attention_impl="blockwise", progress=sys.stderr.isatty(), log_every=10,
                               on_log=on_log)
        params = jax.device_get(state.params)
        steps_done = int(state.step)

        def write(tmp):
            save_hf(config, params, tmp)
            write_support_files(tmp, tokenizer, config)

        atomic_dir(args.out, overwrite=True, write=write)
        with open(os.path.join(args.work, "exported_step"), "w") as f:
            f.write(str(steps_done))
        print(f"exported step {steps_done} to {args.out}", flush=True)
    config, params = llama4_jax.load(args.out, dtype="float32")
    tok = __import__("transformers").AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    res = evaluate_all(config, params, tok, args.eval_n, seed=12345)
    print("exact match on fresh instances:", json.dumps(res), flush=True)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) / 1e6
    steps_done = open(os.path.join(args.work, "exported_step")).read().strip() \
        if os.path.exists(os.path.join(args.work, "exported_step")) else "?"
    text = README.format(params=n_params, steps=steps_done, batch=args.batch_size, n=args.eval_n, **res)
    fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".README.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(args.out, "README.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
