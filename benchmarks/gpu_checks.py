"""Sections 1-4 of `gpu_validate.py`: the device's peak rates, parity against
transformers on the tiny Scout-like checkpoint, every MoE implementation against
`dense`, every attention backend against `xla` at long context."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from gpu_common import (
    agreement, attention_fns, err, free_torch, get_torch, have_torch, hf_generate, hf_logits, jax_sync,
    median_time, moe_fns, moe_fns_names, moe_inputs, ours_generate, sci, Sizes, torch_sync, tree_err,
)
from gpu_report import Section, SectionTimeout


# --------------------------------------------------------------------------------------
# Section 1: environment and peak rates
# --------------------------------------------------------------------------------------


def section_env(s: Section, ctx: dict) -> None:
    import importlib.metadata as md
    import platform

    import jax
    import jax.numpy as jnp

    sz: Sizes = ctx["sizes"]
    dev = jax.devices()[0]
    s.line(f"- device: {dev.device_kind} (platform {dev.platform}, {jax.device_count()} device(s))")
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        ctx["device_bytes"] = int(stats["bytes_limit"])
        s.line(f"- JAX memory limit on the device: {stats['bytes_limit'] / 2**30:.1f} GiB")

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    plugins = [f"{p} {ver(p)}" for p in ("jax-cuda13-plugin", "jax-cuda12-plugin") if ver(p) != "-"]
    s.line(f"- python {platform.python_version()}, jax {jax.__version__}, jaxlib {ver('jaxlib')}"
           + (f", {', '.join(plugins)}" if plugins else "") + f", flax {ver('flax')}, numpy {np.__version__}")
    s.data.update(device=dev.device_kind, jax=jax.__version__, jaxlib=ver("jaxlib"))
    try:
        torch, tdev = get_torch()
        import transformers

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if tdev == "cuda" else "CPU"
        s.line(f"- torch {torch.__version__} ({cuda}), transformers {transformers.__version__}")
        s.data.update(torch=torch.__version__, transformers=transformers.__version__)
    except Exception as e:  # noqa: BLE001 (the JAX-only sections can still run)
        s.line(f"- torch/transformers unavailable: {type(e).__name__}: {e}")

    N = sz.matmul_n
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (N, N), jnp.bfloat16)
    b = jax.random.normal(k2, (N, N), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax_sync(mm(a, b))
    t = median_time(lambda: mm(a, b), jax_sync, 5, inner=10)
    tflops = 2 * N**3 / t / 1e12
    ctx["peak_tflops"] = tflops
    s.line(f"- bf16 matmul, JAX: {tflops:.1f} TFLOP/s ([{N}, {N}] @ [{N}, {N}], {t * 1e3:.3f} ms per call; "
           "median of 5 samples of 10 back-to-back calls)")
    s.data["bf16_matmul_tflops"] = tflops

    n = sz.copy_bytes // 4
    x = jnp.ones((n,), jnp.float32)
    cp = jax.jit(lambda x: x * 2)
    jax_sync(cp(x))
    t = median_time(lambda: cp(x), jax_sync, 5, inner=10)
    gbs = 2 * sz.copy_bytes / t / 1e9
    ctx["copy_gbs"] = gbs
    s.line(f"- device copy: {gbs:.0f} GB/s ((read + write) of a {sz.copy_bytes / 2**30:.2f} GiB fp32 array "
           f"by `x * 2`, {t * 1e3:.3f} ms per call; same sampling)")
    s.data["copy_gbs"] = gbs

    if have_torch():
        torch, tdev = get_torch()
        g = torch.Generator(device=tdev).manual_seed(0)
        ta = torch.randn(N, N, device=tdev, generator=g).to(torch.bfloat16)
        tb = torch.randn(N, N, device=tdev, generator=g).to(torch.bfloat16)
        torch.matmul(ta, tb)
        t = median_time(lambda: torch.matmul(ta, tb), torch_sync, 5, inner=10)
        s.line(f"- bf16 matmul, torch: {2 * N**3 / t / 1e12:.1f} TFLOP/s (same shape and sampling)")
        s.data["torch_bf16_matmul_tflops"] = 2 * N**3 / t / 1e12


# --------------------------------------------------------------------------------------
# Section 2: parity on the tiny Scout-like checkpoint
# --------------------------------------------------------------------------------------


def section_parity(s: Section, ctx: dict) -> None:
    import copy

    import jax

    import llama4_jax as L
    from llama4_jax.config import Llama4Config
    from tests import hf_models

    torch, tdev = get_torch()
    sz: Sizes = ctx["sizes"]
    config = Llama4Config(text=hf_models.TEXT["scout_like"])
    hf32 = hf_models.make_hf(config, seed=0)
    path = os.path.join(ctx["tmp"], "scout_like")
    hf32.save_pretrained(path)
    hf32 = hf32.to(tdev)
    c32, p32 = L.load(path, dtype="float32")
    c16, p16 = L.load(path, dtype="bfloat16")
    ids = np.random.RandomState(0).randint(0, config.text.vocab_size, sz.parity_shape)
    s.line(f"- checkpoint: tests/hf_models.py `scout_like` (12 layers, hidden 60, 6 heads / 2 KV heads of 10, "
           f"5 experts top-1, chunk 8, floor_scale 6), ids {list(ids.shape)}; HF attention "
           f"`{hf32.config._attn_implementation}` on {tdev}")
    ref32 = hf_logits(hf32, ids)

    s.table("dtype", "attention", "moe", "max abs (ours - HF)", "rel")
    s.data["fp32"] = {}

    def fp32_row(attn, moe_impl):
        with jax.default_matmul_precision("highest"):
            out = L.forward(c32, p32, ids, attention_impl=attn, moe_impl=moe_impl)
        d, r = err(out, ref32)
        s.row("fp32", attn, moe_impl or "ragged (default)", sci(d), sci(r))
        s.data["fp32"][f"{attn}/{moe_impl}"] = d

    fp32_row("auto", None)
    s.check(4, "bf16")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ref16 = hf_logits(hf16, ids)
    ours16 = np.asarray(L.forward(c16, p16, ids))
    for label, a, b in (("ours bf16 vs HF fp32", ours16, ref32), ("HF bf16 vs HF fp32", ref16, ref32),
                        ("ours bf16 vs HF bf16", ours16, ref16)):
        d, r = err(a, b)
        s.row("bf16", "auto", label, sci(d), sci(r))
        s.data[label] = d

    prompts = np.random.RandomState(1).randint(3, config.text.vocab_size, sz.greedy_prompt)
    s.line()
    s.line(f"Greedy tokens, {prompts.shape[0]} prompts of {prompts.shape[1]} tokens + {sz.greedy_new} new "
           "(`llama4_jax.generate` vs HF `generate`, stop tokens off):")
    s.table("tokens", "agreement")
    toks = {}
    for label, (c, p, hf) in (("fp32", (c32, p32, hf32)), ("bf16", (c16, p16, hf16))):
        s.check(6, f"greedy {label}")
        prec = jax.default_matmul_precision("highest") if label == "fp32" else contextlib.nullcontext()
        with prec:
            toks["ours", label], _ = ours_generate(c, p, prompts, sz.greedy_new)
        toks["hf", label] = hf_generate(hf, prompts, sz.greedy_new)
        s.row(f"ours {label} vs HF {label}", agreement(toks["ours", label], toks["hf", label]))
        s.data[f"greedy_{label}"] = float((toks["ours", label] == toks["hf", label]).mean())
    for side in ("ours", "hf"):  # how far bf16 alone moves each side's greedy tokens
        s.row(f"{'ours' if side == 'ours' else 'HF'} bf16 vs HF fp32",
              agreement(toks[side, "bf16"], toks["hf", "fp32"]))
    del hf16
    free_torch()

    s.line()
    s.line("fp32 logits through the other backends (the Pallas kernel compiled on GPU):")
    s.table("dtype", "attention", "moe", "max abs (ours - HF)", "rel")
    for attn, moe_impl in (("xla", "dense"), ("pallas", None), ("blockwise", None)):
        s.check(4, f"fp32 {attn}/{moe_impl}")
        fp32_row(attn, moe_impl)

    s.check(10, "the real-constants case")
    long_constants(s, ctx)


def long_constants(s: Section, ctx: dict) -> None:
    """Chunk and floor_scale at their real value (8192) on a sequence past them, fp32."""
    import dataclasses as dc

    import jax

    import llama4_jax as L
    from llama4_jax.config import Llama4Config, RopeScaling
    from tests import hf_models

    _, tdev = get_torch()
    sz: Sizes = ctx["sizes"]
    C = sz.long_chunk
    text = dc.replace(hf_models.TEXT["real_constants"], attention_chunk_size=C, floor_scale=C,
                      rope_scaling=RopeScaling(16.0, 1.0, 1.0, C))
    config = Llama4Config(text=text)
    hf = hf_models.make_hf(config, seed=1)
    path = os.path.join(ctx["tmp"], "real_constants")
    hf.save_pretrained(path)
    hf = hf.to(tdev)
    c, p = L.load(path, dtype="float32")
    ids = np.random.RandomState(5).randint(0, text.vocab_size, (1, sz.long_len))
    ref = hf_logits(hf, ids)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(L.forward(c, p, ids))
    d_all, r_all = err(ours, ref)
    lo = C - min(192, C // 4)  # the last positions before the boundary and all after it
    d_tail, r_tail = err(ours[:, lo:], ref[:, lo:])
    s.line()
    s.line(f"Real constants (tests/hf_models.py `real_constants`: chunk {C}, floor_scale {C}, llama3 scaling), "
           f"{sz.long_len} tokens, fp32, attention `auto`: max abs {sci(d_all)} (rel {sci(r_all)}); "
           f"tokens {lo}..{sz.long_len - 1}: {sci(d_tail)} (rel {sci(r_tail)}).")
    s.data["real_constants"] = d_all


# --------------------------------------------------------------------------------------
# Section 3: MoE implementations
# --------------------------------------------------------------------------------------


def section_moe(s: Section, ctx: dict) -> None:
    import jax
    import jax.numpy as jnp

    from llama4_jax import sharding
    from llama4_jax.model import moe

    sz: Sizes = ctx["sizes"]
    E, D, F = sz.moe_dims
    impls = [n for n in moe_fns_names() if n != "dense"]
    s.line(f"- E={E} experts, D={D}, F={F}, fp32 at matmul precision `highest`; `ragged` runs "
           f"`{moe.ragged_strategy(1 << 20, E)}` for prefill sizes on this backend "
           f"(`{moe.ragged_strategy(1, E)}` for one row)")
    s.table("tokens x top-k", "impl", "forward max abs diff vs dense", "gradient max abs diff (rel)")
    dense = moe_fns("dense")[1]
    for T, k in sz.moe_cases:
        s.check(3, f"T={T} k={k}")
        with jax.default_matmul_precision("highest"):
            h, w, idx, score = moe_inputs(T, k, E, D, F, jnp.float32, seed=T)
            ct = jax.random.normal(jax.random.key(7), (T, D))
            ref_y, ref_g = dense(h, w, idx, score, ct)
            for name in impls:
                if name == "rowwise" and T * k > 2 * E:
                    s.row(f"{T} x {k}", name, "n/a (unrolls one matmul chain per row; used for T*k <= E)", "")
                    continue
                if name == "ep":
                    n = next((m for m in range(min(jax.device_count(), E), 1, -1) if E % m == 0), 1)
                    if n < 2:
                        s.row(f"{T} x {k}", name, f"n/a: needs an expert mesh axis of >= 2 devices dividing "
                              f"{E} experts ({jax.device_count()} device visible)", "")
                        continue
                    cm = sharding.activate(sharding.make_mesh(f"expert={n}", devices=jax.devices()[:n]))
                else:
                    cm = contextlib.nullcontext()
                with cm:
                    y, gr = moe_fns(name)[1](h, w, idx, score, ct)
                dy, _ = err(y, ref_y)
                dg, rg = tree_err(gr, ref_g)
                s.row(f"{T} x {k}", name, sci(dy), f"{sci(dg)} ({sci(rg)})")
                s.data[f"{name}_T{T}"] = {"fwd": dy, "grad": dg}

    s.check(6, "timing")
    T, D, F, E = sz.moe_time
    s.line()
    s.line(f"Timing, bf16, T={T} tokens, D={D}, F={F}, E={E}, top-1 (median of {sz.repeats} after one call; "
           "fwd+bwd is the gradient w.r.t. input, weights and scores):")
    s.table("impl", "forward ms", "forward+backward ms")
    h, w, idx, score = moe_inputs(T, 1, E, D, F, jnp.bfloat16, seed=1)
    ct = jax.random.normal(jax.random.key(8), (T, D))
    for name in ("dense", "ragged", "ragged_dot", "blocked"):
        s.check(3, f"timing {name}")
        f, g = moe_fns(name)
        jax_sync(f(h, w, idx, score))
        tf = median_time(lambda: f(h, w, idx, score), jax_sync, sz.repeats)
        jax_sync(g(h, w, idx, score, ct))
        tg = median_time(lambda: g(h, w, idx, score, ct), jax_sync, sz.repeats)
        s.row(name, f"{tf * 1e3:.2f}", f"{tg * 1e3:.2f}")
        s.data[f"time_{name}"] = {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tg * 1e3}


# --------------------------------------------------------------------------------------
# Section 4: attention backends at long context
# --------------------------------------------------------------------------------------


def _attn_heads(T: int, device_bytes: int | None) -> tuple[int, int]:
    """(q heads, KV heads): 4/2 unless the `xla` reference's gradient (about six fp32
    [H, T, T] arrays live at once: logits, probabilities and their cotangents) would
    exceed 60% of the device memory; then 2/1."""
    if device_bytes and 6 * 4 * 4 * T * T > 0.6 * device_bytes:
        return 2, 1
    return 4, 2


def attention_gqa(s: Section, ctx: dict) -> None:
    """The Pallas kernel at Scout's head grouping (G = 5 query heads per KV head), bf16:
    a prefill forward and a decode step against a full cache, next to xla, blockwise
    (and cuDNN for the prefill), each against xla in fp32 at precision highest."""
    import jax
    import jax.numpy as jnp

    from llama4_jax.kernels import pallas_flash

    sz: Sizes = ctx["sizes"]
    on_gpu = jax.default_backend() == "gpu"
    (H, K), d, C, T, (Bd, S) = sz.gqa_heads, sz.head_dim, sz.attn_chunk, sz.gqa_prefill, sz.gqa_decode
    G = H // K
    bq_p, _, rows_p = pallas_flash.block_sizes(T, T, H, K, 2)
    s.line(f"- Scout's head grouping: {H} query heads on {K} KV heads of {d} (G = {G}), bf16 inputs. The `pallas` "
           f"kernel runs one program per (row, KV head, query block) with the rows of all {G} heads of the block "
           f"stacked ({bq_p} positions x {G} heads in {rows_p} rows at this prefill, {G} of 16 rows for a decode "
           "token), so it reads each K/V block once per query block, not once per query head. Error: max |impl - "
           "xla fp32 at precision highest| (rel = / max |xla|). Times: forward only, median of 3 after the checked "
           "call (decode: samples of 10 back-to-back calls). K/V GB/s: bytes of K and V / time (every decode step "
           "reads them all; roofline: the copy rate of section 1, "
           + (f"{ctx['copy_gbs']:.0f} GB/s)." if "copy_gbs" in ctx else "not measured in this run)."))
    s.table("case", "impl", "fwd err (rel)", "fwd ms", "K/V GB/s")
    keys = jax.random.split(jax.random.key(40), 6)
    cases = (
        (f"prefill 1 x {T}, chunk {C}", C, 1, T, T, 1,
         ["xla", "blockwise", "pallas"] + (["cudnn"] if on_gpu else [])),
        (f"decode {Bd} x 1 against {S} slots, global", None, Bd, 1, S, 10, ["xla", "blockwise", "pallas"]),
    )
    for name, chunk, B, Tq, Sk, inner, impls in cases:
        q = jax.random.normal(keys[0], (B, Tq, H, d), jnp.float32)
        k = jax.random.normal(keys[1], (B, Sk, K, d), jnp.float32)
        v = jax.random.normal(keys[2], (B, Sk, K, d), jnp.float32)
        qp = jnp.broadcast_to(jnp.arange(Sk - Tq, Sk, dtype=jnp.int32), (B, Tq))
        kp = jnp.broadcast_to(jnp.arange(Sk, dtype=jnp.int32), (B, Sk))
        args16 = [x.astype(jnp.bfloat16) for x in (q, k, v)] + [qp, kp]
        s.check(5, f"GQA {name} xla fp32")
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(jax_sync(attention_fns("xla", chunk)[0](*[x.astype(jnp.float32) for x in args16[:3]],
                                                                       qp, kp)), np.float32)
        kv_bytes = 2 * B * Sk * K * d * 2
        for impl in impls:
            s.check(5, f"GQA {name} {impl}")
            try:
                fwd = attention_fns(impl, chunk)[0]
                out = jax_sync(fwd(*args16))
                t = median_time(lambda: fwd(*args16), jax_sync, 3, inner=inner)
            except SectionTimeout:
                raise
            except Exception as e:  # noqa: BLE001 (one backend failing must not hide the others)
                s.row(name, impl, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                      "", "")
                s.data[f"gqa_{name}_{impl}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            ef, rf = err(out, ref)
            s.row(name, impl, f"{sci(ef)} ({sci(rf)})", f"{t * 1e3:.3f}", f"{kv_bytes / t / 1e9:.3g}")
            s.data[f"gqa_{name}_{impl}"] = {"fwd_err": ef, "fwd_ms": t * 1e3, "kv_gbs": kv_bytes / t / 1e9}
            del out
        del ref


def section_attention(s: Section, ctx: dict) -> None:
    import jax
    import jax.numpy as jnp

    attention_gqa(s, ctx)
    sz: Sizes = ctx["sizes"]
    on_gpu = jax.default_backend() == "gpu"
    d = sz.head_dim
    C = sz.attn_chunk
    s.line(f"- batch 1, head dim {d}, chunk {C}, positions 0..T-1; the chunked mask is the RoPE layers', the "
           "global (causal) one the NoPE layers'. Errors: max |impl - xla fp32| (rel = / max |xla|) of the "
           "output and of the gradients w.r.t. q, k, v of sum(out * ct), ct random. Times: median of 3 after the "
           "checked call (fewer samples when they would take over 3 s).")
    s.line(f"- `pallas` runs {'compiled (Triton)' if on_gpu else 'in interpret mode (no GPU)'}; `cudnn` is "
           "cuDNN flash attention (jax.nn.dot_product_attention; `auto` on GPU in bf16), bf16/fp16 only, "
           + ("run on this GPU" if on_gpu else "GPU only: not run here"))
    s.table("T", "heads", "mask", "dtype", "impl", "fwd err (rel)", "grad err (rel)", "fwd ms", "fwd+bwd ms")
    for T in sz.attn_lengths:
        H, K = _attn_heads(T, ctx.get("device_bytes"))
        ks = jax.random.split(jax.random.key(T), 4)
        q = jax.random.normal(ks[0], (1, T, H, d), jnp.float32)
        k = jax.random.normal(ks[1], (1, T, K, d), jnp.float32)
        v = jax.random.normal(ks[2], (1, T, K, d), jnp.float32)
        ct = jax.random.normal(ks[3], (1, T, H, d), jnp.float32)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        for mask, chunk in (("chunked", C), ("global", None)):
            ref = None
            for dtype in ("fp32", "bf16"):
                dt = jnp.float32 if dtype == "fp32" else jnp.bfloat16
                args = [x.astype(dt) for x in (q, k, v)] + [pos, pos]
                impls = ["xla", "blockwise", "pallas"] + (["cudnn"] if dtype == "bf16" and on_gpu else [])
                for impl in impls:
                    s.check(5, f"T={T} {mask} {dtype} {impl}")
                    prec = jax.default_matmul_precision("highest") if dtype == "fp32" else contextlib.nullcontext()
                    try:
                        with prec:
                            fwd, grad = attention_fns(impl, chunk)
                            out, gr = jax_sync(grad(*args, ct))
                            jax_sync(fwd(*args))
                            tf = median_time(lambda: fwd(*args), jax_sync, 3)
                            tg = median_time(lambda: grad(*args, ct), jax_sync, 3)
                    except SectionTimeout:
                        raise
                    except Exception as e:  # noqa: BLE001 (one backend failing must not hide the others)
                        s.row(T, f"{H}/{K}", mask, dtype, impl, f"failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}", "", "", "")
                        s.data[f"T{T}_{mask}_{dtype}_{impl}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                        continue
                    if impl == "xla" and dtype == "fp32":  # the reference for every other row
                        ref = (np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in gr])
                    if ref is None:
                        ef = eg = float("nan")
                        errs = ("n/a: the xla fp32 reference failed", "")
                    else:
                        (ef, rf), (eg, rg) = err(out, ref[0]), tree_err(gr, ref[1])
                        errs = (f"{sci(ef)} ({sci(rf)})", f"{sci(eg)} ({sci(rg)})")
                    s.row(T, f"{H}/{K}", mask, dtype, impl, *errs, f"{tf * 1e3:.2f}", f"{tg * 1e3:.2f}")
                    s.data[f"T{T}_{mask}_{dtype}_{impl}"] = {"fwd_err": ef, "grad_err": eg, "fwd_ms": tf * 1e3,
                                                            "fwd_bwd_ms": tg * 1e3}
                    del out, gr
            del ref
