"""Recall accuracy against prompt length, attention temperature tuning on and off.

    python benchmarks/length_generalization.py                     # the shipped checkpoint
    python benchmarks/length_generalization.py --n 50 --multiples 1,4,16,64

The shipped checkpoint was trained on recall prompts of at most 512 tokens (see
scripts/train_default_checkpoint.py). Here each length L = multiple x 512 gets --n
fresh recall instances with as many pairs as fit in L tokens (prompt + answer), so the
key asked for sits anywhere in up to L tokens. A prompt counts as correct when greedy
decoding would produce exactly the answer and the end-of-turn token; that is checked
in one teacher-forced forward over prompt + answer (the argmax at every answer
position must be the answer's next token), which equals greedy exact match and costs
one prefill.

The same weights are run twice: as trained (temperature tuning on: the global NoPE
layers scale queries by 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)), exactly
1 below floor_scale = 512) and with `attn_temperature_tuning=False`. Attention is the
`auto` backend (blockwise flash attention beyond 1,024 tokens, so 32K fits in memory).
Prints a table, writes benchmarks/results/length_generalization.{png,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRAIN_LEN = 512


def pairs_for(length: int) -> int:
    """Most recall pairs whose prompt + answer (3 digits + end of turn) fit `length` tokens."""
    from llama4_jax import tasks

    n = 1
    while tasks.recall_prompt_tokens(n + 1) + 1 + 4 <= length:  # + BOS, + answer
        n += 1
    return n


def exact_match(config, params, tokenizer, examples, batch: int) -> list[bool]:
    """Teacher-forced greedy exact match of each example (prompt + completion + <|eot|>)."""
    import llama4_jax
    from llama4_jax.data import encode

    encoded = [encode(tokenizer, config, prompt=e["prompt"], completion=e["completion"]) for e in examples]
    out = []
    for i in range(0, len(encoded), batch):
        group = encoded[i:i + batch]
        T = max(len(x.ids) for x in group)
        ids = np.full((len(group), T), config.text.pad_token_id, np.int32)
        mask = np.zeros((len(group), T), np.int32)
        for r, x in enumerate(group):
            ids[r, :len(x.ids)], mask[r, :len(x.ids)] = x.ids, 1
        logits = llama4_jax.forward(config, params, ids, attention_mask=mask)
        pred = np.asarray(logits.argmax(-1))
        for r, x in enumerate(group):
            lm = np.asarray(x.loss_mask, bool)
            targets = np.asarray(x.ids)[lm]
            out.append(bool((pred[r, np.flatnonzero(lm) - 1] == targets).all()))
    return out


def main(argv=None) -> int:
    from llama4_jax.generate import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=40, help="fresh recall instances per length")
    p.add_argument("--multiples", default="1,4,16,64", help="lengths as multiples of the training length 512")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "length_generalization"))
    args = p.parse_args(argv)

    import transformers

    import llama4_jax
    from llama4_jax import tasks

    config, params = llama4_jax.load(args.model, dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    off = dataclasses.replace(config, text=dataclasses.replace(config.text, attn_temperature_tuning=False))
    t = config.text
    print(f"recall, trained at <= {TRAIN_LEN} tokens; chunk {t.attention_chunk_size}, floor_scale {t.floor_scale}, "
          f"attn_scale {t.attn_scale}; {args.n} instances per length; greedy exact match (teacher-forced)")
    print(f"{'length':>8s}{'pairs':>7s}{'tuning on':>11s}{'tuning off':>12s}{'seconds':>9s}")
    rows = []
    for m in (int(x) for x in args.multiples.split(",")):
        L = m * TRAIN_LEN
        n_pairs = pairs_for(L)
        rng = np.random.default_rng([args.seed, L])
        examples = [tasks.recall_example(rng, n_pairs) for _ in range(args.n)]
        batch = max(1, 4096 // L)
        t0 = time.perf_counter()
        acc_on = float(np.mean(exact_match(config, params, tok, examples, batch)))
        acc_off = float(np.mean(exact_match(off, params, tok, examples, batch)))
        dt = time.perf_counter() - t0
        rows.append({"multiple": m, "length": L, "pairs": n_pairs, "tuning_on": acc_on, "tuning_off": acc_off})
        print(f"{L:8d}{n_pairs:7d}{acc_on:11.1%}{acc_off:12.1%}{dt:9.1f}", flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"n": args.n, "train_len": TRAIN_LEN, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["length"] for r in rows]
    ax.plot(xs, [r["tuning_on"] for r in rows], "o-", label="temperature tuning on (as trained)")
    ax.plot(xs, [r["tuning_off"] for r in rows], "s--", label="temperature tuning off")
    ax.axvline(TRAIN_LEN, color="grey", lw=0.8, ls=":", label=f"longest training length ({TRAIN_LEN})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"recall exact match ({args.n} prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Length generalization of the shipped checkpoint (recall)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.png and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
