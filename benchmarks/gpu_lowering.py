"""`gpu_validate.py --lower-only`: every GPU program of the run lowers for cuda, and the
TPU paths for tpu, through `jax.export` on any host."""

from __future__ import annotations

import contextlib
import functools
import re
import time
import traceback

from gpu_common import attention_fns, moe_fns, moe_fns_names, scout_shaped, SMOKE


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
                "min_p": S((B,), jnp.float32), "seed": S((B,), jnp.uint32), "stop_ids": S((B, 1), jnp.int32)}
        args = (params, S((B, P), jnp.int32), S((B, P), jnp.int32), samp, S((B,), jnp.int32))
        st = dict(text=text, max_len=P + N, max_new=N, attn_impl="auto", moe_impl="ragged", kv_dtype=None)

        def prefill(args=args, st=st):
            return ex(engine.prefill, *args, **st)

        def decode(args=args, st=st, samp=samp, B=B):
            state = jax.eval_shape(functools.partial(engine.prefill, **st), *args)
            return ex(engine.decode, params, state, samp, S((B,), jnp.int32), S((), jnp.int32), text=text, attn_impl="auto", moe_impl="ragged")

        progs.append((f"engine prefill batch {B}", prefill))
        progs.append((f"engine decode batch {B}", decode))
    return progs


def expected_markers(name: str) -> tuple[str, ...]:
    """Substrings the lowered module of program `name` must contain to prove the GPU
    (or TPU) path was traced: the Triton custom call for the Pallas kernel, the
    `ragged_dot` strategy's scope for `ragged` on GPU, the ragged all-to-all for `ep`;
    on TPU, Mosaic custom calls (`tpu_custom_call`), the splash kernels by name and the
    `gmm` strategy's scope."""
    marks = ["ragged_all_to_all"] if "moe ep" in name else []  # both platforms
    if name.startswith("tpu "):
        marks.append("tpu_custom_call")
        if "splash" in name or "attention=auto" in name:
            marks.append("splash_mha_fwd")  # the splash kernel itself, not only the fallback
            if "gradient" in name:
                marks.append("splash_mha_dkv")
        if re.search(r"moe (ragged|gmm|ep)|moe=ragged", name):
            marks.append("gmm_experts")
    else:
        if "pallas" in name:
            marks.append("triton")
        if name.startswith("attention cudnn"):
            marks.append("__cudnn$fmha")  # the fused-attention custom call, not the fallback
        if re.search(r"moe (ragged|ep)|moe=ragged|engine", name):
            marks.append("ragged_dot_experts")
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
