"""MoE layer throughput: dense vs ragged vs ep (8 devices) vs transformers, one run.

    python benchmarks/moe.py                          # hidden 1024, 16 experts of 2048, fp32
    python benchmarks/moe.py --tokens 64,512 --repeats 5
    python benchmarks/moe.py --real --dtype bfloat16  # Scout widths: hidden 5120, 16 x 8192 (~4 GB a side)

One Scout-shaped MoE layer (router, top-k routed experts, shared expert; top-1 and 16
experts like Scout) with the same random weights on both sides:

  * llama4_jax `dense` (every expert on every token, the reference), `ragged` (only the
    chosen experts; on CPU the blocked grouped matmul), and `ep` (experts split over an
    `expert=8` mesh of 8 devices, tokens dispatched with all-to-all in `shard_map`).
    The 8 devices are `--xla_force_host_platform_device_count=8` CPU devices sharing
    this machine's cores, so `ep` here measures the dispatch overhead, not a speed-up;
  * transformers `Llama4TextMoe` (runs all experts on every token, like `dense`).

Each side runs in its own process (its own peak memory, no thread contention between
the libraries). Reported per token count: the median of `--repeats` timed calls after
a warm-up, tokens/s, useful GFLOP/s (only the top-k experts, the shared expert and the
router count: 2*T*D*E + 6*T*(k+1)*D*F), the ratio to transformers, and XLA's compiled
temporary memory per implementation; each process's peak RSS is printed at the end.
The max abs difference between the outputs of the two sides checks they computed the
same thing.
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


def weights(D: int, F: int, E: int, seed: int = 0) -> dict:
    """Random weights in our layout (fp32 numpy), N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    n = lambda *s, fan: (rng.standard_normal(s, dtype=np.float32) / np.sqrt(fan))  # noqa: E731
    return {"router": n(D, E, fan=D), "gate": n(E, D, F, fan=D), "up": n(E, D, F, fan=D), "down": n(E, F, D, fan=F),
            "shared": {"gate": n(D, F, fan=D), "up": n(D, F, fan=D), "down": n(F, D, fan=F)}}


def inputs(T: int, D: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, T, D), dtype=np.float32)


def useful_flops(T: int, D: int, F: int, E: int, k: int) -> float:
    return 2.0 * T * D * E + 6.0 * T * (k + 1) * D * F


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_jax(args) -> dict:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, ROOT)
    import dataclasses

    import jax
    import jax.numpy as jnp

    from llama4_jax import sharding
    from llama4_jax.config import PRESETS
    from llama4_jax.model.moe import MoE

    jax.config.update("jax_default_matmul_precision", "highest")
    D, F, E, k = args.hidden, args.ffn, args.experts, args.top_k
    text = dataclasses.replace(PRESETS["scout"].text, hidden_size=D, intermediate_size=F, num_local_experts=E,
                               num_experts_per_tok=k)
    dt = jnp.dtype(args.dtype)
    w = weights(D, F, E)
    params = {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, dt), w)}
    mesh = sharding.make_mesh("expert=8")
    rules = sharding.default_rules(mesh)
    ep_params = jax.device_put(params, jax.tree_util.tree_map(
        lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert") if a.ndim == 3
                                             else jax.sharding.PartitionSpec()), params))

    def make(impl):
        module = MoE(text, dt, impl)
        if impl != "ep":
            return jax.jit(lambda p, x: module.apply(p, x)), params

        def traced(p, x):
            with sharding.activate(mesh, rules):
                return module.apply(p, x)

        return jax.jit(traced), ep_params

    out = {"impls": {}, "check": None}
    for impl in args.impls:
        fn, p = make(impl)
        rows = []
        for T in args.tokens:
            x = jnp.asarray(inputs(T, D), dt)
            mem = fn.lower(p, x).compile().memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
            sec = _median_time(lambda: jax.block_until_ready(fn(p, x)), args.repeats)
            rows.append({"tokens": T, "seconds": sec, "temp_bytes": temp})
            if T == args.tokens[0] and impl == args.impls[0]:
                np.save(args.check_file + ".jax.npy", np.asarray(fn(p, x), np.float32))
        out["impls"][impl] = rows
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_torch(args) -> dict:
    import torch
    import transformers
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    D, F, E, k = args.hidden, args.ffn, args.experts, args.top_k
    cfg = transformers.Llama4TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                        num_experts_per_tok=k, hidden_act="silu")
    moe = Llama4TextMoe(cfg).eval()
    w = weights(D, F, E)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        moe.router.weight.copy_(t(w["router"].T))
        moe.experts.gate_up_proj.copy_(t(np.concatenate([w["gate"], w["up"]], axis=-1)))
        moe.experts.down_proj.copy_(t(w["down"]))
        moe.shared_expert.gate_proj.weight.copy_(t(w["shared"]["gate"].T))
        moe.shared_expert.up_proj.weight.copy_(t(w["shared"]["up"].T))
        moe.shared_expert.down_proj.weight.copy_(t(w["shared"]["down"].T))
    dtype = getattr(torch, args.dtype)
    moe = moe.to(dtype)
    rows = []
    for T in args.tokens:
        x = t(inputs(T, D)).to(dtype)
        with torch.inference_mode():
            sec = _median_time(lambda: moe(x), args.repeats)
            if T == args.tokens[0]:
                np.save(args.check_file + ".torch.npy", moe(x)[0].float().numpy().reshape(1, T, D))
        rows.append({"tokens": T, "seconds": sec, "temp_bytes": None})
    return {"impls": {"transformers": rows}, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,256,1024", help="comma-separated token counts")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2048, help="expert (and shared expert) width")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--real", action="store_true", help="Scout's widths: hidden 5120, experts of 8192")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default="dense,ragged,ep", help="llama4_jax MoE implementations to time")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own); 1 avoids spin-waiting on a busy machine")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--check-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.real:
        args.hidden, args.ffn = 5120, 8192
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.impls = args.impls.split(",")

    if args.side:
        res = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        check = os.path.join(tmp, "out")
        results = {}
        for side in ("jax", "torch"):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--check-file", check] + (
                argv if argv is not None else sys.argv[1:])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
            results[side] = json.loads(line[0][len("RESULT "):])
        diff = float(np.abs(np.load(check + ".jax.npy") - np.load(check + ".torch.npy")).max())

    D, F, E, k = args.hidden, args.ffn, args.experts, args.top_k
    print(f"MoE layer: hidden {D}, {E} experts of width {F}, top-{k}, shared expert, {args.dtype}; "
          f"median of {args.repeats}; CPU: {os.cpu_count()} cores, torch threads: {args.torch_threads or 'default'}")
    torch_rows = {r["tokens"]: r["seconds"] for r in results["torch"]["impls"]["transformers"]}
    print(f"{'impl':<14}{'tokens':>8}{'ms':>11}{'tokens/s':>12}{'useful GFLOP/s':>16}{'vs HF':>8}{'XLA temp MiB':>14}")
    for side in ("jax", "torch"):
        for impl, rows in results[side]["impls"].items():
            for r in rows:
                T, s = r["tokens"], r["seconds"]
                temp = "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
                print(f"{impl:<14}{T:>8}{s * 1e3:>11.2f}{T / s:>12.0f}{useful_flops(T, D, F, E, k) / s / 1e9:>16.1f}"
                      f"{torch_rows[T] / s:>7.2f}x{temp:>14}")
    print(f"peak RSS: llama4_jax process {results['jax']['peak_rss_mib']:.0f} MiB, "
          f"transformers process {results['torch']['peak_rss_mib']:.0f} MiB")
    print(f"max |llama4_jax {args.impls[0]} - transformers| at {args.tokens[0]} tokens: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
