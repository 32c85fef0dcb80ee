"""Prefill throughput: llama4_jax (jitted, ragged MoE) vs transformers (sdpa), one run.

    python benchmarks/forward.py                 # batch 4 x 512 tokens, fp32, 8 layers
    python benchmarks/forward.py --moe-impl dense --repeats 3
    python benchmarks/forward.py --attention-impl xla

Both sides read the same checkpoint: a Scout-shaped small model (16 experts, top-1,
shared expert, RoPE/NoPE pattern 3:1, qk norm, llama3 RoPE scaling; hidden 512, expert
width 1024, 8 layers) built with transformers, written with `save_pretrained` and
loaded by `llama4_jax.load`. Each side runs in its own process (so peak memory is its
own and the two libraries never compete for threads) and reports the median of
`--repeats` timed calls after one warm-up call; the max abs logit difference between
the two is printed as a sanity check. A decode-sized forward (8 rows of 1 token, no
KV cache) is timed too: it is bound by reading the expert weights, which is where a
port that re-lays-out or copies every expert weight per step loses.

Then the compile time of the Scout-shaped model at 12, 24 and 48 layers, lowered with
`jax.jit(...).lower` on abstract inputs (`ShapeDtypeStruct`, no parameter memory):
the layers are scanned in groups of 4, so the time should stay flat with depth. The
real Scout widths are used there (hidden 5120, 16 experts of width 8192).

Transformers runs all 16 experts on every token (`Llama4TextExperts` is a dense bmm);
llama4_jax computes only the chosen expert, so most of the gap is the MoE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def scout_shaped(layers: int, *, small: bool = True):
    """A Scout-shaped `Llama4Config` with `layers` layers (a multiple of 4).

    small=True: hidden 512, 8 heads / 2 KV heads of 64, 16 experts of width 1024,
    vocab 8192 (so the lm_head does not dominate). small=False: Scout's real widths.
    """
    from llama4_jax.config import PRESETS, Llama4Config

    if layers % 4:
        raise SystemExit(f"--layers must be a multiple of 4 (Scout's RoPE/NoPE period), got {layers}")
    base = PRESETS["scout"].text
    text = dataclasses.replace(base, num_hidden_layers=layers, moe_layers=tuple(range(layers)),
                               no_rope_layers=(1, 1, 1, 0) * (layers // 4))
    if small:
        text = dataclasses.replace(
            text, vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
        )
    return Llama4Config(text=text)


def build_checkpoint(path: str, layers: int) -> None:
    """A randomly initialised transformers Llama4ForCausalLM, saved with save_pretrained."""
    import torch
    import transformers

    from llama4_jax.config import to_hf

    d = to_hf(scout_shaped(layers))
    cfg = transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _ids(batch: int, seq: int, vocab: int):
    return np.random.default_rng(0).integers(3, vocab, size=(batch, seq), dtype=np.int64)


def time_calls(fn, repeats: int):
    """(first call seconds, median of `repeats` further calls in seconds)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


def run_jax(args) -> dict:
    import jax

    import llama4_jax

    config, params = llama4_jax.load(args.ckpt, dtype="float32")
    ids = jax.numpy.asarray(_ids(args.batch, args.seq, config.text.vocab_size), jax.numpy.int32)
    out = {}

    def call():
        out["logits"] = jax.block_until_ready(llama4_jax.forward(config, params, ids, moe_impl=args.moe_impl,
                                                                       attention_impl=args.attention_impl))

    first, med = time_calls(call, args.repeats)
    np.save(os.path.join(args.workdir, "jax.npy"), np.asarray(out["logits"][0]))
    rss = peak_rss_mib()
    dec = jax.numpy.asarray(_ids(args.decode_batch, 1, config.text.vocab_size), jax.numpy.int32)
    decode_call = lambda: jax.block_until_ready(llama4_jax.forward(config, params, dec, moe_impl=args.moe_impl))
    _, dec_med = time_calls(decode_call, args.repeats * 4)
    return {"first_s": first, "median_s": med, "peak_rss_mib": rss, "decode_median_s": dec_med,
            "backend": jax.default_backend()}


def run_hf(args) -> dict:
    import torch
    import transformers

    model = transformers.Llama4ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    ids = torch.as_tensor(_ids(args.batch, args.seq, model.config.vocab_size))
    out = {}

    def call():
        with torch.inference_mode():
            out["logits"] = model(input_ids=ids, use_cache=False).logits

    first, med = time_calls(call, args.repeats)
    np.save(os.path.join(args.workdir, "hf.npy"), out["logits"][0].float().numpy())
    rss = peak_rss_mib()
    dec = torch.as_tensor(_ids(args.decode_batch, 1, model.config.vocab_size))

    def decode_call():
        with torch.inference_mode():
            model(input_ids=dec, use_cache=False)

    _, dec_med = time_calls(decode_call, args.repeats * 4)
    return {"first_s": first, "median_s": med, "peak_rss_mib": rss, "decode_median_s": dec_med,
            "threads": torch.get_num_threads()}


def compile_times(layers_list, batch: int, seq: int) -> list[tuple[int, float, float]]:
    """(layers, lower seconds, compile seconds) of the jitted forward on abstract inputs."""
    import jax
    import jax.numpy as jnp

    import llama4_jax

    rows = []
    for layers in layers_list:
        config = scout_shaped(layers, small=False)
        params = llama4_jax.abstract_params(config, dtype="bfloat16")  # ShapeDtypeStructs, no memory
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        fn = jax.jit(lambda p, i, c=config: llama4_jax.forward(c, p, i))
        t0 = time.perf_counter()
        lowered = fn.lower(params, ids)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        rows.append((layers, t1 - t0, t2 - t1))
    return rows


def run_json(script: str, argv: list[str]) -> dict:
    """Run `python script argv...` in a fresh process; returns the JSON of its last line."""
    res = subprocess.run([sys.executable, os.path.abspath(script), *argv], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def child(side: str, args) -> dict:
    """Run one side in a fresh process; returns its JSON report."""
    return run_json(__file__, ["--side", side, "--ckpt", args.ckpt, "--workdir", args.workdir,
                               "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats),
                               "--moe-impl", args.moe_impl, "--attention-impl", args.attention_impl,
                               "--decode-batch", str(args.decode_batch)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up call (median)")
    p.add_argument("--moe-impl", default="ragged", help="llama4_jax MoE strategy (ragged, blocked, ragged_dot, dense)")
    p.add_argument("--attention-impl", default="auto",
                   help="llama4_jax attention backend of the prefill (auto, xla, blockwise, ...)")
    p.add_argument("--decode-batch", type=int, default=8,
                   help="rows of the decode-sized forward (1 token each, no KV cache): the weight-read-bound path")
    p.add_argument("--compile-layers", default="12,24,48",
                   help="comma-separated depths for the compile timing; '' skips")
    p.add_argument("--side", choices=("jax", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.side:
        print(json.dumps((run_jax if args.side == "jax" else run_hf)(args)))
        return 0

    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir, args.ckpt = tmp, os.path.join(tmp, "ckpt")
        build_checkpoint(args.ckpt, args.layers)
        print(f"Scout-shaped: {args.layers} layers, hidden 512, 16 experts (top-1) of width 1024, fp32; "
              f"prefill {args.batch} x {args.seq} tokens; median of {args.repeats} after 1 warm-up; "
              f"{os.cpu_count()} CPU cores")
        jx = child("jax", args)
        hf = child("hf", args)
        diff = float(np.abs(np.load(os.path.join(tmp, "jax.npy")) - np.load(os.path.join(tmp, "hf.npy"))).max())
    print(f"{'':36s}{'median ms':>10s}{'tokens/s':>10s}{'first call s':>14s}{'peak RSS MiB':>14s}")
    rows = ((f"llama4_jax ({args.moe_impl}, {args.attention_impl}, {jx['backend']})", jx),
            (f"transformers (sdpa, {hf['threads']} thr)", hf))
    for name, r in rows:
        print(f"{name:36s}{r['median_s'] * 1e3:10.1f}{tokens / r['median_s']:10.0f}{r['first_s']:14.2f}"
              f"{r['peak_rss_mib']:14.0f}")
    print(f"ratio llama4_jax / transformers: {hf['median_s'] / jx['median_s']:.2f}x  (target >= 3x)")
    print(f"max |logit diff| on row 0: {diff:.2e}")
    jd, hd = jx["decode_median_s"], hf["decode_median_s"]
    print(f"decode-sized forward ({args.decode_batch} x 1 token, no KV cache; bound by reading the weights): "
          f"llama4_jax {jd * 1e3:.1f} ms, transformers {hd * 1e3:.1f} ms, ratio {hd / jd:.2f}x")

    depths = [int(x) for x in args.compile_layers.split(",") if x.strip()]
    if depths:
        print("compile time, real Scout widths, bf16, abstract inputs (jit(...).lower(...).compile()):")
        for layers, lo, co in compile_times(depths, args.batch, args.seq):
            print(f"  {layers:3d} layers: lower {lo:6.2f} s  compile {co:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
