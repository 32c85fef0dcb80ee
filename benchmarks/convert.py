"""Checkpoint conversion: throughput and peak host memory, beside transformers.

Builds a synthetic Llama 4 checkpoint (bf16, realistic tensor shapes: Scout's layout at
2/5 of its width, MoE every other layer, several safetensors shards) of >= 2 GB under
/tmp, then, each in a fresh subprocess so that peak RSS is clean:

  * ours, HF -> orbax (`convert_hf_to_orbax`): streams one tensor at a time;
  * ours, HF -> device arrays (`load_hf`, one CPU device: the result itself lives in
    host memory, so its size is subtracted);
  * transformers `Llama4ForCausalLM.from_pretrained(..., dtype=bfloat16)`.

Peak RSS is the kernel's high-water mark (VmHWM, reset after imports; falls back to
`resource.getrusage().ru_maxrss`) minus the RSS after imports (the interpreter
baseline). Everything written is deleted at the end.

    python benchmarks/convert.py [--layers 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def synthetic_config(layers: int):
    from llama4_jax.config import Llama4Config, TextConfig

    text = TextConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=2048, intermediate_size_mlp=8192,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        num_local_experts=16, num_experts_per_tok=1, moe_layers=tuple(range(1, layers, 2)),
        no_rope_layers=(1, 1, 1, 0) * (layers // 4), attention_chunk_size=8192,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    )
    return Llama4Config(text=text)


def build_checkpoint(path: str, layers: int, shard_bytes: int = 1 << 30) -> dict:
    """Write the synthetic checkpoint; returns its sizes (bytes)."""
    import ml_dtypes

    from llama4_jax import checkpoint as ck
    from llama4_jax.config import to_hf
    from llama4_jax.model.text import abstract_params

    config = synthetic_config(layers)
    abstract = abstract_params(config, dtype="bfloat16")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    # Random values of a sensible size; one pool sliced at random offsets keeps the
    # build fast (the values do not matter for conversion speed or memory).
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(bf16)
    tensors = []
    for e in ck.checkpoint_entries(config):
        leaf = ck.base._get(abstract, e.paths[0])
        shape = ck.hf_shape(e.rule, leaf.shape[1:] if e.group is not None else leaf.shape)

        def produce(shape=shape):
            n = math.prod(shape)
            start = int(rng.integers(0, pool.size))
            return np.resize(np.roll(pool, -start), n).reshape(shape)

        tensors.append((e.hf_name, shape, bf16, produce))
    os.makedirs(path)
    shards, size = [[]], 0
    for t in tensors:
        n = math.prod(t[1]) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        ck.write_safetensors(os.path.join(path, fn), shard)
        weight_map.update({t[0]: fn for t in shard})
    total = sum(math.prod(t[1]) * 2 for t in tensors)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**to_hf(config), "torch_dtype": "bfloat16"}, f)
    largest = max(math.prod(t[1]) * 2 for t in tensors)
    return {"total": total, "largest": largest, "tensors": len(tensors), "shards": len(shards)}


# Each measurement runs in its own interpreter; it prints one JSON line.
CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault("JAX_PLATFORMS", "cpu")
def current():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def start():
    # ru_maxrss cannot be reset and is set by the import spike (jax, torch); Linux
    # resets the VmHWM high-water mark on "5" > clear_refs, so the peak is the work's.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return current()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss():  # peak resident set since start(), bytes
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
what, src, dst = sys.argv[1:4]
if what == "transformers":
    import torch, transformers
    base = start()
    t = time.perf_counter()
    m = transformers.Llama4ForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    dt = time.perf_counter() - t
    # from_pretrained may leave parameters as lazily mapped file pages; touch every
    # one so the loaded model is resident, as ours is, before reading the peak.
    with torch.no_grad():
        for p in m.parameters():
            p.view(torch.int16).max()
else:
    import jax, numpy as np
    from llama4_jax import checkpoint as ck
    import orbax.checkpoint.experimental.v1  # imported before the baseline, as torch is
    jax.numpy.zeros(1).block_until_ready()
    base = start()
    t = time.perf_counter()
    if what == "convert":
        ck.convert_hf_to_orbax(src, dst, dtype="bfloat16")
    elif what == "load":
        cfg, params = ck.load_hf(src, dtype="bfloat16")
        jax.block_until_ready(params)
    dt = time.perf_counter() - t
print(json.dumps({{"base": base, "peak": rss(), "end": current(), "seconds": dt}}))
'''


def measure(what: str, src: str, dst: str) -> dict:
    code = CHILD.format(root=ROOT)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code, what, src, dst], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (multiple of 4); 8 gives 2.5 GB")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the files under /tmp")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="llama4_jax_bench_convert_", dir="/tmp")
    try:
        src = os.path.join(root, "hf")
        t = time.perf_counter()
        sizes = build_checkpoint(src, args.layers)
        gib = 1 << 30
        print(f"synthetic checkpoint: {sizes['total'] / gib:.2f} GiB in {sizes['shards']} shards, "
              f"{sizes['tensors']} tensors, largest {sizes['largest'] / gib:.3f} GiB "
              f"(built in {time.perf_counter() - t:.0f} s)")
        # Reference: how fast this disk takes a plain sequential write of 1 GiB.
        block = np.ones(64 << 20, np.uint8)
        t = time.perf_counter()
        with open(os.path.join(root, "dd"), "wb") as f:
            for _ in range(16):
                f.write(block)
            os.fsync(f.fileno())
        disk = (1 << 30) / (time.perf_counter() - t)
        os.remove(os.path.join(root, "dd"))
        print(f"disk: sequential write of 1 GiB with fsync at {disk / (1 << 30):.2f} GiB/s")
        rows = {}
        for what in ("convert", "load", "transformers"):
            runs = []
            for r in range(args.repeats):
                dst = os.path.join(root, f"out_{what}_{r}")
                runs.append(measure(what, src, dst))
                shutil.rmtree(dst, ignore_errors=True)
            runs.sort(key=lambda m: m["seconds"])
            rows[what] = runs[len(runs) // 2]
        print(f"\n{'':28s}{'seconds':>9s}{'GiB/s':>8s}{'peak RSS over base':>20s}{'x largest':>11s}"
              f"{'x checkpoint':>14s}")
        labels = {"convert": "ours HF -> orbax", "load": "ours HF -> device (1 CPU)",
                  "transformers": "transformers from_pretrained"}
        for what, m in rows.items():
            over = m["peak"] - m["base"]
            note = ""
            if what in ("load", "transformers"):  # the loaded params are themselves host memory
                over -= sizes["total"]
                note = "  (minus the loaded params)"
            print(f"{labels[what]:28s}{m['seconds']:9.2f}{sizes['total'] / gib / m['seconds']:8.2f}"
                  f"{over / gib:17.3f} GiB{over / sizes['largest']:11.2f}{over / sizes['total']:14.3f}{note}")
        c, ld, tr = rows["convert"], rows["load"], rows["transformers"]
        print(f"\npeak RSS over base: ours convert {(c['peak'] - c['base']) / gib:.2f} GiB, ours load "
              f"{(ld['peak'] - ld['base']) / gib:.2f} GiB, transformers {(tr['peak'] - tr['base']) / gib:.2f} GiB "
              f"(checkpoint {sizes['total'] / gib:.2f} GiB)")
        print(f"time ours convert / transformers load: {c['seconds'] / tr['seconds']:.2f}x; "
              f"ours load / transformers load: {ld['seconds'] / tr['seconds']:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
