"""Long-context prefill: llama4_jax (blockwise, ring) vs transformers (sdpa), one run.

    python benchmarks/long_context.py                         # the full table (~15-25 min)
    python benchmarks/long_context.py --lengths 8192,32768 --ring-lengths 8192 --hf-lengths 8192,32768

The model is a tiny Llama 4 with the real long-context constants (chunk 8192,
floor_scale 8192, Scout's llama3 RoPE scaling; 4 layers = 3 chunked RoPE layers + 1
global NoPE layer, hidden 24, 3 heads on 1 KV head of 8, `tests/hf_models.py`'s
"real_constants"), built with transformers, written with `save_pretrained` and read by
both sides, batch 1, fp32. So attention is nearly all the work, and its cost is what is
measured: transformers builds [S, S] masks and runs SDPA over every key in every layer;
the `blockwise` backend visits only the key blocks a query block can see (O(S * C) for
the chunked layers, causal half for the global one) with O(S) memory.

Every (library, length) runs in its own process, so its peak RSS (VmHWM) is its own:
ours = compiled ahead of time (`compile s`), then `--repeats` timed calls (1 above 32K
tokens), median printed; peak RSS is the kernel's high-water mark over the timed calls
(reset before them; the "RSS growth" column subtracts the RSS just before them).
Transformers runs lengths 8K, 16K, 32K, ... until one fails (out of
memory under an address-space limit of `--hf-mem-gb`, or longer than `--hf-timeout`
seconds) and reports the longest it reached. `ring` runs on 8 fake CPU devices of this
same CPU (a correctness/overhead check: the devices share 2 cores, so no speed-up is
possible). The last-token logits of both libraries are compared at the first length both
reach. The fitted exponent is the slope of log(peak RSS - RSS before the call) vs
log(length); 1.0 means linear.
"""

from __future__ import annotations

import argparse
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


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _rss_mb()


def build_checkpoint(path: str) -> None:
    from tests.hf_models import TEXT, make_hf

    from llama4_jax.config import Llama4Config

    make_hf(Llama4Config(text=TEXT["real_constants"]), seed=0).save_pretrained(path)


def child_ours(args) -> dict:
    if args.impl.startswith("ring"):
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import llama4_jax
    from llama4_jax.model.text import forward

    config, params = llama4_jax.load(args.ckpt, dtype="float32")
    mesh = None
    if args.impl.startswith("ring"):
        mesh = Mesh(np.array(jax.devices()), ("seq",))
        params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated on the ring
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.text.vocab_size, (1, args.length)), jnp.int32)
    # Compile ahead of time (forward inlines into the outer jit), so the timed calls and
    # the peak-RSS mark cover running only, at every length.
    t = time.perf_counter()
    run = jax.jit(lambda p, i: forward(config, p, i, attention_impl=args.impl, moe_impl="ragged",
                                       mesh=mesh)).lower(params, ids).compile()
    compile_s = time.perf_counter() - t
    rss0 = _current_rss_mb()
    _reset_peak()
    times = []
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        logits = run(params, ids).block_until_ready()
        times.append(time.perf_counter() - t)
    peak = _peak_mb()
    np.save(args.out + ".npy", np.asarray(logits[0, -1]))
    return {"time": float(np.median(times)), "compile": compile_s, "rss": peak, "rss0": rss0}


def child_hf(args) -> dict:
    limit = int(args.hf_mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, model.config.vocab_size, (1, args.length)))
    rss0 = _current_rss_mb()
    _reset_peak()
    times = []
    with torch.no_grad():
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            times.append(time.perf_counter() - t)
    np.save(args.out + ".npy", logits[0, -1].float().numpy())
    return {"time": float(np.median(times)), "rss": _peak_mb(), "rss0": rss0}


def run_child(kind: str, impl: str, length: int, ckpt: str, repeats: int, timeout: float, hf_mem_gb: float):
    out = os.path.join(os.path.dirname(ckpt), f"{kind}_{impl}_{length}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--impl", impl, "--length", str(length),
           "--ckpt", ckpt, "--repeats", str(repeats), "--out", out, "--hf-mem-gb", str(hf_mem_gb)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {p.returncode}: {tail[0][:120]}"}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["logits"] = np.load(out + ".npy")
    return res


def fit_exponent(lengths, rss):
    """Slope of log(rss) on log(length) (least squares)."""
    if len(lengths) < 2:
        return float("nan")
    return float(np.polyfit(np.log(lengths), np.log(np.maximum(rss, 1e-3)), 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072,262144")
    ap.add_argument("--ring-lengths", default="8192,32768")
    ap.add_argument("--hf-lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per length up to 32K (1 above)")
    ap.add_argument("--hf-timeout", type=float, default=600.0)
    ap.add_argument("--hf-mem-gb", type=float, default=12.0, help="address-space limit of the transformers process")
    ap.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="blockwise", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        res = (child_ours if args.child == "ours" else child_hf)(args)
        print(json.dumps(res))
        return 0

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        build_checkpoint(ckpt)
        rows = {}
        runs = [("ours", "blockwise", L) for L in ints(args.lengths)]
        runs += [("ours", "ring", L) for L in ints(args.ring_lengths)]
        for kind, impl, L in runs:
            reps = args.repeats if L <= 32768 else 1
            rows[(kind, impl, L)] = r = run_child(kind, impl, L, ckpt, reps, 3600, args.hf_mem_gb)
            print(f"  {impl:>9} {L:>7}: {_fmt(r)}", flush=True)
        for L in ints(args.hf_lengths):
            rows[("hf", "sdpa", L)] = r = run_child("hf", "sdpa", L, ckpt, args.repeats if L <= 16384 else 1,
                                                    args.hf_timeout, args.hf_mem_gb)
            print(f"  {'hf sdpa':>9} {L:>7}: {_fmt(r)}", flush=True)
            if "error" in r:
                break

    print("\nprefill, batch 1, fp32, tiny Llama 4 (chunk 8192, floor_scale 8192), 2-core CPU")
    print(f"{'backend':>14} {'tokens':>8} {'median s':>9} {'compile s':>9} {'tok/s':>8} {'peak RSS MB':>12} "
          f"{'RSS growth MB':>14}")
    for (kind, impl, L), r in rows.items():
        name = "transformers" if kind == "hf" else impl
        if "error" in r:
            print(f"{name:>14} {L:>8}   {r['error']}")
            continue
        first = f"{r['compile']:>9.2f}" if "compile" in r else f"{'':>9}"
        print(f"{name:>14} {L:>8} {r['time']:>9.2f} {first} {L / r['time']:>8.0f} {r['rss']:>12.0f} "
              f"{r['rss'] - r['rss0']:>14.0f}")
    def ok(kind, impl):
        return [(L, r) for (k, i, L), r in rows.items() if k == kind and i == impl and "error" not in r]

    ours, hf = ok("ours", "blockwise"), ok("hf", "sdpa")
    if ours:
        Ls = [L for L, _ in ours]
        print(f"\nblockwise peak RSS exponent (growth over the pre-call RSS): "
              f"{fit_exponent(Ls, [r['rss'] - r['rss0'] for _, r in ours]):.2f}; "
              f"total peak RSS: {fit_exponent(Ls, [r['rss'] for _, r in ours]):.2f}")
    if hf:
        print(f"transformers (sdpa) longest length reached: {max(L for L, _ in hf)}")
    both = sorted(set(dict(ours)) & set(dict(hf)))
    for L in both:
        a, b = dict(ours)[L], dict(hf)[L]
        print(f"at {L}: blockwise {a['time']:.2f} s vs transformers {b['time']:.2f} s -> {b['time'] / a['time']:.1f}x; "
              f"peak RSS {a['rss']:.0f} vs {b['rss']:.0f} MB")
    if both:
        L = both[0]
        diff = np.max(np.abs(dict(ours)[L]["logits"] - dict(hf)[L]["logits"]))
        print(f"last-token logits, max |blockwise - transformers| at {L} tokens: {diff:.2e}")
    ring = ok("ours", "ring")
    for L, r in ring:
        if L in dict(ours):
            diff = np.max(np.abs(r["logits"] - dict(ours)[L]["logits"]))
            print(f"ring (8 fake devices) at {L}: {r['time']:.2f} s, |ring - blockwise| = {diff:.2e}")
    return 0


def _fmt(r):
    if "error" in r:
        return r["error"]
    return f"{r['time']:.2f} s, peak RSS {r['rss']:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
