"""Addition accuracy of a checkpoint by the operands' digit counts (greedy, exact match).

    python scripts/add_by_digits.py                       # the shipped checkpoint
    python scripts/add_by_digits.py runs/stage-2 --n 100

Every sum of two one-digit numbers (100), then --n seeded sums for each other pair of
digit counts (1..3 each), and the logit margin of the answer's least certain token on
a few sums a user types first (999+1, 2+2, ...). `tasks.add_example` draws the training
and evaluation sums from all nine pairs; this splits its accuracy into them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIRST_SUMS = ((999, 1), (2, 2), (7, 5), (12, 7), (337, 4), (123, 456))


def sums_by_digits(n: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """{"1+1": all 100 one-digit pairs, "1+2": n seeded pairs, ...}."""
    import numpy as np

    from llama4_jax.tasks import number_with_digits

    rng = np.random.default_rng(seed)
    sets = {"1+1": [(a, b) for a in range(10) for b in range(10)]}
    for da in (1, 2, 3):
        for db in (1, 2, 3):
            if (da, db) != (1, 1):
                sets[f"{da}+{db}"] = [(number_with_digits(rng, da), number_with_digits(rng, db)) for _ in range(n)]
    return sets


def margin(config, params, tok, a: int, b: int) -> float:
    """Smallest (answer token's logit - the best other logit) over the answer and <|eot|>."""
    import numpy as np

    import llama4_jax

    ids = tok(f"{a}+{b}=")["input_ids"]
    answer = tok(str(a + b), add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eot|>")]
    logits = np.asarray(llama4_jax.forward(config, params, np.array([ids + answer])))[0, len(ids) - 1:-1]
    return min(float(row[t] - np.delete(row, t).max()) for row, t in zip(logits, answer))


def main(argv=None) -> int:
    import llama4_jax
    from llama4_jax.generate import DEFAULT_MODEL
    from llama4_jax.processor import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--n", type=int, default=60, help="sums per pair of digit counts other than 1+1")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    if not os.path.isdir(args.model):
        ap.error(f"{args.model}: no such checkpoint directory")
    config, params = llama4_jax.load(args.model, dtype="float32")
    tok = load_tokenizer(args.model)
    sets = sums_by_digits(args.n, args.seed)
    pairs = [p for v in sets.values() for p in v]
    outs = iter(llama4_jax.generate(config, params, [f"{a}+{b}=" for a, b in pairs], tokenizer=tok,
                                    max_new_tokens=6, batch_size=128))
    print(f"{args.model}: greedy exact match by digit counts ('1+1': all 100 sums, others {args.n} seeded)")
    for name, v in sets.items():
        got = [next(outs).text for _ in v]
        wrong = [f"{a}+{b}={t}" for (a, b), t in zip(v, got) if t != str(a + b)]
        print(f"  {name}: {1 - len(wrong) / len(v):6.1%}  {' '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
    print("logit margin of the least certain answer token (negative: answered wrong):")
    print("  " + "  ".join(f"{a}+{b}= {margin(config, params, tok, a, b):+.2f}" for a, b in FIRST_SUMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
