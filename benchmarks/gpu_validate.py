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
   `pallas` (compiled, not interpreted, on GPU) and `cudnn`, cuDNN flash attention
   through `jax.nn.dot_product_attention` (`auto`'s GPU choice for bf16: chunked layers
   as causal attention over the sequence reshaped into chunks), at 16K and 32K
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
   attention backends (`auto`: `kernels.default_attention_impl`, `cudnn` for this bf16
   model; the recorded H200 run predates `cudnn` and `xla` as GPU defaults, when `auto`
   was `blockwise` past 1024 tokens).
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
tracing; traced for a GPU on a CPU host, the `cudnn` backend would lower its fallback)
and is reported as skipped; a TPU program is reported as skipped, with the
reason, only if this jax lacks the Pallas TPU ops or cannot lower Mosaic kernels
without a chip (jax 0.10.2 can). Lowering proves tracing and StableHLO; Mosaic's and
Triton's own compilation of the kernels happens only on the device.

Environment (set only when not already set): on GPU, XLA_PYTHON_CLIENT_PREALLOCATE=false
and XLA_PYTHON_CLIENT_MEM_FRACTION=0.8, so JAX and PyTorch share the device; for
`--lower-only`, JAX_PLATFORMS=cpu and 2 host devices.

This file is the command line and the plan; the sections are in `gpu_checks.py` (1-4)
and `gpu_throughput.py` (5-6), the report and its time boxes in `gpu_report.py`, what
they share (sizes, timing, the torch side, the Scout-shaped configs) in
`gpu_common.py`, and `--lower-only` in `gpu_lowering.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from gpu_checks import section_attention, section_env, section_moe, section_parity
from gpu_common import device_slug, Sizes, SMOKE
from gpu_lowering import lower_only
from gpu_report import Report
from gpu_throughput import section_parity_1b, section_throughput


_T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GPU_COMMAND = "PYTHONPATH=. python benchmarks/gpu_validate.py --budget-s 375 --out-dir $OUT"


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
    slug = "cpu-smoke" if args.smoke else device_slug(dev.device_kind)
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
    report = Report(f"GPU validation: {dev.device_kind}", header, paths, args.budget_s, t0=_T0)
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
