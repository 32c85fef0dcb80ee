"""Sections 5 and 6 of `gpu_validate.py`: the Scout-shaped ~1B model's prefill and decode
throughput against transformers on the same GPU, and its parity in fp32 and bf16."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from gpu_common import (
    active_matmul_params, agreement, err, free_torch, get_torch, hf_generate, hf_logits, hf_text_config,
    jax_sync, median_time, ours_generate, prefill_flops, sci, scout_shaped, Sizes, torch_sync,
)
from gpu_report import Section


# --------------------------------------------------------------------------------------
# Sections 5 and 6: the Scout-shaped ~1B model against transformers
# --------------------------------------------------------------------------------------


def _randomize_(model, seed: int) -> None:
    """Random weights on the model's device (normal / sqrt(fan_in), norms near 1),
    rounded to bf16-representable values so the fp32 and bf16 models are the same."""
    torch, _ = get_torch()
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                x = 1.0 + 0.2 * torch.randn(p.shape, generator=g, device=dev)
            else:
                fan_in = p.shape[-2] if "experts" in name else p.shape[-1]
                x = torch.randn(p.shape, generator=g, device=dev) / math.sqrt(fan_in)
            p.copy_(x.to(torch.bfloat16).float())


def big_model(s: Section, ctx: dict) -> dict:
    """The Scout-shaped model of sections 5-6, built once: HF fp32 and bf16 on the
    torch device, the bf16 checkpoint written with save_pretrained, ours loaded in bf16."""
    if "big" in ctx:
        return ctx["big"]
    import copy

    import jax
    import transformers

    import llama4_jax as L

    torch, tdev = get_torch()
    sz: Sizes = ctx["sizes"]
    config = scout_shaped(sz)
    t0 = time.perf_counter()
    with torch.device(tdev):
        hf32 = transformers.Llama4ForCausalLM(hf_text_config(config))
    _randomize_(hf32, 0)
    hf32.eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    path = os.path.join(ctx["tmp"], "scout_shaped")
    hf16.save_pretrained(path)
    c, p = L.load(path, dtype="bfloat16")
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(p))
    t = config.text
    s.line(f"- model: Scout-shaped, {n / 1e6:.1f} M parameters (hidden {t.hidden_size}, {t.num_hidden_layers} "
           f"layers, {t.num_attention_heads} heads / {t.num_key_value_heads} KV heads of {t.head_dim}, "
           f"{t.num_local_experts} experts of {t.intermediate_size} top-1 + shared expert, vocab {t.vocab_size}); "
           f"{active_matmul_params(t) / 1e6:.1f} M active matmul parameters per token; built, saved and loaded "
           f"in {time.perf_counter() - t0:.1f} s; HF attention `{hf16.config._attn_implementation}`")
    ctx["big"] = {"config": config, "params": p, "hf32": hf32, "hf16": hf16, "path": path, "n_params": n}
    return ctx["big"]


def section_throughput(s: Section, ctx: dict) -> None:
    import jax.numpy as jnp

    import llama4_jax as L

    torch, _ = get_torch()
    sz: Sizes = ctx["sizes"]
    m = big_model(s, ctx)
    config, params, hf16 = m["config"], m["params"], m["hf16"]
    t = config.text
    peak = ctx.get("peak_tflops")
    bw = ctx.get("copy_gbs")

    # Prefill.
    B, T = sz.prefill
    ids = np.random.default_rng(0).integers(3, t.vocab_size, (B, T))
    flops = prefill_flops(t, B, T)
    s.line(f"- prefill: {B} x {T} tokens, full logits, bf16; {flops / 1e12:.2f} TFLOP per call (model FLOPs); "
           f"median of {sz.repeats} after one call; MFU against the measured bf16 matmul rate "
           + (f"({peak:.0f} TFLOP/s)" if peak else "(not measured: section 1 did not finish)"))
    s.table("prefill", "ms", "tokens/s", "MFU")
    jids = jnp.asarray(ids, jnp.int32)
    mfu = lambda sec: f"{flops / sec / 1e12 / peak:.1%}" if peak else "n/a"  # noqa: E731
    ours_t = {}

    def prefill_ours(impl):
        fwd = lambda: L.forward(config, params, jids, attention_impl=impl)  # noqa: E731
        logits = jax_sync(fwd())
        if impl == "auto":
            ctx["big_logits16_row0"] = np.asarray(logits[0], np.float32)
        del logits
        sec = ours_t[impl] = median_time(fwd, jax_sync, sz.repeats)
        s.row(f"ours, attention `{impl}`", f"{sec * 1e3:.1f}", f"{B * T / sec:,.0f}", mfu(sec))
        s.data[f"prefill_ours_{impl}_s"] = sec

    prefill_ours("auto")
    s.check(4, "prefill HF")
    tid = torch.as_tensor(ids, device=next(hf16.parameters()).device)

    def hf_call():
        with torch.inference_mode():
            return hf16(input_ids=tid, use_cache=False).logits

    ctx["big_hf16_row0"] = hf_call()[0].float().cpu().numpy()
    hsec = median_time(hf_call, torch_sync, sz.repeats)
    s.row("HF (sdpa, dense experts)", f"{hsec * 1e3:.1f}", f"{B * T / hsec:,.0f}", mfu(hsec))
    s.data["prefill_hf_s"] = hsec
    free_torch()
    s.line()
    s.line(f"Prefill ratio ours (`auto`) / HF, tokens/s: {hsec / ours_t['auto']:.2f}x.")

    # Batch-1 decode and the roofline.
    s.check(10, "batch-1 decode")
    P, N = sz.decode_prompt, sz.decode_new
    prompts = np.random.default_rng(1).integers(3, t.vocab_size, (1, P))
    ours_generate(config, params, prompts, N)  # compiles prefill and decode
    runs = [ours_generate(config, params, prompts, N)[1] for _ in range(3)]
    step = float(np.median([st.decode_s / (st.generated_tokens - 1) for st in runs]))
    item = 2  # bf16
    w_active = active_matmul_params(t) * item + t.hidden_size * item  # + one embedding row
    n_all = m["n_params"] - t.vocab_size * t.hidden_size + t.hidden_size  # every weight but the embedding table
    ctx_mean = P + N / 2
    kv = sum(2 * t.num_key_value_heads * t.head_dim * item * (min(ctx_mean, t.attention_chunk_size) if f.is_chunked
                                                              else ctx_mean) for f in t.layer_flags)
    s.line()
    s.line(f"Batch-1 decode: prompt {P}, {N} new tokens, greedy, bf16. Bytes per token: active weights "
           f"{w_active / 1e6:.1f} MB + KV cache at the mean context {kv / 1e6:.2f} MB (all experts: "
           f"{n_all * item / 1e6:.1f} MB). Roofline = bytes / measured copy rate"
           + (f" ({bw:.0f} GB/s)." if bw else " (not measured)."))
    s.table("batch-1 decode", "ms/token", "roofline ms (active / all experts)", "fraction of roofline (active)")
    roof = (w_active + kv) / (bw * 1e9) if bw else None
    roof_all = (n_all * item + kv) / (bw * 1e9) if bw else None
    s.row("ours (`generate`, median of 3)", f"{step * 1e3:.3f}",
          f"{roof * 1e3:.3f} / {roof_all * 1e3:.3f}" if roof else "n/a", f"{roof / step:.1%}" if roof else "n/a")
    s.data["decode_b1_ours_ms"] = step * 1e3
    s.check(6, "batch-1 decode HF")
    hf_step = _hf_decode_step(hf16, prompts, N)
    s.row("HF (`generate`, (t(N) - t(1)) / (N - 1), median of 2)", f"{hf_step * 1e3:.3f}", "",
          f"{roof / hf_step:.1%}" if roof else "n/a")
    s.data["decode_b1_hf_ms"] = hf_step * 1e3
    s.line()
    s.line(f"Batch-1 decode ratio HF ms / ours ms: {hf_step / step:.2f}x.")

    # Batch-64 decode.
    s.check(12, "batch decode")
    Bb = sz.big_batch
    prompts = np.random.default_rng(2).integers(3, t.vocab_size, (Bb, P))
    ours_generate(config, params, prompts, N)
    t0 = time.perf_counter()
    toks, st = ours_generate(config, params, prompts, N)
    wall = time.perf_counter() - t0
    ours_tps = (st.generated_tokens - Bb) / st.decode_s
    s.line()
    s.line(f"Batch-{Bb} decode: {Bb} prompts of {P} tokens, {N} new tokens each, greedy, bf16. Decode tokens/s = "
           "tokens made by decode steps / their time (ours: GenerationStats; HF: the N and 1 new-token runs' "
           "difference); end to end = all new tokens / wall time of the call, prefill included.")
    s.table(f"batch-{Bb} decode", "decode tokens/s", "end-to-end tokens/s")
    s.row("ours", f"{ours_tps:,.0f}", f"{Bb * N / wall:,.0f}")
    s.data["decode_b64_ours_tps"] = ours_tps
    s.check(6, "batch decode HF")
    hf_step, hf_wall, hf_toks = _hf_decode_step(hf16, prompts, N, return_tokens=True)
    s.row("HF", f"{Bb / hf_step:,.0f}", f"{Bb * N / hf_wall:,.0f}")
    s.data["decode_b64_hf_tps"] = Bb / hf_step
    s.line()
    s.line(f"Batch-{Bb} decode ratio ours/HF (tokens/s): {ours_tps * hf_step / Bb:.2f}x. Greedy agreement (bf16, "
           f"random weights: near-ties can flip): {agreement(toks, hf_toks)}.")
    s.data["greedy_b64_agreement"] = float((toks == hf_toks).mean())
    ctx["big_greedy"] = agreement(toks, hf_toks)

    # The prefill through the other attention backends (`auto` resolves by `kernels.default_attention_impl`).
    s.line()
    s.line(f"Prefill through the other attention backends ({B} x {T}, as above):")
    s.table("prefill", "ms", "tokens/s", "MFU")
    for impl in ("xla", "pallas"):
        s.check(8, f"prefill {impl}")
        prefill_ours(impl)
    best = min(ours_t, key=ours_t.get)
    s.line()
    s.line(f"Best prefill: `{best}`, {hsec / ours_t[best]:.2f}x HF.")


def _hf_decode_step(model, prompts: np.ndarray, new: int, return_tokens: bool = False):
    """HF seconds per decode step: (t(new) - t(1)) / (new - 1), medians of 2 after a warm-up."""
    hf_generate(model, prompts, new)
    t_n, t_1, toks = [], [], None
    for _ in range(2):
        t0 = time.perf_counter()
        toks = hf_generate(model, prompts, new)
        t_n.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_generate(model, prompts, 1)
        t_1.append(time.perf_counter() - t0)
    step = (float(np.median(t_n)) - float(np.median(t_1))) / (new - 1)
    return (step, float(np.median(t_n)), toks) if return_tokens else step


def section_parity_1b(s: Section, ctx: dict) -> None:
    import jax

    import llama4_jax as L

    sz: Sizes = ctx["sizes"]
    m = big_model(s, ctx)
    config = m["config"]
    T = sz.prefill[1]
    ids = np.random.default_rng(0).integers(3, config.text.vocab_size, sz.prefill)[:1]  # row 0 of section 5's batch
    s.line(f"- the {m['n_params'] / 1e6:.1f} M-parameter Scout-shaped model of section 5, ids [1, {T}] (row 0 of its "
           "prefill batch); fp32 at JAX precision `highest`, torch TF32 off; weights bf16-representable, so "
           "the fp32 and bf16 checkpoints hold the same model")
    ref32 = hf_logits(m["hf32"], ids)
    free_torch()
    s.check(6, "ours fp32")
    c32, p32 = L.load(m["path"], dtype="float32")
    with jax.default_matmul_precision("highest"):
        ours32 = np.asarray(L.forward(c32, p32, ids))
    del p32
    s.table("comparison", "max abs", "rel")
    d, r = err(ours32, ref32)
    s.row("ours fp32 vs HF fp32", sci(d), sci(r))
    s.data["fp32"] = d
    if "big_logits16_row0" not in ctx:
        s.check(6, "bf16 logits")
        ctx["big_logits16_row0"] = np.asarray(L.forward(config, m["params"], ids)[0], np.float32)
        ctx["big_hf16_row0"] = hf_logits(m["hf16"], ids)[0]
    ours16, hf16 = ctx["big_logits16_row0"][None], ctx["big_hf16_row0"][None]
    for label, a, b in (("ours bf16 vs HF fp32", ours16, ref32), ("HF bf16 vs HF fp32", hf16, ref32),
                        ("ours bf16 vs HF bf16", ours16, hf16)):
        d, r = err(a, b)
        s.row(label, sci(d), sci(r))
        s.data[label] = d
    if "big_greedy" in ctx:
        s.line()
        s.line(f"Greedy agreement at batch {sz.big_batch} (bf16, section 5): {ctx['big_greedy']}.")
