"""Batched generation against transformers, and the batch-1 decode roofline, in one run.

    python benchmarks/generate.py                       # both parts
    python benchmarks/generate.py --part batch --repeats 3
    python benchmarks/generate.py --part batch --cpu-devices 2 --batch-mesh tensor=2
    python benchmarks/generate.py --part roofline --roofline-layers 16
    python benchmarks/generate.py --part context --contexts 100,4096,16384,65536
    python benchmarks/generate.py --part prefill-1m
    python benchmarks/generate.py --part mixed --mixed-prompts 256

1. `batch`: a Scout-shaped model (every layer MoE, 16 experts, top-1, shared expert,
   QK norm, chunk 8192, llama3 RoPE scaling; hidden 256, 8 layers, experts of 512,
   ~58M parameters), fp32, built with transformers and saved; 8 prompts of 128 tokens,
   128 new tokens each, greedy, stop tokens off so every row generates all 128:
   `llama4_jax.generate` vs transformers `generate` (its dynamic cache, SDPA). Ours runs
   on `--cpu-devices` CPU devices (default: one per core; the weights replicated over
   a data mesh, each device prefilling and decoding its own rows, as `llama4-jax
   generate --cpu-devices` does; `--batch-mesh` names another mesh of them, e.g.
   `tensor=2`, each device reading its share of every weight) and on one; transformers
   on torch's threads (one per core). Reported: median wall time of `--repeats` runs
   after a warm-up (compilation is in the warm-up only), generated tokens/s, the
   ratio, each process's peak RSS, and whether the greedy tokens agree; and our
   decode step against its roofline (`batch_roofline`: the bytes a step of 8 rows
   must read, the distinct experts the rows' tokens chose included, over the
   both-core read bandwidth as in `context`), and (on a data mesh) the bytes our
   data-parallel devices read at the rate XLA's matrix-vector products of their rows
   read when the devices run them at once (`matvec_bandwidth`).
2. `roofline`: decode at batch 1 on a dense ~300M-parameter config (hidden 1024, 16
   layers, 16 heads / 4 KV heads, MLP 4096, vocabulary 32000), fp32: weight bytes read
   per token (every layer, the final norm and the lm_head; one embedding row) divided
   by the measured decode step time, as a fraction of the memory bandwidth measured in
   the same process with a large numpy copy ((read + write bytes) / time). The compiled
   decode step's HLO is searched for copies and transposes of weight-sized arrays.
3. `context`: batch-1 decode of the `batch` part's Scout-shaped model (fp32, random
   weights) after prompts of each `--contexts` length (prefilled in 8192-token pieces),
   33 new tokens: ms per token against the roofline (bytes of the weights one token
   reads: attention, router, shared expert and its top-1 routed expert per layer, the
   final norm, the lm_head and one embedding row; plus the bytes of the occupied KV
   cache slots: every layer's keys, values and positions) divided by the read
   bandwidth of both cores (`read_bandwidth`: one thread per core OR-reducing its half
   of a 1 GiB array; a single-threaded copy understates it). Ours on one device, and on
   a `seq` mesh of `--cpu-devices` CPU devices (weights replicated, each device
   reading its share of every layer's cache slots: `engine.decode`'s slot_parallel).
   Also printed: the same bytes at the rate XLA's one-row products by distinct
   [hidden, expert width] matrices (512 KiB, the size of most of a step's weight reads)
   read on one device (`matvec_bandwidth`): what those reads can get here.
5. `mixed`: an offline workload on the `batch` part's model: `--mixed-prompts` prompts
   (seeded) with lengths drawn uniformly from 16..2048 and `max_new_tokens` from
   8..256, greedy, stop tokens off, 8 slots / rows per batch (ours on `--cpu-devices`
   devices, as in `batch`). Three ways, each in its own process, one timed run after an untimed warm-up run over the first 16 prompts
   (which compiles what it can): our continuous batching (one `generate` call over
   all prompts); our static batching (one `generate` call per consecutive batch of 8
   prompts, so a batch waits for its longest row, as a static loop does); transformers
   `generate` on the same consecutive batches, left-padded, each batch run to its
   longest budget (`max_new_tokens`, `min_new_tokens`) and credited only each row's own
   budget. Reported: generated tokens/s (the sum of the budgets over wall time), the
   ratios, and static over continuous part by part (prefill, decode, compile; the
   whole ratio is their mean weighted by continuous's seconds).
4. `prefill-1m`: a 1,048,576-token prompt prefilled in 8192-token pieces on a tiny
   model (4 layers: 3 chunked RoPE layers, 1 global NoPE layer; hidden 64, one KV head
   of 16): wall time, and the process's peak RSS against the bytes of its KV cache.

Each side runs in its own process, so peak memory and threads are its own. The CPU may
be shared with other work: run it on an idle machine for stable numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH, PROMPT, NEW = 8, 128, 128


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def scout_shaped():
    from llama4_jax.config import Llama4Config, RopeScaling, TextConfig

    return Llama4Config(text=TextConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16, num_experts_per_tok=1,
        moe_layers=tuple(range(8)), no_rope_layers=(1, 1, 1, 0) * 2, attention_chunk_size=8192, floor_scale=8192,
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), max_position_embeddings=16384,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ))


def dense_300m(layers: int):
    from llama4_jax.config import Llama4Config, TextConfig

    return Llama4Config(text=TextConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, intermediate_size_mlp=4096,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_local_experts=1, num_experts_per_tok=1, moe_layers=(), no_rope_layers=(1, 1, 1, 0) * (layers // 4),
        attention_chunk_size=8192, floor_scale=8192, max_position_embeddings=16384,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ))


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, PROMPT).tolist() for _ in range(BATCH)]


# ---- children ----------------------------------------------------------------------

def build(path: str) -> dict:
    from tests.hf_models import make_hf

    make_hf(scout_shaped(), seed=0).save_pretrained(path)
    return {}


def load_ours(path: str, devices: int, spec: str | None = None):
    """(config, params, mesh): the checkpoint in fp32, replicated over a data mesh of
    `devices` CPU devices (each decodes its own rows, as `llama4-jax generate
    --cpu-devices` does), or laid out on the mesh `spec` of them (`sharding.make_mesh`,
    under its default rules), or on one device (mesh None)."""
    import jax

    import llama4_jax
    from llama4_jax import sharding

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)  # before the backend starts
    mesh = sharding.make_mesh(spec or f"data={devices}") if devices > 1 else None
    config, params = llama4_jax.load(path, dtype="float32", mesh=mesh)
    return config, params, mesh


def batch_ours(path: str, repeats: int, devices: int, spec: str | None = None) -> dict:
    import jax

    import llama4_jax

    config, params, mesh = load_ours(path, devices, spec)
    config = config.replace_text(eos_token_id=())  # no stop token: every row makes NEW tokens
    P = prompts(config.text.vocab_size)
    run = lambda: llama4_jax.generate(config, params, P, max_new_tokens=NEW, batch_size=BATCH,  # noqa: E731
                                      return_stats=True, mesh=mesh)
    t0 = time.perf_counter()
    out, st = run()
    first, compile_s = time.perf_counter() - t0, st.compile_s
    times, stats = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, st = run()
        times.append(time.perf_counter() - t0)
        stats.append(st)
    i = int(np.argsort(times)[len(times) // 2])
    rss = peak_rss_mib()  # before the roofline's bandwidth array
    return {"median_s": times[i], "first_s": first, "compile_s": compile_s, "prefill_s": stats[i].prefill_s,
            "decode_s": stats[i].decode_s, "decode_steps": stats[i].decode_steps,
            "tokens": [o.token_ids for o in out], "peak_rss_mib": rss, "device": str(jax.devices()[0]),
            "roofline": batch_roofline(config, params, P, [o.token_ids for o in out], devices)}


def batch_roofline(config, params, prompts_, tokens, devices: int) -> dict:
    """Bytes the batch's decode steps read, and the step time that reading them at the
    both-core read bandwidth (`read_bandwidth`) would take.

    Per step (one new token of every row): the weights every row shares (attention,
    router, shared expert, norms, lm_head; one embedding row per row), the routed
    experts the rows chose (each distinct (layer, expert) once: `probes.moe_trace` on
    the rows' prompt + generated tokens gives the experts each fed token chose), and
    the occupied KV cache. `ideal`: one reader reads each of them once. `lanes`: as our
    data-parallel decode on `devices` devices reads them: each device the shared
    weights and its own rows' experts (rows split in order, `devices` equal shares).
    Averaged over the decode steps (the tokens fed after the first generated one).
    """
    import jax

    from llama4_jax import probes

    t = config.text
    routed = sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if routed_expert(jax.tree_util.keystr(path)))
    expert = routed // (t.num_local_experts * len(t.moe_layers))  # one expert of one layer
    shared = active_bytes_per_token(config, params) - expert * t.num_experts_per_tok * len(t.moe_layers)
    seqs = np.asarray([p + tok for p, tok in zip(prompts_, tokens)], np.int32)
    chosen = probes.moe_trace(config, params, seqs).experts  # [M, B, T, k]
    B, start = seqs.shape[0], len(prompts_[0])
    steps = range(start, start + len(tokens[0]) - 1)  # position of the token each decode step feeds
    share = B // devices

    def experts_read(rows, pos):
        return sum(len(set(chosen[m, rows, pos].ravel().tolist())) for m in range(chosen.shape[0]))

    ideal, lanes = [], []
    for pos in steps:
        cache = B * occupied_cache_bytes(config, pos + 1)
        ideal.append(shared + experts_read(slice(None), pos) * expert + cache)
        lanes.append(devices * shared + cache + expert * sum(
            experts_read(slice(d * share, (d + 1) * share), pos) for d in range(devices)))
    bw, threads = read_bandwidth()
    mv = matvec_bandwidth(devices, B // devices, t.hidden_size)
    return {"ideal_bytes": float(np.mean(ideal)), "lanes_bytes": float(np.mean(lanes)), "read_gbs": bw / 1e9,
            "threads": threads, "ideal_s": float(np.mean(ideal)) / bw, "lanes_s": float(np.mean(lanes)) / bw,
            "matvec_gbs": mv / 1e9, "lanes_matvec_s": float(np.mean(lanes)) / mv,
            "shared_bytes": shared, "expert_bytes": expert}


def matvec_bandwidth(devices: int, rows: int, d: int, n: int = 1 << 16, steps: int = 20,
                     width: int | None = None) -> float:
    """Bytes per second that XLA's matrix-vector products read when `devices` CPU
    devices run them at once, as the data-parallel decode step does: each device
    multiplies `rows` rows by its own copy of a [d, n] fp32 matrix (64 MiB at d = 256,
    far past the caches), `steps` times in a loop (`shard_map` over a data mesh); with
    `width`, by n // width distinct [d, width] matrices in turn instead (the sizes of a
    decode step's products: XLA:CPU runs a large product on both cores' threads, a
    512 KiB one on one thread). All devices' bytes over the wall time, best of 5. Unlike
    `read_bandwidth` this is what the step's weight reads can get: the devices share
    one memory bus, and a product of a few rows reads slower than an OR-reduce."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    width = width or n
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())  # a copy per device
    ws = [jax.device_put(np.full((d, width), 1e-3, np.float32), replicated) for _ in range(n // width)]
    x = jax.device_put(np.ones((devices * rows, d), np.float32), NamedSharding(mesh, PartitionSpec("data")))

    def local(x, *ws):  # each product feeds the next, so none is hoisted out of the loop
        def step(i, y):
            for w in ws:
                y = y + jnp.max(y @ w, axis=-1, keepdims=True) * 1e-6
            return y

        return jax.lax.fori_loop(0, steps, step, x)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec("data"),) + (PartitionSpec(),) * len(ws),
                              out_specs=PartitionSpec("data")))
    jax.block_until_ready(f(x, *ws))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, *ws))
        best = min(best, time.perf_counter() - t0)
    return devices * steps * d * (n // width * width) * 4 / best


def batch_hf(path: str, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts(model.config.vocab_size))

    def run():
        with torch.inference_mode():
            # min_new_tokens keeps eos from ending rows early, as stop tokens are off on our side.
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)

    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "first_s": first, "tokens": out[:, PROMPT:].tolist(),
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """(read + write) bytes per second of a large numpy copy (best of `repeats`)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, int]:
    """Bytes per second read by one thread per core, each OR-reducing its share of a
    large uint64 array (numpy releases the GIL; an OR is far cheaper than the load, so
    the threads wait on memory, not on arithmetic). Median of `repeats`; also the
    thread count. A single-threaded copy understates what both cores can read. The
    median, so one fast read does not decide the roofline. The machine's reads come out
    at about 32-35 or about 60-64 GB/s from one run to the next, in any process (on
    2026-12-07: two context runs' processes 59.6 / 63.2, a batch run's 63.5, other
    context runs' 31.6 / 35.4, processes of their own 32.0-34.6). One thread alone
    reads 28.7-30.7 GB/s of it (in a 32-34 GB/s phase), so one core can take most of
    the bandwidth; XLA:CPU's one-row products on one thread read 13-19 GB/s of it
    (dependent chains of 512 KiB-1 MiB matrices)."""
    import concurrent.futures

    n = os.cpu_count() or 1
    parts = np.array_split(np.ones(nbytes // 8, np.uint64), n)
    times = []
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, parts))
            times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times)), n


def weight_copies(hlo: str, min_bytes: int) -> list[str]:
    """copy/transpose instructions of the compiled HLO producing >= min_bytes arrays."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (f32|bf16|f16)\[([\d,]*)\]\{[^}]*\} (copy|transpose)\(", line)
        if m:
            n = int(np.prod([int(x) for x in m.group(2).split(",") if x])) * (2 if m.group(1) != "f32" else 4)
            if n >= min_bytes:
                found.append(line.strip()[:160])
    return found


def fp32_params(config):
    """Random fp32 weights for `config`, initialised before this returns. JAX dispatches
    the initialisation asynchronously: a bandwidth measured while it still ran on both
    cores came out at half (16.3 against 32-36 GB/s alone), and a clock started then
    would count it."""
    import jax

    import llama4_jax

    return jax.block_until_ready(llama4_jax.init_params(config, jax.random.key(0), dtype="float32"))


def roofline(layers: int, new_tokens: int) -> dict:
    import jax

    import llama4_jax
    from llama4_jax import engine

    config = dense_300m(layers).replace_text(eos_token_id=())
    params = fp32_params(config)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size * x.dtype.itemsize for _, x in leaves)
    embed = params["params"]["embed"]
    # Per token: every weight once, except the embedding table, of which one row is read.
    per_token = total - embed.size * 4 + embed.shape[1] * 4
    P = [list(range(3, 19))]
    llama4_jax.generate(config, params, P, max_new_tokens=new_tokens, batch_size=1, return_stats=True)  # compile
    steps = []
    for _ in range(3):
        _, st = llama4_jax.generate(config, params, P, max_new_tokens=new_tokens, batch_size=1, return_stats=True)
        steps.append(st.decode_s / (st.generated_tokens - 1))  # the first token comes from prefill
    step = float(np.median(steps))
    bw = copy_bandwidth()
    hlo = next(c.as_text() for k, c in engine.COMPILED.items() if k[0] is engine.decode)
    weight_sizes = sorted({x.size * 4 // config.text.num_groups for _, x in leaves if x.ndim >= 2})
    copies = weight_copies(hlo, min(s for s in weight_sizes if s >= 1 << 20))
    return {"params": int(sum(x.size for _, x in leaves)), "bytes_per_token": int(per_token), "step_s": step,
            "achieved_gbs": per_token / step / 1e9, "copy_gbs": bw / 1e9, "fraction": per_token / step / bw,
            "weight_copies": copies, "peak_rss_mib": peak_rss_mib(), "threads_note": os.cpu_count()}


def active_bytes_per_token(config, params) -> int:
    """Weight bytes one batch-1 decode token reads: every leaf, except routed experts
    (top-k of E read) and the embedding table (one row)."""
    import jax

    t, total = config.text, 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        key = jax.tree_util.keystr(path)
        n = x.size * x.dtype.itemsize
        if key == "['params']['embed']":
            n = x.shape[-1] * x.dtype.itemsize
        elif routed_expert(key):
            n = n * t.num_experts_per_tok // t.num_local_experts
        total += n
    return total


def routed_expert(key: str) -> bool:
    """Whether the parameter at `key` (`jax.tree_util.keystr`) is a routed expert weight."""
    return "['moe']" in key and "['shared']" not in key and "router" not in key


def occupied_cache_bytes(config, context: int, itemsize: int = 4) -> int:
    """Bytes of the KV cache slots a decode step at `context` tokens reads: per layer the
    occupied slots (the ring buffer's chunk at most) of keys, values (K x d each) and
    their int32 positions."""
    from llama4_jax.cache import cache_slots

    t = config.text
    slots = sum(min(context, s) for s in cache_slots(t, context)) * t.num_groups
    return slots * (2 * t.num_key_value_heads * t.head_dim * itemsize + 4)


def context_decode(contexts: list[int], new: int, devices: int) -> dict:
    import jax

    import llama4_jax
    from llama4_jax import sharding

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)  # before the backend starts
    config = scout_shaped().replace_text(eos_token_id=(), max_position_embeddings=1 << 20)
    params = fp32_params(config)
    weights = active_bytes_per_token(config, params)
    bw, threads = read_bandwidth()
    # What XLA's one-row products by [hidden, expert width] matrices (the size of most of
    # a batch-1 step's weight reads: 512 KiB here) read on one device, printed beside the
    # target's roofline: the rate those reads can get (`matvec_bandwidth`).
    mv = matvec_bandwidth(1, 1, config.text.hidden_size, width=config.text.intermediate_size)
    # Ours on one device, and with `devices` > 1 on a `seq` mesh: the weights replicated,
    # every layer's cache slots split, each device reading its share (`engine.decode`'s
    # slot_parallel).
    ways = {1: (params, None)}
    if devices > 1:
        mesh = sharding.make_mesh(f"seq={devices}")
        ways[devices] = (jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), mesh)
    rows = []
    for n in contexts:
        P = [np.random.default_rng(n).integers(3, config.text.vocab_size, n).tolist()]
        row = {"context": n}
        for d, (p, mesh) in ways.items():
            run = lambda: llama4_jax.generate(config, p, P, max_new_tokens=new, batch_size=1,  # noqa: E731
                                              prefill_chunk=8192, return_stats=True, mesh=mesh)[1]
            run()  # compile
            steps, prefill = [], []
            for _ in range(3):
                st = run()
                steps.append(st.decode_s / (st.generated_tokens - 1))  # the first token comes from prefill
                prefill.append(st.prefill_s)
            row[f"step_s_{d}"] = float(np.median(steps))
            row[f"prefill_s_{d}"] = float(np.median(prefill))
        cache = occupied_cache_bytes(config, n + new // 2)
        rows.append({**row, "cache_bytes": cache, "roofline_s": (weights + cache) / bw,
                     "matvec_s": (weights + cache) / mv})
    return {"weights_bytes": weights, "read_gbs": bw / 1e9, "threads": threads, "matvec_gbs": mv / 1e9,
            "matvec_kib": config.text.hidden_size * config.text.intermediate_size * 4 // 1024, "rows": rows,
            "devices": list(ways), "peak_rss_mib": peak_rss_mib()}


def mixed_workload(n: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(1234)
    lens = rng.integers(16, 2049, n)
    return [rng.integers(3, vocab, k).tolist() for k in lens], rng.integers(8, 257, n).tolist()


def mixed_ours(path: str, n: int, static: bool, devices: int) -> dict:
    import llama4_jax
    from llama4_jax import engine

    config, params, mesh = load_ours(path, devices)
    config = config.replace_text(eos_token_id=())
    P, budgets = mixed_workload(n, config.text.vocab_size)

    def run(P, budgets):
        if not static:
            return llama4_jax.generate(config, params, P, max_new_tokens=budgets, batch_size=BATCH,
                                       return_stats=True, mesh=mesh)[1]
        stats = []
        for i in range(0, len(P), BATCH):
            stats.append(llama4_jax.generate(config, params, P[i:i + BATCH], max_new_tokens=budgets[i:i + BATCH],
                                             batch_size=BATCH, return_stats=True, mesh=mesh)[1])
        return stats

    run(P[:16], budgets[:16])  # warm-up
    t0 = time.perf_counter()
    st = run(P, budgets)
    wall = time.perf_counter() - t0
    sts = st if static else [st]
    return {"wall_s": wall, "generated": int(sum(budgets)), "compile_s": sum(x.compile_s for x in sts),
            "decode_steps": sum(x.decode_steps for x in sts), "peak_rss_mib": peak_rss_mib(),
            "prefill_s": sum(x.prefill_s for x in sts), "decode_s": sum(x.decode_s for x in sts),
            "compilations": len(engine.COMPILED)}


def mixed_parts(cont: dict, static: dict) -> str:
    """Static over continuous batching, part by part, from the two runs' own numbers.
    Both run the same engine; what continuous batching saves is decode steps (static
    decodes every batch to its longest budget, continuous refills a finished row's
    slot) and padding (its queue is sorted by length, so a prefill call's prompts are
    alike). A run's wall time is about the sum of its prefill, decode and compile
    seconds, so the whole ratio is the parts' ratios averaged with continuous's seconds
    as weights: it reaches a target only where the parts reach it."""
    def ratio(a, b):  # a part continuous did not spend (nothing compiled after the warm-up) has none
        return f"{a / b:.2f}x" if b > 0 else "n/a"

    steps = static["decode_steps"] / cont["decode_steps"]
    per_step = static["decode_s"] / cont["decode_s"] / steps
    return (f"static / continuous by part: prefill {ratio(static['prefill_s'], cont['prefill_s'])}, decode "
            f"{ratio(static['decode_s'], cont['decode_s'])} ({static['decode_steps']} / {cont['decode_steps']} "
            f"steps = {steps:.2f}x, {per_step:.2f}x per step), compile {ratio(static['compile_s'], cont['compile_s'])}"
            "; the whole is their mean weighted by continuous's seconds")


def mixed_hf(path: str, n: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    P, budgets = mixed_workload(n, model.config.vocab_size)

    def run(P, budgets):
        for i in range(0, len(P), BATCH):
            rows, new = P[i:i + BATCH], max(budgets[i:i + BATCH])
            T = max(len(r) for r in rows)
            ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=0)

    run(P[:16], budgets[:16])
    t0 = time.perf_counter()
    run(P, budgets)
    return {"wall_s": time.perf_counter() - t0, "generated": int(sum(budgets)), "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


def tiny_1m():
    from llama4_jax.config import Llama4Config, TextConfig

    return Llama4Config(text=TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=1, num_key_value_heads=1, head_dim=16, num_local_experts=1, num_experts_per_tok=1,
        moe_layers=(), no_rope_layers=(1, 1, 1, 0), attention_chunk_size=8192, floor_scale=8192,
        max_position_embeddings=1 << 21, bos_token_id=1, eos_token_id=(), pad_token_id=0,
    ))


def prefill_1m(tokens: int) -> dict:
    import llama4_jax
    from llama4_jax.cache import cache_bytes

    config = tiny_1m()
    params = fp32_params(config)
    P = [np.random.default_rng(0).integers(3, 512, tokens).tolist()]
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    out, st = llama4_jax.generate(config, params, P, max_new_tokens=4, batch_size=1, prefill_chunk=8192,
                                  max_model_len=tokens + 16, return_stats=True)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "prefill_s": st.prefill_s, "compile_s": st.compile_s,
            "generated": out[0].token_ids, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss0,
            "cache_mib": cache_bytes(config, 1, tokens + 16) / 2**20}


def child(part: str, args, *extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, *extra, "--repeats", str(args.repeats),
           "--roofline-layers", str(args.roofline_layers), "--roofline-new", str(args.roofline_new),
           "--contexts", args.contexts, "--prefill-tokens", str(args.prefill_tokens),
           "--mixed-prompts", str(args.mixed_prompts), "--cpu-devices", str(args.cpu_devices)]
    if args.batch_mesh:
        cmd += ["--batch-mesh", args.batch_mesh]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"child {part} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["batch", "roofline", "context", "prefill-1m", "mixed", "all"], default="all")
    ap.add_argument("--mixed-prompts", type=int, default=256, help="prompts of the mixed part")
    ap.add_argument("--cpu-devices", type=int, default=os.cpu_count() or 1,
                    help="CPU devices our batch, mixed and context runs decode on side by side (default: the cores; "
                         "the batch and context parts also run one device)")
    ap.add_argument("--batch-mesh", help="mesh of the --cpu-devices devices our batch part runs on, e.g. tensor=2 "
                                         "(default: data=<--cpu-devices>, each device decoding its own rows)")
    ap.add_argument("--contexts", default="100,4096,16384,65536", help="prompt lengths of the context part")
    ap.add_argument("--prefill-tokens", type=int, default=1 << 20, help="prompt length of the prefill-1m part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--roofline-layers", type=int, default=16)
    ap.add_argument("--roofline-new", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows_split = True  # our batch run's devices each decode their own rows (a data mesh)
    if args.batch_mesh:  # checked here, not after the children built the checkpoint
        from llama4_jax.sharding import ShardingError, parse_mesh_spec
        try:
            axes = parse_mesh_spec(args.batch_mesh)
        except ShardingError as e:
            ap.error(f"--batch-mesh: {e}")
        n = math.prod(size for _, size in axes)
        if n != args.cpu_devices:
            ap.error(f"--batch-mesh {args.batch_mesh} has {n} devices; --cpu-devices is {args.cpu_devices}")
        rows_split = all(name == "data" for name, size in axes if size > 1)

    if args.child:
        fn = {"build": lambda: build(args.path),
              "ours": lambda: batch_ours(args.path, args.repeats, args.cpu_devices, args.batch_mesh),
              "ours-1": lambda: batch_ours(args.path, args.repeats, 1),
              "hf": lambda: batch_hf(args.path, args.repeats),
              "roofline": lambda: roofline(args.roofline_layers, args.roofline_new),
              "context": lambda: context_decode([int(x) for x in args.contexts.split(",")], 33, args.cpu_devices),
              "prefill-1m": lambda: prefill_1m(args.prefill_tokens),
              "mixed-continuous": lambda: mixed_ours(args.path, args.mixed_prompts, False, args.cpu_devices),
              "mixed-static": lambda: mixed_ours(args.path, args.mixed_prompts, True, args.cpu_devices),
              "mixed-hf": lambda: mixed_hf(args.path, args.mixed_prompts)}[args.child]
        print(json.dumps(fn()))
        return 0

    print(f"CPU cores: {os.cpu_count()}; results are medians after a warm-up run")
    if args.part in ("batch", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            child("build", args, "--path", tmp)
            ours = child("ours", args, "--path", tmp)
            one = child("ours-1", args, "--path", tmp) if args.cpu_devices > 1 else ours
            hf = child("hf", args, "--path", tmp)
        n = BATCH * NEW
        print(f"\n[batch] Scout-shaped, 16 experts top-1, fp32: batch {BATCH}, {PROMPT}-token prompts, {NEW} new tokens")
        print(f"{'':18s}{'median s':>10s}{'tokens/s':>10s}{'warm-up s':>11s}{'peak RSS MiB':>14s}")
        where = args.batch_mesh or f"x{args.cpu_devices}"
        runs = [(f"llama4_jax {where}", ours)] + ([("llama4_jax x1", one)] if one is not ours else [])
        for label, r in runs:
            print(f"{label:18s}{r['median_s']:10.2f}{n / r['median_s']:10.1f}{r['first_s']:11.1f}"
                  f"{r['peak_rss_mib']:14.0f}   (prefill {r['prefill_s']:.2f} s, decode {r['decode_s']:.2f} s, "
                  f"compile {r['compile_s']:.1f} s in warm-up)")
        print(f"{'transformers':18s}{hf['median_s']:10.2f}{n / hf['median_s']:10.1f}{hf['first_s']:11.1f}"
              f"{hf['peak_rss_mib']:14.0f}   (torch threads {hf['threads']})")
        rf = ours["roofline"]
        for label, r in runs:
            step = r["decode_s"] / r["decode_steps"]
            print(f"{label}: decode {step * 1e3:.2f} ms per step of {BATCH} rows = {step / rf['ideal_s']:.2f}x "
                  f"the step's roofline of {rf['ideal_s'] * 1e3:.2f} ms ({rf['ideal_bytes'] / 1e6:.1f} MB: weights "
                  f"shared by the rows, the distinct experts they chose, the occupied cache; at {rf['read_gbs']:.1f} "
                  f"GB/s read by {rf['threads']} threads)")
        need = (hf["median_s"] / 5 - ours["median_s"] + ours["decode_s"]) / ours["decode_steps"]
        if rows_split:  # as the roofline's lanes read
            print(f"read as {args.cpu_devices} data-parallel devices read it (each the shared weights and its rows' "
                  f"experts): {rf['lanes_bytes'] / 1e6:.1f} MB, {rf['lanes_s'] * 1e3:.2f} ms at that bandwidth, "
                  f"{rf['lanes_matvec_s'] * 1e3:.2f} ms at the {rf['matvec_gbs']:.1f} GB/s the devices' "
                  f"matrix-vector products of {BATCH // args.cpu_devices} rows read together (each from its own "
                  f"64 MiB matrix, all at once)")
        print(f"5x transformers needs {need * 1e3:.2f} ms per step (prefill and the rest as measured)")
        same = sum(a == b for a, b in zip(ours["tokens"], hf["tokens"]))
        print(f"speed-up: {hf['median_s'] / ours['median_s']:.2f}x on {where} "
              f"(target >= 5x), {hf['median_s'] / one['median_s']:.2f}x on one; identical greedy rows: {same}/{BATCH} "
              f"(one device: {sum(a == b for a, b in zip(one['tokens'], hf['tokens']))}/{BATCH})")
    if args.part in ("roofline", "all"):
        r = child("roofline", args)
        print(f"\n[roofline] dense {r['params'] / 1e6:.0f}M parameters, fp32, batch 1 decode")
        print(f"weights read per token {r['bytes_per_token'] / 1e9:.3f} GB, step {r['step_s'] * 1e3:.1f} ms "
              f"-> {r['achieved_gbs']:.2f} GB/s; numpy copy bandwidth (read + write) {r['copy_gbs']:.2f} GB/s; "
              f"fraction {r['fraction']:.0%} (target >= 60%); peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"weight-sized copies/transposes in the compiled decode step: {len(r['weight_copies'])}")
        for line in r["weight_copies"][:10]:
            print("   ", line)
    if args.part in ("context", "all"):
        r = child("context", args)
        print(f"\n[context] Scout-shaped (16 experts top-1), fp32, batch-1 decode after long prompts; active "
              f"weights {r['weights_bytes'] / 1e6:.1f} MB per token; read bandwidth {r['read_gbs']:.1f} GB/s "
              f"({r['threads']} threads); XLA's one-row products by distinct {r['matvec_kib']} KiB "
              f"matrices on one device read {r['matvec_gbs']:.1f} GB/s (the 'matvec ms' column: the same "
              f"bytes at that rate)")
        print(f"{'context':>9s}{'cache MB':>10s}{'roofline ms':>13s}{'matvec ms':>11s}" + "".join(
            f"{f'ms/token x{d}':>15s}{'x roofline':>12s}{'prefill s':>11s}" for d in r["devices"]))
        for row in r["rows"]:
            print(f"{row['context']:9d}{row['cache_bytes'] / 1e6:10.1f}{row['roofline_s'] * 1e3:13.2f}"
                  f"{row['matvec_s'] * 1e3:11.2f}" + "".join(
                f"{row[f'step_s_{d}'] * 1e3:15.2f}{row[f'step_s_{d}'] / row['roofline_s']:12.2f}"
                f"{row[f'prefill_s_{d}']:11.1f}" for d in r["devices"]))
        print("x1: one device; xN: a seq=N mesh of CPU devices, each reading its share of the cache slots "
              "(--cpu-devices N)")
        print("targets: <= 1.5x the roofline at 64K; >= 70% of it (<= 1.43x) after 100 tokens")
    if args.part in ("mixed", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            child("build", args, "--path", tmp)
            runs = {k: child(f"mixed-{k}", args, "--path", tmp) for k in ("continuous", "static", "hf")}
        rate = {k: r["generated"] / r["wall_s"] for k, r in runs.items()}
        print(f"\n[mixed] {args.mixed_prompts} prompts of 16..2048 tokens, 8..256 new tokens "
              f"({runs['hf']['generated']} in all), batch 8, Scout-shaped fp32, greedy; ours on {args.cpu_devices} CPU "
              "device(s)")
        for k, label in (("continuous", "llama4_jax continuous"), ("static", "llama4_jax static"),
                         ("hf", "transformers")):
            r = runs[k]
            extra = (f"prefill {r['prefill_s']:.1f} s, decode {r['decode_s']:.1f} s ({r['decode_steps']} steps), "
                     f"compile {r['compile_s']:.1f} s; {r['compilations']} executables (warm-up included)"
                     if "compile_s" in r
                     else f"torch threads {r['threads']}")
            print(f"{label:24s}{r['wall_s']:9.1f} s{rate[k]:9.1f} tok/s   peak RSS {r['peak_rss_mib']:.0f} MiB; {extra}")
        print(f"continuous / static {rate['continuous'] / rate['static']:.2f}x (target >= 2x); continuous / "
              f"transformers {rate['continuous'] / rate['hf']:.2f}x (target >= 8x)")
        print(mixed_parts(runs["continuous"], runs["static"]))
        # The warm-up covers only the first prompts' shapes, so the timed runs still compile
        # some (prompt bucket, rows) shapes; a long offline run compiles each one that pays
        # off once (`scheduler._prompt_length`).
        warm = {k: r["generated"] / (r["wall_s"] - r.get("compile_s", 0.0)) for k, r in runs.items()}
        print(f"without the compilation in the timed runs: continuous {warm['continuous']:.1f} tok/s, static "
              f"{warm['static']:.1f}: {warm['continuous'] / warm['static']:.2f}x static, "
              f"{warm['continuous'] / warm['hf']:.2f}x transformers")
    if args.part in ("prefill-1m", "all"):
        r = child("prefill-1m", args)
        print(f"\n[prefill-1m] {r['tokens']:,}-token prompt, tiny model (4 layers, 1 global), 8192-token pieces: "
              f"prefill {r['prefill_s']:.1f} s ({r['tokens'] / r['prefill_s']:.0f} tok/s), compile "
              f"{r['compile_s']:.1f} s, wall {r['wall_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(KV cache {r['cache_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
