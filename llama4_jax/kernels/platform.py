"""The platform a program is traced for: every trace-time backend choice reads it here.

Kernels and collectives are picked while tracing (the Pallas kernel compiled or
interpreted, `auto` attention, the `ragged` MoE strategy, the `ep` collective), by
`target()`: JAX's default backend, or the platform named by an enclosing
`tracing_for(...)`, which lets a CPU host trace the program a GPU or TPU would run and
lower it with `jax.export` (`benchmarks/gpu_validate.py --lower-only`). A program
traced inside `tracing_for` is for that platform only: do not call its jitted function
outside the context with the same shapes (jit caches the trace, not the platform).

`lower_for_tpu` exports for `tpu` on any host. Pallas TPU kernels (splash attention,
megablox `gmm`) read the chip's generation while lowering
(`jax._src.pallas.mosaic.tpu_info`); off a TPU that comes from the device of the
abstract mesh in context, so the export runs under an abstract mesh of TPU devices.
What it checks: the program traces and lowers to StableHLO with Mosaic custom calls;
Mosaic's own compilation of those kernels happens only on a TPU, so layout or VMEM
errors cannot be seen here.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("llama4_jax_target_platform", default=None)

# The chip `lower_for_tpu` lowers for (a TPU v5e; any kind jax's tpu_info knows works).
TPU_LOWERING_DEVICE_KIND = "TPU v5 lite"


def normalize(platform: str) -> str:
    """'cuda' and 'rocm' (jax.export's names) are 'gpu' (jax.default_backend()'s)."""
    p = platform.lower()
    return "gpu" if p in ("cuda", "rocm") else p


def target() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the program being traced."""
    t = _TARGET.get()
    return t if t is not None else normalize(jax.default_backend())


@contextlib.contextmanager
def tracing_for(platform: str):
    """Trace as for `platform` ('cpu', 'gpu'/'cuda'/'rocm', 'tpu') inside this context."""
    p = normalize(platform)
    if p not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS} (or 'cuda', 'rocm')")
    token = _TARGET.set(p)
    try:
        yield p
    finally:
        _TARGET.reset(token)


def tpu_abstract_mesh(axes: dict[str, int] | None = None, device_kind: str = TPU_LOWERING_DEVICE_KIND):
    """An abstract mesh of TPU devices (no chip needed) with the given axes (default one
    axis of size 1). Shard-mapped code whose mesh has the same axis names traces over it
    (see `llama4_jax.sharding._tracing_mesh`)."""
    axes = axes or {"tpu": 1}
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes), (jax.sharding.AxisType.Auto,) * len(axes),
                                     abstract_device=device)


def lower_for_tpu(fn, *args, axes: dict[str, int] | None = None, disabled_checks=(), **kwargs):
    """`jax.export` of `fn(*args, **kwargs)` for `tpu` on any host, traced as for a TPU
    (`tracing_for('tpu')`) under `tpu_abstract_mesh(axes)`. Returns the Exported."""
    from jax import export

    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    with tracing_for("tpu"), jax.sharding.use_abstract_mesh(tpu_abstract_mesh(axes)):
        return export.export(jitted, platforms=["tpu"], disabled_checks=list(disabled_checks))(*args, **kwargs)


def tpu_lowering_unsupported(e: BaseException) -> str | None:
    """Why `lower_for_tpu` failed, when the cause is this host or this jax rather than
    the program: the Pallas TPU ops are missing from this jax, or its Mosaic lowering
    insists on a TPU device instead of the abstract mesh's. None for any other failure."""
    msg = str(e)
    if isinstance(e, ImportError) and "pallas" in msg:
        return f"this jax lacks a Pallas TPU module ({type(e).__name__}: {msg[:200]})"
    if "Unsupported TPU device kind" in msg:
        return f"Mosaic lowering on this jax needs a TPU device ({type(e).__name__}: {msg[:200]})"
    return None
