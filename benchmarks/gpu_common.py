"""What the sections of `gpu_validate.py` share: the run's sizes (GPU and CPU smoke),
timing and error helpers, the torch/transformers side, and the Scout-shaped configs,
attention and MoE functions the GPU run and `--lower-only` both use."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np


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
# Helpers: timing, errors, torch
# --------------------------------------------------------------------------------------


def jax_sync(x):
    import jax

    return jax.block_until_ready(x)


def median_time(call, sync, repeats: int, inner: int = 1, max_s: float = 3.0) -> float:
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


def err(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|), in fp32."""
    a, b = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    d = float(np.max(np.abs(a - b)))
    return d, d / max(float(np.max(np.abs(b))), 1e-30)


def tree_err(ours, ref) -> tuple[float, float]:
    """Max abs diff and max rel diff (per leaf: diff / max |ref leaf|) over two pytrees."""
    import jax

    pairs = [err(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref))]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


def sci(x: float) -> str:
    return f"{x:.2e}"


_TORCH = {}


def get_torch():
    """torch, configured once: TF32 off (fp32 means fp32), the device to use."""
    if not _TORCH:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        _TORCH["torch"] = torch
        _TORCH["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return _TORCH["torch"], _TORCH["device"]


def have_torch() -> bool:
    """Whether `get_torch` has given torch (the sections that compare with it can run)."""
    return "torch" in _TORCH


def torch_sync(_=None):
    torch, dev = get_torch()
    if dev == "cuda":
        torch.cuda.synchronize()


def free_torch():
    if _TORCH and _TORCH["device"] == "cuda":
        import gc

        gc.collect()
        _TORCH["torch"].cuda.empty_cache()


def hf_logits(model, ids) -> np.ndarray:
    torch, _ = get_torch()
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long, device=dev), use_cache=False)
    return out.logits.float().cpu().numpy()


def hf_generate(model, prompts: np.ndarray, new: int) -> np.ndarray:
    """Greedy continuation [B, new] of equal-length prompts [B, T] (stop tokens cannot end a row early)."""
    torch, _ = get_torch()
    dev = next(model.parameters()).device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, prompts.shape[1]:].cpu().numpy()


def ours_generate(config, params, prompts: np.ndarray, new: int, **kw):
    """Greedy tokens [B, new] and GenerationStats of llama4_jax.generate (stop tokens off)."""
    import llama4_jax as L

    cfg = config.replace_text(eos_token_id=())
    outs, stats = L.generate(cfg, params, [list(map(int, r)) for r in prompts], max_new_tokens=new,
                             batch_size=len(prompts), return_stats=True, **kw)
    return np.asarray([o.token_ids for o in outs]), stats


def agreement(ours: np.ndarray, ref: np.ndarray) -> str:
    eq = ours == ref
    rows = int(eq.all(axis=1).sum())
    first = [int(np.argmin(r)) for r in eq if not r.all()]
    where = f"; first mismatch at step {min(first)}" if first else ""
    return f"{int(eq.sum())}/{eq.size} tokens, {rows}/{len(eq)} rows identical{where}"


def hf_text_config(config):
    import transformers

    from llama4_jax.config import to_hf

    d = to_hf(config)
    return transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})


def device_slug(kind: str) -> str:
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
    """(forward, forward_and_gradient) jitted for an attention backend:
    forward(q, k, v, qp, kp) -> out; forward_and_gradient(q, k, v, qp, kp, ct) ->
    (out, (dq, dk, dv)), the gradients of sum(out * ct) (one program: a forward and its
    backward, as in training). `cudnn` refuses (RuntimeError, while tracing) a call its
    kernel would not take here, so no row reports the fallback's numbers as cuDNN's."""
    import jax

    from llama4_jax.kernels import cudnn, platform
    from llama4_jax.model.attention import attend

    def f(q, k, v, qp, kp):
        if impl == "cudnn" and not cudnn.cudnn_runs(q, k, v, chunk):
            raise RuntimeError(f"cuDNN does not take this call here ({q.dtype}, head dim {q.shape[-1]}, platform "
                               f"{platform.target()}): the cudnn backend would run its fallback")
        return attend(q, k, v, qp, kp, chunk_size=chunk, impl=impl)

    def fwd_grad(q, k, v, qp, kp, ct):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, qp, kp), q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(f), jax.jit(fwd_grad)


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


TPU_ONLY_MOE = ("gmm",)  # megablox: a Pallas TPU kernel (interpret mode anywhere else)


def moe_fns_names() -> tuple[str, ...]:
    """The MoE implementations a GPU run compares (all registered but the TPU-only ones)."""
    from llama4_jax.model import moe

    return tuple(n for n in moe.moe_impls() if n not in TPU_ONLY_MOE)


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
