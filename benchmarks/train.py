"""Training throughput: llama4_jax's train step vs a PyTorch AdamW loop over transformers, one run.

    python benchmarks/train.py                      # 4 layers, batch 4 x 256 tokens, fp32
    python benchmarks/train.py --layers 8 --repeats 5

Both sides train the same checkpoint (the Scout-shaped model of benchmarks/forward.py:
16 experts, top-1, shared expert, hidden 512, expert width 1024, built with
transformers and `save_pretrained`) on the same fixed batch with the same optimizer
(AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.1, global-norm clipping at 1.0):

  llama4_jax:   `train.make_train_step` (jitted, state donated, ragged MoE with its
                custom-VJP grouped matmul, xla attention);
  transformers: `Llama4ForCausalLM(input_ids, labels=input_ids).loss.backward()`,
                `clip_grad_norm_`, `torch.optim.AdamW.step()` (eager, fp32, sdpa).

Each side runs in its own process (peak memory is its own; no competition for the
cores) and reports the median of --repeats timed steps after one warm-up step; the
loss of the first step is printed for both (the same parameters and batch: they agree
to ~1e-6). Transformers computes every expert for every token (a dense bmm), which is
most of the gap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from forward import build_checkpoint, peak_rss_mib, run_json, time_calls  # noqa: E402  (also puts the package on sys.path)

LR, BETAS, WD, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def _batch(args, vocab):
    return np.random.default_rng(0).integers(3, vocab, size=(args.batch, args.seq), dtype=np.int64)


def run_jax(args) -> dict:
    import jax

    import llama4_jax
    from llama4_jax import train

    config, params = llama4_jax.load(args.ckpt, dtype="float32")
    tc = train.TrainConfig(learning_rate=LR, warmup_steps=0, total_steps=1000, min_lr_ratio=1.0, b1=BETAS[0],
                           b2=BETAS[1], weight_decay=WD, grad_clip=CLIP)
    ids = _batch(args, config.text.vocab_size).astype(np.int32)
    batch = {"input_ids": jax.numpy.asarray(ids), "attention_mask": jax.numpy.ones_like(ids)}
    step_fn = train.make_train_step(config, tc, moe_impl=args.moe_impl)
    box = {"state": train.init_state(config, params, tc)}
    del params

    losses = []

    def step():
        box["state"], m = step_fn(box["state"], batch)
        losses.append(float(m["loss"]))

    _, med = time_calls(step, args.repeats)
    return {"first_loss": losses[0], "median_s": med, "peak_rss_mib": peak_rss_mib(), "backend": jax.default_backend()}


def run_hf(args) -> dict:
    import torch
    import transformers

    model = transformers.Llama4ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    model.train()
    # transformers' AdamW decays every parameter; decay only matrices, as llama4_jax does.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=1e-8)
    ids = torch.as_tensor(_batch(args, model.config.vocab_size))

    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    _, med = time_calls(step, args.repeats)
    return {"first_loss": losses[0], "median_s": med, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def child(side: str, args) -> dict:
    return run_json(__file__, ["--side", side, "--ckpt", args.ckpt, "--batch", str(args.batch), "--seq", str(args.seq),
                               "--repeats", str(args.repeats), "--moe-impl", args.moe_impl])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step (median)")
    p.add_argument("--moe-impl", default="ragged", help="llama4_jax MoE strategy (ragged, dense)")
    p.add_argument("--side", choices=("jax", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps((run_jax if args.side == "jax" else run_hf)(args)))
        return 0

    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        args.ckpt = os.path.join(tmp, "ckpt")
        build_checkpoint(args.ckpt, args.layers)
        print(f"train step, Scout-shaped: {args.layers} layers, hidden 512, 16 experts (top-1) of width 1024, fp32, "
              f"AdamW + clipping; batch {args.batch} x {args.seq} tokens; median of {args.repeats} steps after 1 "
              f"warm-up step; {os.cpu_count()} CPU cores")
        jx = child("jax", args)
        hf = child("hf", args)
    print(f"{'':30s}{'median ms':>10s}{'tokens/s':>10s}{'step-1 loss':>13s}{'peak RSS MiB':>14s}")
    for name, r in ((f"llama4_jax ({args.moe_impl}, {jx['backend']})", jx),
                    (f"PyTorch + transformers ({hf['threads']} thr)", hf)):
        print(f"{name:30s}{r['median_s'] * 1e3:10.1f}{tokens / r['median_s']:10.0f}{r['first_loss']:13.6f}"
              f"{r['peak_rss_mib']:14.0f}")
    print(f"ratio llama4_jax / transformers: {hf['median_s'] / jx['median_s']:.2f}x  (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
