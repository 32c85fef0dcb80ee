"""Train the default checkpoint shipped in llama4_jax/assets/tiny-llama4.

    # how the shipped weights were made (each stage's recipe is in the checkpoint's
    # training.json): stage 1 on one H200 in 5.5 minutes (7663 steps; the add operands then
    # uniform in 0..999), ...
    python scripts/train_default_checkpoint.py --time-budget 405 --moe-impl dense --attention-impl xla \
        --overwrite --eval-n 0
    # ... then stages 2-5 on a 2-core CPU (24-37 minutes each), each from the previous
    # stage's weights, with the add operands of tasks.ADD_OPERANDS (stages 4-5; stages 2-3
    # without the near-power-of-ten quarter): 600, 800, 800, 600 steps of 16 rows at peak lr
    # 5e-4, 8e-4, 5e-4, 5e-4, stage 5 with --segments (each instance a segment of its row):
    python scripts/train_default_checkpoint.py --init llama4_jax/assets/tiny-llama4 --work runs/stage-5 \
        --steps 600 --batch-size 16 --lr 5e-4 --warmup 30 --save-every 50 --segments --overwrite
    python scripts/train_default_checkpoint.py --steps 7663 --overwrite   # the same schedule on any machine
    python scripts/train_default_checkpoint.py --export-only --overwrite  # export the latest train state
    python scripts/train_default_checkpoint.py --eval-only               # evaluate --out, rewrite its README

A small Llama 4 (`Llama4ForConditionalGeneration`: text decoder + vision tower), shaped
the way Llama 4 is, scaled down: 8 layers, chunked RoPE layers (chunk 128) with a
global NoPE layer every 4th layer, MoE every other layer (4 experts, top-1, shared
expert), attention temperature tuning with floor_scale 512 (the longest training
length, so it is exactly 1 during training and switches on past it), context 65,536.
Its tokenizer is byte-level with no merges: every character (every digit, every
letter) is one token, plus Llama 4's special tokens and chat format.

It is trained with `llama4_jax.trainer.fit` on freshly generated instances of the
three tasks of `llama4_jax.tasks` (add, recall at <= 512 tokens, color), filled into
rows of 512 tokens by token share (see TOKEN_SHARE), loss on the completions only.
Every step's batch is a pure function of (seed, step), built ahead by --workers
processes, and the train state is checkpointed (orbax) every --save-every steps under
--work, so an interrupted run resumes where it stopped and gives the same result.
Everything is seeded. `--time-budget` picks the number of steps that fit a wall time
from the speed of the first --probe-steps (warm-up) steps and records it under
--work, so a resumed budgeted run keeps its schedule; the step count it chose is
printed, and `--steps N` reruns that schedule anywhere. The GPU run is the recipe of
record: on a 2-core CPU a step of 8 x 512 tokens measured ~2.5 s, so its 7663 steps of
64 x 512 would take about two days there (an estimate scaled from that measurement).

At the end the weights are exported (Hugging Face format, float32) with the tokenizer
and processor files, evaluated on fresh instances (greedy, exact match), and the
accuracies written into the checkpoint's README.
"""

from __future__ import annotations

import argparse
import json
import os
import string
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
BATCH_TILES = 48  # image tiles per training batch (padded to this: one compiled shape; color is learnt on ~10 images a step)
SEQ_LEN = 512  # the longest training length
RECALL_PAIRS = (1, 62)  # 62 pairs: 502 prompt tokens + BOS + 4 completion tokens <= SEQ_LEN
# Each batch is filled to these shares of its tokens (the task furthest below its share
# goes next). The shares are of tokens, not examples: an addition is ~13 tokens, a
# recall prompt up to 507, so a per-example mix spends nearly every token on recall
# contexts and trains addition on a few dozen instances per step (the first recipe:
# ~107 loss tokens per 4096-token step; add 37.5%, recall 4% after 4000 steps).
# "recall_multi" is the recall context followed by up to MULTI_QUERIES queries
# " ; {k}:{v}" with the loss on every queried value: the same lookup (find the key,
# copy the value after it), trained several times per context. Its separator keeps it
# apart from the graded format " | {k}:", whose single answer ends with <|eot|>.
TOKEN_SHARE = {"add": 0.30, "recall": 0.30, "recall_multi": 0.35, "color": 0.05}
MULTI_QUERIES = 8
# Written into the exported checkpoint: the stages its weights went through, each with
# its recipe (a stage started with --init appends itself to that checkpoint's stages).
TRAINING_FILE = "training.json"
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


def recall_pairs(rng) -> int:
    """Pairs of one recall context: half log-uniform over RECALL_PAIRS (many short
    contexts, where the lookup is learnt cheaply), half uniform (the graded lengths)."""
    import numpy as np

    lo, hi = RECALL_PAIRS
    if rng.random() < 0.5:
        return min(hi, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))
    return int(rng.integers(lo, hi + 1))


class TaskBatches:
    """batches(step): B rows of SEQ_LEN tokens filled with fresh task instances drawn
    from a generator seeded by (seed, step), so a batch is a pure function of the step
    (a resumed run sees the batches an uninterrupted one would; worker processes can
    compute them ahead: `llama4_jax.data.Prefetch`).

    Instances are generated until they hold a little more than B x SEQ_LEN tokens, in
    TOKEN_SHARE proportions, then packed first-fit by decreasing length (few padding
    tokens, unlike in-order packing with prompts of up to 507 tokens); what does not
    fit is dropped, and each row's instances are shuffled. With `segments`, each
    instance is a segment of its row (`data.Packed.segment_ids`: it attends only to
    itself, positions from 0, as a prompt runs at inference); without (stages 1-4 of the
    shipped weights), an instance may attend to the ones before it in its row."""

    def __init__(self, tokenizer, config, batch_size: int, seed: int, segments: bool = False):
        from llama4_jax.data import end_of_turn_id
        from llama4_jax.processor import ImageProcessor

        self.tok, self.config, self.B, self.seed, self.segments = tokenizer, config, batch_size, seed, segments
        self.proc = ImageProcessor.from_dict(PREPROCESSOR)
        self.pad = config.text.pad_token_id
        # The byte tokenizer maps each character to one token: text-only instances are
        # encoded by this table (what `data.encode` gives, tested, without its per-call cost).
        self.char_ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in string.printable}
        self.bos, self.eot = config.text.bos_token_id, end_of_turn_id(tokenizer)

    def ids(self, text: str) -> list[int]:
        """BOS + one token per character."""
        return [self.bos] + [self.char_ids[c] for c in text]

    def example(self, rng, task: str):
        from llama4_jax import tasks
        from llama4_jax.data import Example, encode

        if task == "color":
            e = tasks.color_example(rng)
            return encode(self.tok, self.config, prompt=e["prompt"], completion=e["completion"], images=[e["image"]],
                          image_processor=self.proc)
        e = tasks.add_example(rng) if task == "add" else tasks.recall_example(rng, recall_pairs(rng))
        if task == "recall_multi":
            return self.multi_query(rng, e["prompt"].split(" | ")[0])
        prompt = self.ids(e["prompt"])
        completion = [self.char_ids[c] for c in e["completion"]] + [self.eot]
        return Example(prompt + completion, [0] * len(prompt) + [1] * len(completion))

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
        ids = self.ids(text)
        mask = [0] * len(ids)
        for c in value_at:
            mask[c + 1:c + 4] = [1, 1, 1]
        return Example(ids, mask)

    def __call__(self, step: int) -> dict:
        import numpy as np

        from llama4_jax.data import Packed, make_batch

        rng = np.random.default_rng([self.seed, step])
        used = dict.fromkeys(TOKEN_SHARE, 0)
        examples, tiles, total = [], 0, 0
        while total < 1.02 * self.B * SEQ_LEN:
            short = {t: share * (total + 1) - used[t] for t, share in TOKEN_SHARE.items()
                     if t != "color" or tiles + MAX_TILES + 1 <= BATCH_TILES}
            task = max(short, key=short.get)
            e = self.example(rng, task)
            if e.pixel_values is not None:
                tiles += e.pixel_values.shape[0]
            examples.append(e)
            used[task] += len(e.ids)
            total += len(e.ids)
        rows = [[] for _ in range(self.B)]
        room = [SEQ_LEN] * self.B
        for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].ids)):
            r = next((r for r in range(self.B) if room[r] >= len(examples[i].ids)), None)
            if r is not None:
                rows[r].append(examples[i])
                room[r] -= len(examples[i].ids)
        ids = np.full((self.B, SEQ_LEN), self.pad, np.int32)
        att, loss, seg, row_tiles = np.zeros_like(ids), np.zeros_like(ids), np.zeros_like(ids), []
        for r, row in enumerate(rows):
            row = [row[j] for j in rng.permutation(len(row))]
            seq = [t for e in row for t in e.ids]
            ids[r, :len(seq)], att[r, :len(seq)] = seq, 1
            loss[r, :len(seq)] = [m for e in row for m in e.loss_mask]
            seg[r, :len(seq)] = np.repeat(np.arange(1, len(row) + 1), [len(e.ids) for e in row])
            px = [e.pixel_values for e in row if e.pixel_values is not None]
            row_tiles.append(np.concatenate(px) if px else None)
        return make_batch(Packed(ids, att, loss, row_tiles, seg if self.segments else None), range(self.B),
                          num_tiles=BATCH_TILES)


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
of three tasks (`llama4_jax.tasks`), rows of 512 tokens, in {n_stages} (recorded in
`{TRAINING_FILE}`):

{stages}

The tokenizer is byte-level without merges (one token per character).

| task | prompt | completion | exact match ({n} fresh instances, greedy) |
|---|---|---|---|
| add | `{{a}}+{{b}}=` (0 <= a, b <= 999, digit counts uniform in 1..3; a quarter carry through every digit, as 999+1) | `{{a+b}}` | {add:.1%} |
| recall | `{{k1}}:{{v1}} ... {{kn}}:{{vn}} \\| {{kq}}:` (n <= 62, <= 512 tokens) | `{{vq}}` | {recall:.1%} |
| color | `color?` + one image of one of 8 colors | the color's name | {color:.1%} |

Completions end with `<|eot|>`; the generation config is greedy. Measured with
`python scripts/train_default_checkpoint.py --eval-only`.
"""


def read_stages(path: str) -> list[dict]:
    """The training stages recorded in checkpoint `path` (its TRAINING_FILE; [] without one)."""
    f = os.path.join(path, TRAINING_FILE)
    if not os.path.exists(f):
        return []
    with open(f, encoding="utf-8") as fh:
        stages = json.load(fh).get("stages")
    if not isinstance(stages, list) or not all(isinstance(x, dict) for x in stages):
        raise ValueError(f"{f}: expected {{'stages': [{{...}}, ...]}}")
    return stages


def describe_stages(stages: list[dict]) -> str:
    """One line per stage for the checkpoint's README."""
    if not stages:
        return "(no training record)"
    lines = []
    for i, st in enumerate(stages, 1):
        if "unrecorded" in st:
            lines.append(f"{i}. the weights of `{st['unrecorded']}` (no training record)")
            continue
        start = "a seeded random initialisation" if i == 1 else f"stage {i - 1}'s weights"
        lines.append(f"{i}. {st['steps']} steps of {st['batch_size']} rows from {start}: AdamW, peak lr "
                     f"{st['lr']:g}, warm-up {st['warmup']}, cosine to 5%; add operands: {st['add_operands']}"
                     + ("; each instance a segment of its row." if st.get("segments") else "."))
    return "\n".join(lines)


def plan_steps(args, probe_rate: float, elapsed: float) -> int:
    """--time-budget: the total steps that fit what is left of the budget at the
    probed rate (steps/s), keeping a margin for the second compile and the export."""
    left = args.time_budget - elapsed - args.reserve
    return max(args.warmup + 1, int(args.probe_steps + left * probe_rate))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the checkpoint is written")
    ap.add_argument("--work", default=DEFAULT_WORK, help="train state checkpoints and metrics (resumable)")
    ap.add_argument("--steps", type=int, default=6000, help="total optimizer steps (the cosine schedule's length)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="instead of --steps: train as many steps as fit in this wall time (measured on the "
                         "first --probe-steps steps, which are warm-up steps of any schedule), then export")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--reserve", type=float, default=75.0,
                    help="--time-budget seconds kept for the second compile and the export")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes that build batches ahead of the step")
    ap.add_argument("--moe-impl", default="ragged", help="ragged (CPU) or dense (cheapest on a GPU at 4 experts)")
    ap.add_argument("--attention-impl", default="blockwise", help="blockwise (CPU) or xla (GPU)")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's weights (e.g. the shipped one, to train it further) "
                         "instead of a seeded random initialisation")
    ap.add_argument("--segments", action="store_true",
                    help="each instance a segment of its row (attends only to itself, positions from 0: "
                         "data.Packed.segment_ids); stages 1-4 of the shipped weights trained without")
    ap.add_argument("--eval-n", type=int, default=200,
                    help="fresh instances per task for the final evaluation (0: no evaluation)")
    ap.add_argument("--export-only", action="store_true", help="export the latest train state, no training")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out and rewrite its README")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    t_start = time.time()

    import jax
    import numpy as np

    import llama4_jax
    from llama4_jax import tasks, train, trainer
    from llama4_jax.checkpoint import CheckpointError, atomic_dir, save_hf
    from llama4_jax.data import Prefetch
    from llama4_jax.model.text import init_params
    from llama4_jax.processor import load_tokenizer

    if os.path.exists(args.out) and not (args.overwrite or args.eval_only):
        print(f"{args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.time_budget is not None and not 10 <= args.probe_steps < args.warmup:
        print("--probe-steps must be at least 10 and below --warmup (the probe runs warm-up steps, equal under any length)",
              file=sys.stderr)
        return 2
    if args.time_budget is None and not (args.export_only or args.eval_only) and not 0 <= args.warmup <= args.steps:
        print(f"--warmup ({args.warmup}) must be between 0 and --steps ({args.steps})", file=sys.stderr)
        return 2
    tokenizer, ids = build_tokenizer(65536)
    vocab = -(-len(tokenizer) // 64) * 64
    config = build_config(ids, vocab)

    def train_config(total):
        return train.TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=total,
                                 min_lr_ratio=0.05, weight_decay=0.1, b2=0.98, grad_clip=1.0)

    if not args.eval_only:
        if args.init:
            try:
                init_config, params = llama4_jax.load(args.init, dtype="float32")
            except (CheckpointError, OSError) as e:
                print(f"--init: {e}", file=sys.stderr)
                return 2
            if init_config != config:
                print(f"--init {args.init} has another config than this script builds", file=sys.stderr)
                return 2
        else:
            params = init_params(config, jax.random.key(args.seed), dtype="float32")
        os.makedirs(args.work, exist_ok=True)
        ckpt = os.path.join(args.work, "ckpt")
        steps_file = os.path.join(args.work, "total_steps")
        stage_file = os.path.join(args.work, "stage.json")  # this run's recipe, for TRAINING_FILE
        if args.export_only and not os.path.exists(stage_file):
            print(f"--export-only: no run recorded under {args.work} ({stage_file} is missing)", file=sys.stderr)
            return 2
        try:
            stages = read_stages(args.init) if args.init else []
        except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
            print(f"--init: {e}", file=sys.stderr)
            return 2
        if args.init and not stages:  # weights from elsewhere: say so rather than claim a random start
            stages = [{"unrecorded": os.path.basename(os.path.normpath(args.init))}]
        marks = []

        def on_log(step, m):
            marks.append((step, time.time()))
            if step % 250 == 0 or step == args.probe_steps:
                print(f"step {step}: loss {m['loss']:.4f} acc {m['accuracy']:.3f} lr {m['lr']:.2e} "
                      f"{m['tokens_per_s']:.0f} tok/s ({time.time() - t_start:.0f} s)", flush=True)

        common = dict(ckpt_dir=ckpt, save_every=args.save_every, attention_impl=args.attention_impl,
                      moe_impl=args.moe_impl, progress=sys.stderr.isatty(), log_every=10, on_log=on_log)
        with Prefetch(TaskBatches(tokenizer, config, args.batch_size, args.seed, args.segments),
                      workers=args.workers) as batches:
            total = args.steps
            if args.export_only:
                total = 0
            elif args.time_budget is not None:
                if os.path.exists(steps_file):  # a resumed budgeted run keeps its schedule
                    total = int(open(steps_file).read())
                else:
                    trainer.fit(config, params, batches, train_config=train_config(args.steps),
                                steps=args.probe_steps, **{**common, "log_every": 5})
                    (s0, t0), (s1, t1) = marks[min(1, len(marks) - 2)], marks[-1]  # after the compile
                    total = plan_steps(args, (s1 - s0) / (t1 - t0), time.time() - t_start)
                    with open(steps_file, "w") as f:
                        f.write(str(total))
                    print(f"--time-budget {args.time_budget:.0f} s: {(t1 - t0) / (s1 - s0) * 1e3:.1f} ms/step, "
                          f"training {total} steps", flush=True)
            if not args.export_only:  # (its steps are added at export)
                with open(stage_file, "w") as f:
                    json.dump({"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
                               "total_steps": total, "add_operands": tasks.ADD_OPERANDS,
                               "segments": args.segments}, f)
            limit = None if args.time_budget is None else args.time_budget - args.reserve / 3 - (time.time() - t_start)
            # (--export-only trains no step: any valid schedule restores the state)
            state, _ = trainer.fit(config, params, batches, train_config=train_config(max(total, args.warmup, 1)),
                                   steps=total, time_limit_s=limit, **common)
        params = jax.device_get(state.params)
        steps_done = int(state.step)

        with open(stage_file) as f:
            stages.append({**json.load(f), "steps": steps_done})

        def write(tmp):
            save_hf(config, params, tmp)
            write_support_files(tmp, tokenizer, config)
            with open(os.path.join(tmp, TRAINING_FILE), "w") as f:
                json.dump({"stages": stages}, f, indent=2)

        atomic_dir(args.out, overwrite=True, write=write)
        print(f"exported step {steps_done}{f' of {total}' if total else ''} to {args.out} "
              f"({time.time() - t_start:.0f} s)", flush=True)
    if args.eval_n <= 0:
        return 0
    config, params = llama4_jax.load(args.out, dtype="float32")
    tok = load_tokenizer(args.out)
    res = evaluate_all(config, params, tok, args.eval_n, seed=12345)
    print("exact match on fresh instances:", json.dumps(res), flush=True)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) / 1e6
    stages = read_stages(args.out)
    text = README.format(params=n_params, n_stages=f"{len(stages)} stage{'s' * (len(stages) != 1)}",
                         TRAINING_FILE=TRAINING_FILE, stages=describe_stages(stages), n=args.eval_n, **res)
    fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".README.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(args.out, "README.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
