"""Validate llama4_jax on a GPU against transformers, in one prepared command.

    PYTHONPATH=. python benchmarks/gpu_validate.py --budget-s 375 --out-dir $OUT   # on the GPU machine (301 s on an H200)
    python benchmarks/gpu_validate.py --lower-only    # any host (CI): GPU programs lower for cuda, TPU ones for tpu
    python benchmarks/gpu_validate.py --smoke         # any host: every section on tiny shapes (minutes on CPU)

The GPU run writes `benchmarks/results/gpu-<device>.md` (e.g. `gpu-h200.md`) and a
`.json` of the same numbers, and copies both to `--out-dir` when given. The files are
rewritten after every section and every line is printed as it is produced, so a run
that is cut short keeps everything it measured.

Sections, in order of value. Each has a time box (its share of `--budget-s`, plus what
earlier sections left unused); the box is checked between steps (a running compile is
never interrupted), a section past its box stops with what it has, a section that
raises is recorded (exception, message, short traceback) and the next one runs, and
sections that would start with too little budget left are recorded as skipped.

1. env: device, versions; bf16 matmul TFLOP/s (jitted [N, N] @ [N, N], N = 8192,
   2 N^3 flops per call; median of 5 samples of 10 back-to-back calls) and device copy
   GB/s (jitted `x * 2` of a 1 GiB fp32 array, (read + write) bytes / time, same
   sampling). These two rates are the peaks that MFU and the decode roofline use.
2. parity: the tiny odd-sized Scout-like checkpoint of the tests (12 layers, chunk 8,
   floor_scale 6, 61 tokens: 7 chunk boundaries), built by transformers,
   `save_pretrained`, loaded by `llama4_jax.load`; both run on the GPU. fp32 (JAX
   matmul precision `highest`, torch TF32 off): max |ours - HF| of the logits and that
   divided by max |HF| ("rel"). bf16: ours-bf16 and HF-bf16 each against HF-fp32, and
   against each other. Greedy tokens: `llama4_jax.generate` vs HF `generate` (stop
   tokens off), fp32 and bf16. Then fp32 logits through the other attention/MoE
   backends, and the real constants (chunk 8192, floor_scale 8192) on 8256 tokens.
3. moe: every MoE implementation (`moe.moe_impls()`: `ragged` is `ragged_dot` on GPU)
   against `dense` on random routed inputs, fp32 `highest`: forward max abs diff and
   the max abs diff of the gradients w.r.t. the input, the three expert weights and the
   router scores. `ep` needs an `expert` mesh axis of >= 2 devices. Then forward and
   forward+backward milliseconds in bf16 at a prefill-sized shape.
4. attention: first the Pallas kernel at Scout's head grouping (40 query heads on 8
   KV heads of 128, G = 5; its programs cover a query block of all G heads, so each K/V
   block is read once per query block), bf16 forward of a 1 x 8192 prefill (chunked
   mask) and of a decode step (32 rows x 1 token against 16384 cache slots), next to
   `xla`, `blockwise` and (prefill) cuDNN, against `xla` fp32: error, ms and K/V bytes
   per second (decode: against the copy rate of section 1). Then `xla`, `blockwise`,
   `pallas` (compiled, not interpreted, on GPU) and a candidate, cuDNN flash attention
   through `jax.nn.dot_product_attention` (chunked layers as causal attention over the
   sequence reshaped into chunks), at 16K and 32K
   tokens, chunk 8192, with the chunked (RoPE-layer) mask and the global (NoPE-layer)
   one, batch 1, 4 query heads on 2 KV heads of 128 (2 on 1 at 32K, where the `xla`
   reference's [H, T, T] fp32 arrays would not fit otherwise): forward output and the
   gradients w.r.t. q, k, v of sum(out * ct) against `xla` in fp32 (max abs diff,
   rel = that / max |xla|), then bf16 against the same fp32 `xla` result (with `xla`
   in bf16 as the yardstick); milliseconds of the forward and of forward+backward
   (median of 3, after the checked call).
5. throughput: a Scout-shaped random model (~1B parameters: hidden 2048, 16 heads / 4
   KV heads of 128, 16 experts of width 2048 top-1 plus the shared expert, 4 layers,
   vocabulary 32000), bf16, the same weights on both sides. Prefill tokens/s of a
   4 x 2048 forward (median of 5), ours vs HF, and MFU = model FLOPs / time /
   measured bf16 matmul rate (FLOPs: 2 x active matmul parameters per token, i.e.
   attention, router, shared expert, the top-k routed experts and the LM head, plus
   4 x heads x head_dim per visible query-key pair). Batch-1 decode ms/token (ours:
   `generate(..., return_stats=True)` decode seconds / decode steps; HF: (time of
   `generate` with N new tokens - time with 1) / (N - 1)) against the HBM roofline
   (bytes of active weights read per token plus the KV cache at the mean context,
   divided by the measured copy rate). Batch-64 decode tokens/s, same methods, and
   the greedy agreement of the two. Last, the prefill through the `xla` and `pallas`
   attention backends (`auto`: `kernels.default_attention_impl`; the recorded H200 run predates `xla` as the GPU default, when `auto` was `blockwise` past 1024 tokens).
6. parity_1b: the same ~1B model in fp32 (weights are bf16-representable, so both
   dtypes hold the same model) against HF fp32, and the bf16 logits of section 5
   against it.

`--lower-only` runs none of that: it lowers the main jitted programs of sections 3-5
(each MoE implementation and its gradient, `ep` on a 2-device CPU mesh; each
attention backend forward and gradient, and the Pallas kernel at Scout's head grouping
(prefill and decode); the model forward per attention and MoE
backend; the generate engine's prefill and decode steps at batch 1 and 4) for `cuda`
with `jax.export`, tracing them as the GPU would (`kernels.platform.tracing_for`:
Pallas compiled, `ragged` as `ragged_dot`, `ep` on `ragged_all_to_all`), then the TPU
paths for `tpu` (`kernels.platform.lower_for_tpu`: splash attention forward and
gradient, the `gmm` MoE, `ep` on `ragged_all_to_all` with `gmm`, the model forward
with `auto` attention), and prints one line per program; it exits non-zero if any
fails. cuDNN attention cannot be lowered without a GPU (jax checks for cuDNN while
tracing) and is reported as skipped; a TPU program is reported as skipped, with the
reason, only if this jax lacks the Pallas TPU ops or cannot lower Mosaic kernels
without a chip (jax 0.10.2 can). Lowering proves tracing and StableHLO; Mosaic's and
Triton's own compilation of the kernels happens only on the device.

Environment (set only when not already set): on GPU, XLA_PYTHON_CLIENT_PREALLOCATE=false
and XLA_PYTHON_CLIENT_MEM_FRACTION=0.8, so JAX and PyTorch share the device; for
`--lower-only`, JAX_PLATFORMS=cpu and 2 host devices.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

_T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GPU_COMMAND = "PYTHONPATH=. python benchmarks/gpu_validate.py --budget-s 375 --out-dir $OUT"
MIN_START_S = 8.0  # a section is skipped when less than this much budget is left


# --------------------------------------------------------------------------------------
# Sizes: the GPU run and the CPU smoke run share every code path, not the shapes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul_n: int = 8192
    copy_bytes: int = 1 << 30
    parity_shape: tuple = (2, 61)  # tiny Scout-like: crosses 7 chunk boundaries of 8
    greedy_prompt: tuple = (2, 29)
    greedy_new: int = 8
    long_chunk: int = 8192  # the "real constants" case: chunk and floor_scale
    long_len: int = 8256
    moe_dims: tuple = (9, 200, 136)  # E, D, F: odd, so a transposed weight cannot pass
    moe_cases: tuple = ((257, 2), (8, 1))  # (tokens, top-k): prefill-like and decode-like
    moe_time: tuple = (8192, 1024, 2048, 16)  # T, D, F, E for the bf16 timing
    attn_lengths: tuple = (16384, 32768)
    attn_chunk: int = 8192
    head_dim: int = 128
    gqa_heads: tuple = (40, 8)  # Scout's query / KV heads, for the Pallas kernel's GQA rows
    gqa_prefill: int = 8192  # tokens of the GQA prefill row (batch 1, chunked mask)
    gqa_decode: tuple = (32, 16384)  # rows x cache slots of the GQA decode row
    model: tuple = (("hidden_size", 2048), ("num_attention_heads", 16), ("num_key_value_heads", 4),
                    ("head_dim", 128), ("num_local_experts", 16), ("intermediate_size", 2048),
                    ("intermediate_size_mlp", 4096), ("num_hidden_layers", 4), ("vocab_size", 32000))
    prefill: tuple = (4, 2048)
    decode_prompt: int = 128
    decode_new: int = 64
    big_batch: int = 64
    repeats: int = 5


SMOKE = Sizes(
    matmul_n=512, copy_bytes=32 << 20, long_chunk=32, long_len=80, moe_dims=(9, 21, 13),
    moe_cases=((37, 2), (4, 1)), moe_time=(256, 64, 128, 8), attn_lengths=(128,), attn_chunk=64, head_dim=32,
    gqa_heads=(10, 2), gqa_prefill=128, gqa_decode=(2, 256),
    model=(("hidden_size", 64), ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 16),
           ("num_local_experts", 4), ("intermediate_size", 64), ("intermediate_size_mlp", 128),
           ("num_hidden_layers", 4), ("vocab_size", 512)),
    prefill=(2, 64), decode_prompt=16, decode_new=8, big_batch=4, repeats=2,
)


# --------------------------------------------------------------------------------------
# Report: sections, time boxes, incremental markdown
# --------------------------------------------------------------------------------------


class SectionTimeout(Exception):
    """A section ran past its time box (raised between its steps)."""


def _fmt_exc(e: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    body = "".join(tb[-frames:]) if len(tb) > frames else "".join(tb)
    return body[-3000:]


class Section:
    """One running section: its lines, numbers and time box."""

    def __init__(self, report: "Report", name: str, title: str, box_s: float):
        self.report, self.name, self.title, self.box_s = report, name, title, box_s
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.data: dict = {}
        self.status = "running"
        self.seconds = 0.0

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.report.write()

    def table(self, *columns: str) -> None:
        self.line()
        self.line("| " + " | ".join(columns) + " |")
        self.line("|" + "---|" * len(columns))

    def row(self, *cells) -> None:
        self.line("| " + " | ".join(str(c) for c in cells) + " |")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left in this section's box (and in the whole budget)."""
        return min(self.box_s - self.elapsed(), self.report.budget_left())

    def check(self, need_s: float = 0.0, what: str = "") -> None:
        """Stop the section (SectionTimeout) if fewer than need_s seconds are left."""
        if self.left() < need_s:
            why = ("budget spent" if self.report.budget_left() < need_s
                   else f"time box of {self.box_s:.0f} s reached")
            raise SectionTimeout(f"{why} after {self.elapsed():.1f} s" + (f" (before {what})" if what else ""))


class Report:
    """Sections in order; the markdown (and json) rewritten to every path after each line."""

    def __init__(self, title: str, header: list[str], paths: list[str], budget_s: float, t0: float = _T0):
        """budget_s: seconds from t0 (default: this module's import) to the end of the run."""
        self.title, self.header, self.paths, self.budget_s, self.t0 = title, header, paths, budget_s, t0
        self.sections: list[Section] = []
        self.data: dict = {}

    def budget_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *self.header, "", "| section | status | seconds |", "|---|---|---|"]
        for s in self.sections:
            out.append(f"| {s.name} | {s.status.replace('|', '/')} | {s.seconds:.1f} |")
        for i, s in enumerate(self.sections, 1):
            out += ["", f"## {i}. {s.title}", "", f"Status: {s.status}.", ""] + s.lines
        return "\n".join(out) + "\n"

    def write(self) -> None:
        text = self.markdown()
        data = {"sections": {s.name: {"status": s.status, "seconds": round(s.seconds, 2), **s.data}
                             for s in self.sections}, **self.data}
        for p in self.paths:
            os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            for path, body in ((p, text), (p[:-3] + ".json", json.dumps(data, indent=1, default=str))):
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(body)
                os.replace(tmp, path)

    def run(self, plan, ctx) -> None:
        """Run [(name, title, fn, share)] in order; fn(section, ctx). Shares of the budget
        not used by a section carry over to the next."""
        slack = 0.0
        for name, title, fn, share in plan:
            box = share * self.budget_s + slack
            s = Section(self, name, title, box)
            self.sections.append(s)
            if self.budget_left() < MIN_START_S:
                s.status = f"skipped: budget ({self.budget_left():.0f} s left)"
                print(f"\n== {name}: {s.status}", flush=True)
                self.write()
                continue
            print(f"\n== {name}: {title} (time box {box:.0f} s)", flush=True)
            self.write()
            try:
                fn(s, ctx)
                s.status = "ok"
            except SectionTimeout as e:
                s.status = f"stopped: {e}"
                s.line(f"- stopped: {e}")
            except Exception as e:  # noqa: BLE001 (recorded, then the next section runs)
                s.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                s.line("")
                s.line("```")
                for ln in _fmt_exc(e).rstrip().splitlines():
                    s.line(ln)
                s.line("```")
            s.seconds = s.elapsed()
            slack = max(0.0, box - s.seconds)
            _free_torch()
            self.write()


# --------------------------------------------------------------------------------------
# Helpers: timing, errors, torch
# --------------------------------------------------------------------------------------


def _jax_sync(x):
    import jax

    return jax.block_until_ready(x)


def _median_time(call, sync, repeats: int, inner: int = 1, max_s: float = 3.0) -> float:
    """Median over `repeats` samples of the seconds per call; a sample dispatches `inner`
    calls back to back and then waits for the last (so dispatch overlaps execution).
    Fewer samples (at least one) when they would take more than `max_s` in all."""
    ts = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if ts and time.perf_counter() - t_start + ts[-1] * inner > max_s:
            break
        t0 = time.perf_counter()
        r = None
        for _ in range(inner):
            r = call()
        sync(r)
        ts.append((time.perf_counter() - t0) / inner)
    return float(np.median(ts))


def _err(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|), in fp32."""
    a, b = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    d = float(np.max(np.abs(a - b)))
    return d, d / max(float(np.max(np.abs(b))), 1e-30)


def _tree_err(ours, ref) -> tuple[float, float]:
    """Max abs diff and max rel diff (per leaf: diff / max |ref leaf|) over two pytrees."""
    import jax

    pairs = [_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref))]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


def _e(x: float) -> str:
    return f"{x:.2e}"


_TORCH = {}


def _torch():
    """torch, configured once: TF32 off (fp32 means fp32), the device to use."""
    if not _TORCH:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        _TORCH["torch"] = torch
        _TORCH["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return _TORCH["torch"], _TORCH["device"]


def _torch_sync(_=None):
    torch, dev = _torch()
    if dev == "cuda":
        torch.cuda.synchronize()


def _free_torch():
    if _TORCH and _TORCH["device"] == "cuda":
        import gc

        gc.collect()
        _TORCH["torch"].cuda.empty_cache()


def _hf_logits(model, ids) -> np.ndarray:
    torch, _ = _torch()
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long, device=dev), use_cache=False)
    return out.logits.float().cpu().numpy()


def _hf_generate(model, prompts: np.ndarray, new: int) -> np.ndarray:
    """Greedy continuation [B, new] of equal-length prompts [B, T] (stop tokens cannot end a row early)."""
    torch, _ = _torch()
    dev = next(model.parameters()).device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, prompts.shape[1]:].cpu().numpy()


def _ours_generate(config, params, prompts: np.ndarray, new: int, **kw):
    """Greedy tokens [B, new] and GenerationStats of llama4_jax.generate (stop tokens off)."""
    import llama4_jax as L

    cfg = config.replace_text(eos_token_id=())
    outs, stats = L.generate(cfg, params, [list(map(int, r)) for r in prompts], max_new_tokens=new,
                             batch_size=len(prompts), return_stats=True, **kw)
    return np.asarray([o.token_ids for o in outs]), stats


def _agreement(ours: np.ndarray, ref: np.ndarray) -> str:
    eq = ours == ref
    rows = int(eq.all(axis=1).sum())
    first = [int(np.argmin(r)) for r in eq if not r.all()]
    where = f"; first mismatch at step {min(first)}" if first else ""
    return f"{int(eq.sum())}/{eq.size} tokens, {rows}/{len(eq)} rows identical{where}"


def _hf_text_config(config):
    import transformers

    from llama4_jax.config import to_hf

    d = to_hf(config)
    return transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})


def _slug(kind: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "unknown"


# --------------------------------------------------------------------------------------
# Shared model pieces (GPU run and lower-only)
# --------------------------------------------------------------------------------------


def scout_shaped(sizes: Sizes):
    """The Scout-shaped random model of sections 5 and 6: every layer MoE, top-1, the
    3:1 chunked-RoPE / global-NoPE pattern, qk norm, llama3 RoPE scaling 16/1/1."""
    from llama4_jax.config import Llama4Config, RopeScaling, TextConfig

    kw = dict(sizes.model)
    L = kw["num_hidden_layers"]
    return Llama4Config(text=TextConfig(
        **kw, num_experts_per_tok=1, moe_layers=tuple(range(L)), no_rope_layers=(1, 1, 1, 0) * (L // 4),
        attention_chunk_size=8192, floor_scale=8192, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192),
        max_position_embeddings=16384, bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ))


def active_matmul_params(t) -> int:
    """Matmul parameters one token passes through (attention, router, shared expert,
    top-k routed experts or the dense MLP, the LM head); norms and the embedding
    lookup are not matmuls."""
    D, H, K, d, F, Fm = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                         t.intermediate_size, t.intermediate_size_mlp)
    n = 0
    for f in t.layer_flags:
        n += 2 * D * H * d + 2 * D * K * d
        n += (D * t.num_local_experts + 3 * D * F * (1 + t.num_experts_per_tok)) if f.is_moe else 3 * D * Fm
    return n + D * t.vocab_size


def visible_pairs(T: int, chunk: int | None) -> int:
    """Query-key pairs a causal (chunked when chunk) mask lets through for T tokens."""
    if not chunk or chunk >= T:
        return T * (T + 1) // 2
    full, rest = divmod(T, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def prefill_flops(t, B: int, T: int) -> float:
    attn = sum(4 * t.num_attention_heads * t.head_dim * visible_pairs(T, t.attention_chunk_size if f.is_chunked
                                                                       else None) for f in t.layer_flags)
    return float(B * (2 * active_matmul_params(t) * T + attn))


def attention_fns(impl: str, chunk: int | None):
    """(forward, forward_and_gradient) jitted for an attention backend (or the 'cudnn'
    candidate): forward(q, k, v, qp, kp) -> out; forward_and_gradient(q, k, v, qp, kp, ct)
    -> (out, (dq, dk, dv)), the gradients of sum(out * ct) (one program: a forward and
    its backward, as in training)."""
    import jax

    from llama4_jax.model.attention import attend

    if impl == "cudnn":
        f = functools.partial(cudnn_attention, chunk_size=chunk)
    else:
        f = lambda q, k, v, qp, kp: attend(q, k, v, qp, kp, chunk_size=chunk, impl=impl)  # noqa: E731

    def fwd_grad(q, k, v, qp, kp, ct):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, qp, kp), q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(f), jax.jit(fwd_grad)


def cudnn_attention(q, k, v, q_pos, k_pos, *, chunk_size=None):
    """Candidate GPU path: cuDNN flash attention (`jax.nn.dot_product_attention`).

    Only for a batch whose positions are 0..T-1 in order (no padding, no cache), which
    is what this benchmark feeds: the global mask is plain causal, and the chunked mask
    is causal attention within each chunk, i.e. causal attention over the sequence
    reshaped to [B * T / C, C, ...]. Positions are not read (the caller guarantees them).
    """
    import jax

    B, T, H, d = q.shape
    if chunk_size and T > chunk_size:
        if T % chunk_size:
            raise ValueError(f"cudnn candidate: T={T} is not a multiple of the chunk {chunk_size}")
        r = lambda x: x.reshape(B * (T // chunk_size), chunk_size, *x.shape[2:])  # noqa: E731
        out = jax.nn.dot_product_attention(r(q), r(k), r(v), is_causal=True, implementation="cudnn")
        return out.reshape(B, T, H, d)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def moe_fns(name: str):
    """(forward, forward_and_gradient) jitted for an MoE implementation:
    forward(h, w, idx, score) -> out; forward_and_gradient(h, w, idx, score, ct) ->
    (out, (dh, dw, dscore)), the gradients of sum(out * ct)."""
    import jax

    from llama4_jax.model import moe

    fn = moe._MOE_IMPLS[name]

    def fwd_grad(h, w, idx, score, ct):
        out, vjp = jax.vjp(lambda h, w, score: fn(h, w, idx, score), h, w, score)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(fn), jax.jit(fwd_grad)


def moe_inputs(T: int, k: int, E: int, D: int, F: int, dtype, seed: int = 0):
    """Random expert weights (normal / sqrt(fan_in)), inputs h [T, D] and a real top-k
    routing of them through a random router."""
    import jax

    from llama4_jax.model import moe

    ks = jax.random.split(jax.random.key(seed), 5)
    w = {"gate": jax.random.normal(ks[0], (E, D, F)) / math.sqrt(D),
         "up": jax.random.normal(ks[1], (E, D, F)) / math.sqrt(D),
         "down": jax.random.normal(ks[2], (E, F, D)) / math.sqrt(F)}
    w = jax.tree_util.tree_map(lambda x: x.astype(dtype), w)
    h = jax.random.normal(ks[3], (T, D)).astype(dtype)
    _, idx, score = moe.route(h, (jax.random.normal(ks[4], (D, E)) / math.sqrt(D)).astype(dtype), k)
    return h, w, idx, score


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
        torch, tdev = _torch()
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
    _jax_sync(mm(a, b))
    t = _median_time(lambda: mm(a, b), _jax_sync, 5, inner=10)
    tflops = 2 * N**3 / t / 1e12
    ctx["peak_tflops"] = tflops
    s.line(f"- bf16 matmul, JAX: {tflops:.1f} TFLOP/s ([{N}, {N}] @ [{N}, {N}], {t * 1e3:.3f} ms per call; "
           "median of 5 samples of 10 back-to-back calls)")
    s.data["bf16_matmul_tflops"] = tflops

    n = sz.copy_bytes // 4
    x = jnp.ones((n,), jnp.float32)
    cp = jax.jit(lambda x: x * 2)
    _jax_sync(cp(x))
    t = _median_time(lambda: cp(x), _jax_sync, 5, inner=10)
    gbs = 2 * sz.copy_bytes / t / 1e9
    ctx["copy_gbs"] = gbs
    s.line(f"- device copy: {gbs:.0f} GB/s ((read + write) of a {sz.copy_bytes / 2**30:.2f} GiB fp32 array "
           f"by `x * 2`, {t * 1e3:.3f} ms per call; same sampling)")
    s.data["copy_gbs"] = gbs

    if "torch" in _TORCH:
        torch, tdev = _torch()
        g = torch.Generator(device=tdev).manual_seed(0)
        ta = torch.randn(N, N, device=tdev, generator=g).to(torch.bfloat16)
        tb = torch.randn(N, N, device=tdev, generator=g).to(torch.bfloat16)
        torch.matmul(ta, tb)
        t = _median_time(lambda: torch.matmul(ta, tb), _torch_sync, 5, inner=10)
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

    torch, tdev = _torch()
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
    ref32 = _hf_logits(hf32, ids)

    s.table("dtype", "attention", "moe", "max abs (ours - HF)", "rel")
    s.data["fp32"] = {}

    def fp32_row(attn, moe_impl):
        with jax.default_matmul_precision("highest"):
            out = L.forward(c32, p32, ids, attention_impl=attn, moe_impl=moe_impl)
        d, r = _err(out, ref32)
        s.row("fp32", attn, moe_impl or "ragged (default)", _e(d), _e(r))
        s.data["fp32"][f"{attn}/{moe_impl}"] = d

    fp32_row("auto", None)
    s.check(4, "bf16")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ref16 = _hf_logits(hf16, ids)
    ours16 = np.asarray(L.forward(c16, p16, ids))
    for label, a, b in (("ours bf16 vs HF fp32", ours16, ref32), ("HF bf16 vs HF fp32", ref16, ref32),
                        ("ours bf16 vs HF bf16", ours16, ref16)):
        d, r = _err(a, b)
        s.row("bf16", "auto", label, _e(d), _e(r))
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
            toks["ours", label], _ = _ours_generate(c, p, prompts, sz.greedy_new)
        toks["hf", label] = _hf_generate(hf, prompts, sz.greedy_new)
        s.row(f"ours {label} vs HF {label}", _agreement(toks["ours", label], toks["hf", label]))
        s.data[f"greedy_{label}"] = float((toks["ours", label] == toks["hf", label]).mean())
    for side in ("ours", "hf"):  # how far bf16 alone moves each side's greedy tokens
        s.row(f"{'ours' if side == 'ours' else 'HF'} bf16 vs HF fp32",
              _agreement(toks[side, "bf16"], toks["hf", "fp32"]))
    del hf16
    _free_torch()

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

    _, tdev = _torch()
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
    ref = _hf_logits(hf, ids)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(L.forward(c, p, ids))
    d_all, r_all = _err(ours, ref)
    lo = C - min(192, C // 4)  # the last positions before the boundary and all after it
    d_tail, r_tail = _err(ours[:, lo:], ref[:, lo:])
    s.line()
    s.line(f"Real constants (tests/hf_models.py `real_constants`: chunk {C}, floor_scale {C}, llama3 scaling), "
           f"{sz.long_len} tokens, fp32, attention `auto`: max abs {_e(d_all)} (rel {_e(r_all)}); "
           f"tokens {lo}..{sz.long_len - 1}: {_e(d_tail)} (rel {_e(r_tail)}).")
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
                dy, _ = _err(y, ref_y)
                dg, rg = _tree_err(gr, ref_g)
                s.row(f"{T} x {k}", name, _e(dy), f"{_e(dg)} ({_e(rg)})")
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
        _jax_sync(f(h, w, idx, score))
        tf = _median_time(lambda: f(h, w, idx, score), _jax_sync, sz.repeats)
        _jax_sync(g(h, w, idx, score, ct))
        tg = _median_time(lambda: g(h, w, idx, score, ct), _jax_sync, sz.repeats)
        s.row(name, f"{tf * 1e3:.2f}", f"{tg * 1e3:.2f}")
        s.data[f"time_{name}"] = {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tg * 1e3}


TPU_ONLY_MOE = ("gmm",)  # megablox: a Pallas TPU kernel (interpret mode anywhere else)


def moe_fns_names() -> tuple[str, ...]:
    """The MoE implementations a GPU run compares (all registered but the TPU-only ones)."""
    from llama4_jax.model import moe

    return tuple(n for n in moe.moe_impls() if n not in TPU_ONLY_MOE)


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
            ref = np.asarray(_jax_sync(attention_fns("xla", chunk)[0](*[x.astype(jnp.float32) for x in args16[:3]],
                                                                       qp, kp)), np.float32)
        kv_bytes = 2 * B * Sk * K * d * 2
        for impl in impls:
            s.check(5, f"GQA {name} {impl}")
            try:
                fwd = attention_fns(impl, chunk)[0]
                out = _jax_sync(fwd(*args16))
                t = _median_time(lambda: fwd(*args16), _jax_sync, 3, inner=inner)
            except SectionTimeout:
                raise
            except Exception as e:  # noqa: BLE001 (one backend failing must not hide the others)
                s.row(name, impl, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                      "", "")
                s.data[f"gqa_{name}_{impl}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            ef, rf = _err(out, ref)
            s.row(name, impl, f"{_e(ef)} ({_e(rf)})", f"{t * 1e3:.3f}", f"{kv_bytes / t / 1e9:.3g}")
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
           "the candidate jax.nn.dot_product_attention(implementation='cudnn'), bf16/fp16 only, "
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
                            out, gr = _jax_sync(grad(*args, ct))
                            _jax_sync(fwd(*args))
                            tf = _median_time(lambda: fwd(*args), _jax_sync, 3)
                            tg = _median_time(lambda: grad(*args, ct), _jax_sync, 3)
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
                        (ef, rf), (eg, rg) = _err(out, ref[0]), _tree_err(gr, ref[1])
                        errs = (f"{_e(ef)} ({_e(rf)})", f"{_e(eg)} ({_e(rg)})")
                    s.row(T, f"{H}/{K}", mask, dtype, impl, *errs, f"{tf * 1e3:.2f}", f"{tg * 1e3:.2f}")
                    s.data[f"T{T}_{mask}_{dtype}_{impl}"] = {"fwd_err": ef, "grad_err": eg, "fwd_ms": tf * 1e3,
                                                            "fwd_bwd_ms": tg * 1e3}
                    del out, gr
            del ref


# --------------------------------------------------------------------------------------
# Sections 5 and 6: the Scout-shaped ~1B model against transformers
# --------------------------------------------------------------------------------------


def _randomize_(model, seed: int) -> None:
    """Random weights on the model's device (normal / sqrt(fan_in), norms near 1),
    rounded to bf16-representable values so the fp32 and bf16 models are the same."""
    torch, _ = _torch()
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

    torch, tdev = _torch()
    sz: Sizes = ctx["sizes"]
    config = scout_shaped(sz)
    t0 = time.perf_counter()
    with torch.device(tdev):
        hf32 = transformers.Llama4ForCausalLM(_hf_text_config(config))
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

    torch, _ = _torch()
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
        logits = _jax_sync(fwd())
        if impl == "auto":
            ctx["big_logits16_row0"] = np.asarray(logits[0], np.float32)
        del logits
        sec = ours_t[impl] = _median_time(fwd, _jax_sync, sz.repeats)
        s.row(f"ours, attention `{impl}`", f"{sec * 1e3:.1f}", f"{B * T / sec:,.0f}", mfu(sec))
        s.data[f"prefill_ours_{impl}_s"] = sec

    prefill_ours("auto")
    s.check(4, "prefill HF")
    tid = torch.as_tensor(ids, device=next(hf16.parameters()).device)

    def hf_call():
        with torch.inference_mode():
            return hf16(input_ids=tid, use_cache=False).logits

    ctx["big_hf16_row0"] = hf_call()[0].float().cpu().numpy()
    hsec = _median_time(hf_call, _torch_sync, sz.repeats)
    s.row("HF (sdpa, dense experts)", f"{hsec * 1e3:.1f}", f"{B * T / hsec:,.0f}", mfu(hsec))
    s.data["prefill_hf_s"] = hsec
    _free_torch()
    s.line()
    s.line(f"Prefill ratio ours (`auto`) / HF, tokens/s: {hsec / ours_t['auto']:.2f}x.")

    # Batch-1 decode and the roofline.
    s.check(10, "batch-1 decode")
    P, N = sz.decode_prompt, sz.decode_new
    prompts = np.random.default_rng(1).integers(3, t.vocab_size, (1, P))
    _ours_generate(config, params, prompts, N)  # compiles prefill and decode
    runs = [_ours_generate(config, params, prompts, N)[1] for _ in range(3)]
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
    _ours_generate(config, params, prompts, N)
    t0 = time.perf_counter()
    toks, st = _ours_generate(config, params, prompts, N)
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
           f"random weights: near-ties can flip): {_agreement(toks, hf_toks)}.")
    s.data["greedy_b64_agreement"] = float((toks == hf_toks).mean())
    ctx["big_greedy"] = _agreement(toks, hf_toks)

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
    _hf_generate(model, prompts, new)
    t_n, t_1, toks = [], [], None
    for _ in range(2):
        t0 = time.perf_counter()
        toks = _hf_generate(model, prompts, new)
        t_n.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _hf_generate(model, prompts, 1)
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
    ref32 = _hf_logits(m["hf32"], ids)
    _free_torch()
    s.check(6, "ours fp32")
    c32, p32 = L.load(m["path"], dtype="float32")
    with jax.default_matmul_precision("highest"):
        ours32 = np.asarray(L.forward(c32, p32, ids))
    del p32
    s.table("comparison", "max abs", "rel")
    d, r = _err(ours32, ref32)
    s.row("ours fp32 vs HF fp32", _e(d), _e(r))
    s.data["fp32"] = d
    if "big_logits16_row0" not in ctx:
        s.check(6, "bf16 logits")
        ctx["big_logits16_row0"] = np.asarray(L.forward(config, m["params"], ids)[0], np.float32)
        ctx["big_hf16_row0"] = _hf_logits(m["hf16"], ids)[0]
    ours16, hf16 = ctx["big_logits16_row0"][None], ctx["big_hf16_row0"][None]
    for label, a, b in (("ours bf16 vs HF fp32", ours16, ref32), ("HF bf16 vs HF fp32", hf16, ref32),
                        ("ours bf16 vs HF bf16", ours16, hf16)):
        d, r = _err(a, b)
        s.row(label, _e(d), _e(r))
        s.data[label] = d
    if "big_greedy" in ctx:
        s.line()
        s.line(f"Greedy agreement at batch {sz.big_batch} (bf16, section 5): {ctx['big_greedy']}.")


# --------------------------------------------------------------------------------------
# --lower-only: every GPU program lowers for cuda
# --------------------------------------------------------------------------------------


def as_on_gpu():
    """Trace as on a GPU host (`llama4_jax.kernels.platform.tracing_for('gpu')`): the
    Pallas kernel compiled (not interpreted), `ragged` choosing `ragged_dot`, `ep`
    dispatching with `ragged_all_to_all`. All are chosen at trace time from the target
    platform, which is otherwise `jax.default_backend()` (`cpu` here)."""
    from llama4_jax.kernels import platform

    return platform.tracing_for("gpu")


# Custom calls without jax.export's compatibility guarantee that our programs contain:
# Pallas Triton kernels, and XLA's ragged all-to-all (a custom call in StableHLO).
UNSTABLE_CALLS = ("__gpu$xla.gpu.triton", "ragged_all_to_all")


def lower_programs():
    """[(name, thunk)]: each thunk exports one jitted GPU program for `cuda` (small shapes).

    `expected_markers(name)` says what the lowered module must contain to prove the GPU
    path was traced."""
    import jax
    import jax.numpy as jnp
    from jax import export

    import llama4_jax as L
    from llama4_jax import engine

    checks = [export.DisabledSafetyCheck.custom_call(c) for c in UNSTABLE_CALLS]
    S = jax.ShapeDtypeStruct

    def ex(fn, *args, **kw):
        jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
        return export.export(jitted, platforms=["cuda"], disabled_checks=checks)(*args, **kw)

    progs = []
    progs.append(("env bf16 matmul", lambda: ex(lambda a, b: a @ b, S((256, 256), jnp.bfloat16),
                                                  S((256, 256), jnp.bfloat16))))
    progs.append(("env copy", lambda: ex(lambda x: x * 2, S((1 << 16,), jnp.float32))))

    # Attention backends: T=192 (not a power of two), chunk 64, GQA 4/2, head dim 128.
    T, H, K, d = 192, 4, 2, 128
    for dtype in (jnp.float32, jnp.bfloat16):
        qkv = (S((1, T, H, d), dtype), S((1, T, K, d), dtype), S((1, T, K, d), dtype))
        pos = (S((1, T), jnp.int32),) * 2
        ct = S((1, T, H, d), jnp.float32)
        for impl in ("xla", "blockwise", "pallas", "cudnn"):
            if impl == "cudnn" and dtype == jnp.float32:
                continue
            for mask, chunk in (("chunked", 64), ("global", None)):
                dn = "fp32" if dtype == jnp.float32 else "bf16"

                def fwd(impl=impl, chunk=chunk, qkv=qkv, pos=pos):
                    return ex(attention_fns(impl, chunk)[0], *qkv, *pos)

                def grad(impl=impl, chunk=chunk, qkv=qkv, pos=pos, ct=ct):
                    return ex(attention_fns(impl, chunk)[1], *qkv, *pos, ct)

                progs.append((f"attention {impl} {mask} {dn} forward", fwd))
                progs.append((f"attention {impl} {mask} {dn} gradient", grad))

    # The Pallas kernel at Scout's head grouping (40/8, G = 5: 25 positions x 5 heads in 128
    # rows, 8 warps), bf16, as section 4's GQA rows run it: a prefill and a decode step.
    for name, Tq, Sk, chunk in (("prefill", 192, 192, 64), ("decode", 1, 320, None)):
        qkv = (S((2, Tq, 40, d), jnp.bfloat16), S((2, Sk, 8, d), jnp.bfloat16), S((2, Sk, 8, d), jnp.bfloat16))

        def gqa(qkv=qkv, Tq=Tq, Sk=Sk, chunk=chunk):
            return ex(attention_fns("pallas", chunk)[0], *qkv, S((2, Tq), jnp.int32), S((2, Sk), jnp.int32))

        progs.append((f"attention pallas gqa5 {name} bf16 forward", gqa))

    # MoE implementations, forward and gradient; `ep` on an expert=2 mesh.
    E, D, F = 4, 64, 96
    for T_, k_ in ((32, 2), (4, 1)):
        h = S((T_, D), jnp.float32)
        w = {"gate": S((E, D, F), jnp.float32), "up": S((E, D, F), jnp.float32), "down": S((E, F, D), jnp.float32)}
        idx, sc, ct = S((T_, k_), jnp.int32), S((T_, k_), jnp.float32), S((T_, D), jnp.float32)
        for name in moe_fns_names():
            if name == "rowwise" and T_ * k_ > E:
                continue

            def fwd(name=name, h=h, w=w, idx=idx, sc=sc):
                with _ep_mesh(name):
                    return ex(moe_fns(name)[0], h, w, idx, sc)

            def grad(name=name, h=h, w=w, idx=idx, sc=sc, ct=ct):
                with _ep_mesh(name):
                    return ex(moe_fns(name)[1], h, w, idx, sc, ct)

            progs.append((f"moe {name} T={T_} k={k_} forward", fwd))
            progs.append((f"moe {name} T={T_} k={k_} gradient", grad))

    # The model forward (section 5's prefill) per attention and MoE backend, bf16.
    config = scout_shaped(SMOKE)
    params = L.abstract_params(config, dtype="bfloat16")
    ids = S((2, 96), jnp.int32)
    for attn, moe_impl in (("xla", None), ("blockwise", None), ("pallas", None),
                           ("xla", "dense"), ("xla", "blocked")):
        def fwd(attn=attn, moe_impl=moe_impl):
            return ex(lambda p, i: L.forward(config, p, i, attention_impl=attn, moe_impl=moe_impl), params, ids)

        progs.append((f"model forward attention={attn} moe={moe_impl or 'ragged'}", fwd))

    # The generate engine (sections 2 and 5): prefill and the decode loop, batch 1 and 4.
    text = config.text
    for B in (1, 4):
        P, N = 32, 16
        samp = {"temperature": S((B,), jnp.float32), "top_k": S((B,), jnp.int32), "top_p": S((B,), jnp.float32),
                "min_p": S((B,), jnp.float32), "seed": S((B,), jnp.uint32)}
        args = (params, S((B, P), jnp.int32), S((B, P), jnp.int32), samp, S((B,), jnp.int32), S((1,), jnp.int32))
        st = dict(text=text, max_len=P + N, max_new=N, attn_impl="auto", moe_impl="ragged", kv_dtype=None)

        def prefill(args=args, st=st):
            return ex(engine.prefill, *args, **st)

        def decode(args=args, st=st, samp=samp, B=B):
            state = jax.eval_shape(functools.partial(engine.prefill, **st), *args)
            return ex(engine.decode, params, state, samp, S((B,), jnp.int32), S((1,), jnp.int32),
                      S((), jnp.int32), text=text, attn_impl="auto", moe_impl="ragged")

        progs.append((f"engine prefill batch {B}", prefill))
        progs.append((f"engine decode batch {B}", decode))
    return progs


def expected_markers(name: str) -> tuple[str, ...]:
    """Substrings the lowered module of program `name` must contain to prove the GPU
    (or TPU) path was traced: the Triton custom call for the Pallas kernel, the
    `ragged_dot` strategy's scope for `ragged` on GPU, the ragged all-to-all for `ep`;
    on TPU, Mosaic custom calls (`tpu_custom_call`), the splash kernels by name and the
    `gmm` strategy's scope."""
    marks = []
    if name.startswith("tpu "):
        marks.append("tpu_custom_call")
        if "splash" in name or "attention=auto" in name:
            marks.append("splash_mha_fwd")  # the splash kernel itself, not only the fallback
            if "gradient" in name:
                marks.append("splash_mha_dkv")
        if re.search(r"moe (ragged|gmm|ep)|moe=ragged", name):
            marks.append("gmm_experts")
        if "moe ep" in name:
            marks.append("ragged_all_to_all")
        return tuple(marks)
    if "pallas" in name:
        marks.append("triton")
    if re.search(r"moe (ragged|ep)|moe=ragged|engine", name):
        marks.append("ragged_dot_experts")
    if "moe ep" in name:
        marks.append("ragged_all_to_all")
    return tuple(marks)


def tpu_programs():
    """[(name, thunk)]: each thunk exports one program for `tpu` with
    `platform.lower_for_tpu` (traced as for a TPU: splash attention and megablox `gmm`
    compiled as Mosaic kernels, `ep` on `ragged_all_to_all`). What this checks and what
    it cannot: see `llama4_jax/kernels/platform.py`."""
    import jax
    import jax.numpy as jnp
    from jax import export

    import llama4_jax as L
    from llama4_jax.kernels import platform

    checks = [export.DisabledSafetyCheck.custom_call(c) for c in UNSTABLE_CALLS]
    S = jax.ShapeDtypeStruct

    def ex(fn, *args, axes=None):
        return platform.lower_for_tpu(fn, *args, axes=axes, disabled_checks=checks)

    progs = []
    # Splash: T=192 (padded to the 256-token block), chunk 64, GQA 4/2, head dim 128.
    T, H, K, d = 192, 4, 2, 128
    for dtype, dn in ((jnp.bfloat16, "bf16"), (jnp.float32, "fp32")):
        qkv = (S((1, T, H, d), dtype), S((1, T, K, d), dtype), S((1, T, K, d), dtype))
        pos = (S((1, T), jnp.int32),) * 2
        ct = S((1, T, H, d), jnp.float32)
        for mask, chunk in (("chunked", 64), ("global", None)):
            progs.append((f"tpu attention splash {mask} {dn} forward",
                          lambda chunk=chunk, qkv=qkv, pos=pos: ex(attention_fns("splash", chunk)[0], *qkv, *pos)))
            progs.append((f"tpu attention splash {mask} {dn} gradient",
                          lambda chunk=chunk, qkv=qkv, pos=pos, ct=ct: ex(attention_fns("splash", chunk)[1], *qkv,
                                                                          *pos, ct)))

    # MoE: `gmm` (what `ragged` runs on TPU) and `ep` on an expert=2 mesh, bf16.
    E, D, F = 4, 128, 256
    w = {"gate": S((E, D, F), jnp.bfloat16), "up": S((E, D, F), jnp.bfloat16), "down": S((E, F, D), jnp.bfloat16)}
    for T_, k_ in ((32, 2), (4, 1)):
        h, idx, sc = S((T_, D), jnp.bfloat16), S((T_, k_), jnp.int32), S((T_, k_), jnp.bfloat16)
        ct = S((T_, D), jnp.float32)
        for name in ("ragged", "gmm", "ep"):
            axes = {"expert": 2} if name == "ep" else None

            def fwd(name=name, h=h, idx=idx, sc=sc, axes=axes):
                with _ep_mesh(name):
                    return ex(moe_fns(name)[0], h, w, idx, sc, axes=axes)

            def grad(name=name, h=h, idx=idx, sc=sc, ct=ct, axes=axes):
                with _ep_mesh(name):
                    return ex(moe_fns(name)[1], h, w, idx, sc, ct, axes=axes)

            progs.append((f"tpu moe {name} T={T_} k={k_} forward", fwd))
            progs.append((f"tpu moe {name} T={T_} k={k_} gradient", grad))

    # The model forward with the TPU defaults (`auto` -> splash, `ragged` -> gmm), bf16.
    config = scout_shaped(SMOKE)
    params = L.abstract_params(config, dtype="bfloat16")
    ids = S((2, 96), jnp.int32)
    progs.append(("tpu model forward attention=auto moe=ragged",
                  lambda: ex(lambda p, i: L.forward(config, p, i, attention_impl="auto"), params, ids)))
    return progs


def _ep_mesh(name: str):
    import jax

    from llama4_jax import sharding

    if name != "ep":
        return contextlib.nullcontext()
    if jax.device_count() < 2:
        raise RuntimeError("moe 'ep' needs >= 2 devices to lower (run with "
                           "XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    return sharding.activate(sharding.make_mesh("expert=2", devices=jax.devices()[:2]))


def lower_only() -> int:
    """Lower every program of `lower_programs` for cuda (traced as on a GPU) and of
    `tpu_programs` for tpu; returns the number that failed."""
    import jax

    from llama4_jax.kernels import platform

    t0 = time.perf_counter()
    print(f"gpu_validate --lower-only: jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)", flush=True)
    ok = skipped = failed = 0
    programs = [(name, "cuda", thunk) for name, thunk in lower_programs()]
    programs += [(name, "tpu", thunk) for name, thunk in tpu_programs()]
    for name, target, thunk in programs:
        t = time.perf_counter()
        try:
            with as_on_gpu() if target == "cuda" else contextlib.nullcontext():
                exp = thunk()
            assert exp.platforms == (target,), exp.platforms
            module = exp.mlir_module()
            missing = [m for m in expected_markers(name) if m not in module]
            if missing:
                raise AssertionError(f"lowered module lacks {missing}: not the {target} path")
            ok += 1
            print(f"lowered {name} ({time.perf_counter() - t:.2f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 (every program is tried; the count decides)
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            if name.startswith("attention cudnn") and "cuDNN" in msg:
                skipped += 1
                print(f"skipped {name}: needs a GPU to trace ({type(e).__name__}: {msg})", flush=True)
                continue
            reason = platform.tpu_lowering_unsupported(e) if target == "tpu" else None
            if reason:
                skipped += 1
                print(f"skipped {name}: cannot lower for tpu without a chip: {reason}", flush=True)
                continue
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {msg}", flush=True)
            traceback.print_exc(limit=-4)
    print(f"lower-only: {ok} lowered, {skipped} skipped, {failed} failed in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return failed


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

# (name, title, function, share of the budget); about 8% is left for imports and start-up.
PLAN = [
    ("env", "Environment, bf16 matmul rate, device copy bandwidth", section_env, 0.05),
    ("parity", "Parity against transformers on the same device (tiny Scout-like, fp32 and bf16)",
     section_parity, 0.17),
    ("moe", "MoE implementations against `dense`", section_moe, 0.08),
    ("attention", "Attention backends against `xla` at long context", section_attention, 0.22),
    ("throughput", "Throughput against transformers (Scout-shaped ~1B model, bf16)", section_throughput, 0.30),
    ("parity_1b", "Parity of the ~1B Scout-shaped model (fp32 and bf16)", section_parity_1b, 0.10),
]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock seconds for the whole run, imports and compiles included "
                         "(default 170; 900 with --smoke)")
    ap.add_argument("--out-dir", help="also write the results here (the GPU machine's $OUT)")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"),
                    help="where gpu-<device>.md goes (default benchmarks/results; not written with --smoke)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(p[0] for p in PLAN)}")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--lower-only", action="store_true", help="lower the GPU programs for cuda and exit")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes: run every section's code on any host")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.lower_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=2").strip()
        return 1 if lower_only() else 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")

    import jax

    if args.budget_s is None:
        args.budget_s = 900.0 if args.smoke else 170.0
    plan = PLAN
    if args.sections:
        want = args.sections.split(",")
        unknown = sorted(set(want) - {p[0] for p in PLAN})
        if unknown:
            raise SystemExit(f"unknown section(s) {unknown}; choose from {[p[0] for p in PLAN]}")
        plan = [p for p in PLAN if p[0] in want]
    dev = jax.devices()[0]
    slug = "cpu-smoke" if args.smoke else _slug(dev.device_kind)
    name = f"gpu-{slug}.md"
    paths = [] if args.smoke else [os.path.join(args.results_dir, name)]
    if args.out_dir:
        paths.append(os.path.join(args.out_dir, name))
    if not paths:
        paths.append(os.path.join(tempfile.gettempdir(), name))
    cmd = "python benchmarks/gpu_validate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"Written by `benchmarks/gpu_validate.py` (the command run: `{cmd.strip()}`; on the GPU machine: "
        f"`{GPU_COMMAND}`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, device {dev.device_kind}, "
        f"budget {args.budget_s:.0f} s" + (", --smoke (tiny shapes)" if args.smoke else "") + ".",
        "How each number is measured is said in its section; `rel` is max abs diff / max |reference|.",
    ]
    report = Report(f"GPU validation: {dev.device_kind}", header, paths, args.budget_s)
    ctx = {"sizes": SMOKE if args.smoke else Sizes(), "tmp": tempfile.mkdtemp(prefix="gpu_validate_")}
    print(f"gpu_validate: {dev.device_kind}, jax {jax.__version__}, imports {time.perf_counter() - _T0:.1f} s, "
          f"writing {', '.join(paths)}", flush=True)
    try:
        report.run(plan, ctx)
    finally:
        shutil.rmtree(ctx["tmp"], ignore_errors=True)
        report.data["total_s"] = round(time.perf_counter() - _T0, 1)
        report.write()
    print(f"\ngpu_validate: done in {time.perf_counter() - _T0:.1f} s; "
          + "; ".join(f"{s.name}: {s.status}" for s in report.sections), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
