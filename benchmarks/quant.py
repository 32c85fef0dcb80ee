"""Quantized weights against bf16: bytes, batch-1 decode speed, and how far the logits move.

    python benchmarks/quant.py                   # 16 layers (~300M parameters), 32 new tokens
    python benchmarks/quant.py --layers 8 --new 16

The dense ~300M-parameter config of benchmarks/generate.py (hidden 1024, 16 layers, 16
heads / 4 KV heads, MLP 4096, vocabulary 32000) with random weights is saved once as a
bf16 Hugging Face checkpoint, then loaded per format with `llama4_jax.load(path,
dtype="bfloat16", quantize=fmt)` (quantized while streaming). Per format:

  * quantizable bytes: the attention and MLP matrices (`quant.quantizable`) as stored
    (q + scales + offsets), and that over their bf16 bytes (targets: int8 <= 0.55x,
    int4 <= 0.32x);
  * bytes read per decoded token: every parameter except the embedding table (one row
    of it is read);
  * batch-1 decode ms/token: `generate(..., return_stats=True)` decode seconds over
    decode steps, greedy, 32 new tokens after a 64-token prompt, median of --repeats
    calls after a warm-up call (compilation excluded);
  * mean KL(bf16 || format) of the next-token distributions over the prompt's 64
    positions, and greedy agreement of the 32 new tokens with bf16 (random weights:
    small logit changes can flip near-ties, so agreement is a lower bound of what a
    trained model shows).

One process, 2 threads on this CPU (XLA's default); run it on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import dense_300m  # noqa: E402  (also puts the package on sys.path)

FORMATS = ("bf16", "int8", "int4", "fp8")


def tree_bytes(params) -> tuple[int, int, int]:
    """(quantizable bytes as stored, their bf16 bytes, bytes read per decoded token)."""
    import jax

    from llama4_jax import quant

    qbytes = bf16 = per_token = 0
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=quant.is_quantized)
    for path, leaf in leaves:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        arrays = [a for a in (leaf.q, leaf.scale, leaf.offset) if a is not None] if quant.is_quantized(leaf) \
            else [leaf]
        n = sum(a.nbytes for a in arrays)
        if quant.quantizable(names):
            qbytes += n
            bf16 += 2 * int(np.prod(leaf.shape))
        per_token += n if names[-1] != "embed" else n // arrays[0].shape[0]
    return qbytes, bf16, per_token


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (a multiple of 4)")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    import llama4_jax
    from llama4_jax.checkpoint import save_hf

    config = dense_300m(args.layers)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.text.vocab_size, 64).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        params = llama4_jax.init_params(config, jax.random.key(0), dtype="bfloat16")
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
        save_hf(config, params, path)
        del params
        print(f"dense config: {n_params / 1e6:.0f}M parameters, {args.layers} layers; batch 1, prompt 64, "
              f"{args.new} new tokens, medians of {args.repeats}", flush=True)
        rows, ref = [], None
        for fmt in FORMATS:
            cfg, p = llama4_jax.load(path, dtype="bfloat16", quantize=None if fmt == "bf16" else fmt)
            qb, bf, per_tok = tree_bytes(p)
            logp = jax.nn.log_softmax(np.asarray(llama4_jax.forward(cfg, p, np.array([prompt]))[0], np.float32))
            run = functools.partial(llama4_jax.generate, cfg, p, [prompt], max_new_tokens=args.new,
                                    return_stats=True)
            run()  # compile
            times, tokens = [], None
            for _ in range(args.repeats):
                outs, stats = run()
                times.append(stats.decode_s / max(stats.decode_steps, 1))
                tokens = outs[0].token_ids
            ms = 1e3 * float(np.median(times))
            if ref is None:
                ref = (logp, tokens)
            kl = float(np.mean(np.sum(np.exp(ref[0]) * (ref[0] - logp), axis=-1)))
            agree = sum(a == b for a, b in zip(tokens, ref[1])) / max(len(ref[1]), 1)
            rows.append((fmt, qb, qb / bf, per_tok, ms, kl, agree))
            print(f"  {fmt}: {ms:.1f} ms/token", flush=True)
            del p
    base_ms = rows[0][4]
    print("\nformat  quantizable MiB  x bf16  MiB read/token  ms/token  x bf16 time  KL vs bf16  greedy agreement")
    for fmt, qb, ratio, per_tok, ms, kl, agree in rows:
        print(f"{fmt:6}  {qb / 2**20:15.1f}  {ratio:6.3f}  {per_tok / 2**20:14.1f}  {ms:8.1f}  {ms / base_ms:11.2f}"
              f"  {kl:10.2e}  {agree:16.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
