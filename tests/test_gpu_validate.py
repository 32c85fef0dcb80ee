"""benchmarks/gpu_validate.py, the prepared GPU run: what CI can check of it without a GPU.

* `--lower-only` exports every GPU program of the run (attention backends and their
  gradients, every MoE implementation and its gradient, the model forward per backend,
  the generate engine's prefill and decode) for `cuda` with `jax.export`, traced as on
  a GPU (the Pallas kernel compiled to Triton, `ragged` as `ragged_dot`, `ep` on
  `ragged_all_to_all`), and the TPU paths (splash attention, megablox `gmm`, `ep` on
  `ragged_all_to_all`, the model forward with `auto`) for `tpu`;
* the report keeps going past a failing section, stops a section at its time box and
  skips what the budget no longer covers, rewriting its markdown after every line.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_validate.py")


@pytest.fixture(scope="module")
def gv():
    """The script's modules (benchmarks/gpu_*.py, which import each other by name, as they
    do when the script runs from benchmarks/), as one namespace."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        common, report = importlib.import_module("gpu_common"), importlib.import_module("gpu_report")
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return types.SimpleNamespace(**{**vars(common), **vars(report)})


def test_lower_only_exports_every_gpu_program():
    # A subprocess: lowering traces the kernel, MoE and collective choices of a GPU or TPU
    # (`kernels.platform.tracing_for`), and those traces must not land in this process's
    # jit caches (they cannot run on CPU).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, SCRIPT, "--lower-only"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-6000:] + r.stderr[-3000:]
    summary = re.search(r"lower-only: (\d+) lowered, (\d+) skipped, (\d+) failed", out)
    assert summary and summary.group(3) == "0", out[-3000:]
    lowered = set(re.findall(r"^lowered (.+) \(\d", out, re.M))
    assert len(lowered) == int(summary.group(1)) >= 53
    for name in ("attention xla global fp32 gradient", "attention blockwise chunked bf16 forward",
                 "attention pallas chunked fp32 gradient", "attention pallas global bf16 forward",
                 "moe ragged T=32 k=2 gradient", "moe ragged_dot T=4 k=1 forward", "moe blocked T=32 k=2 gradient",
                 "moe ep T=32 k=2 forward", "moe ep T=32 k=2 gradient", "model forward attention=pallas moe=ragged",
                 "model forward attention=blockwise moe=ragged", "engine prefill batch 4", "engine decode batch 1"):
        assert name in lowered, name
    assert not any(n.startswith("moe gmm") for n in lowered)  # TPU-only: not among the cuda programs
    # TPU programs lower (jax 0.10.2 lowers Mosaic kernels without a chip), or are skipped
    # with the reason when this jax cannot; only those and the cuDNN candidate may be skipped.
    skipped = dict(re.findall(r"^skipped (.+?): (.*)$", out, re.M))
    tpu = [f"tpu attention splash {m} {dt} {p}" for m in ("chunked", "global") for dt in ("bf16", "fp32")
           for p in ("forward", "gradient")]
    tpu += [f"tpu moe {n} {t} {p}" for n in ("ragged", "gmm", "ep") for t in ("T=32 k=2", "T=4 k=1")
            for p in ("forward", "gradient")]
    tpu += ["tpu model forward attention=auto moe=ragged"]
    for name in tpu:
        assert name in lowered or skipped.get(name, "").startswith("cannot lower for tpu without a chip"), name
    assert all(n.startswith("attention cudnn") or n.startswith("tpu ") for n in skipped), skipped


def _fake_plan(gv, clock):
    def ok(s, ctx):
        s.line("- first line")
        s.table("a", "b")
        s.row(1, 2)
        ctx["ran"].append("ok")

    def boom(s, ctx):
        ctx["ran"].append("boom")
        raise ValueError("boom at step 3")

    def boxed(s, ctx):
        ctx["ran"].append("boxed")
        s.line("- before the box")
        s.check(s.box_s + 1, "the long step")  # more than the box, less than the budget
        s.line("- never written")

    def spend(s, ctx):
        ctx["ran"].append("spend")
        clock["report"].t0 -= 1e4  # as if the budget were spent during this section

    def never(s, ctx):
        ctx["ran"].append("never")

    return [("ok", "Fine", ok, 0.2), ("boom", "Fails", boom, 0.2), ("boxed", "Boxed", boxed, 0.2),
            ("spend", "Spends", spend, 0.2), ("never", "Too late", never, 0.2)]


def test_report_records_failures_timeouts_and_skips(gv, tmp_path):
    path = str(tmp_path / "out" / "gpu-test.md")
    clock = {}
    report = gv.Report("GPU validation: test", ["header line"], [path], budget_s=600.0, t0=time.perf_counter())
    clock["report"] = report
    ctx = {"ran": []}
    report.run(_fake_plan(gv, clock), ctx)
    assert ctx["ran"] == ["ok", "boom", "boxed", "spend"]
    status = {s.name: s.status for s in report.sections}
    assert status["ok"] == "ok" and status["spend"] == "ok"
    assert status["boom"] == "failed: ValueError: boom at step 3"
    assert status["boxed"].startswith("stopped: time box") and "before the long step" in status["boxed"]
    assert status["never"].startswith("skipped: budget")
    md = open(path).read()
    assert "| ok | ok |" in md and "| never | skipped: budget" in md
    assert "- first line" in md and "| 1 | 2 |" in md and "- before the box" in md and "never written" not in md
    assert "ValueError: boom at step 3" in md and "Traceback" in md  # the short traceback, in a code block
    data = json.load(open(path[:-3] + ".json"))
    assert data["sections"]["boom"]["status"].startswith("failed")


def test_counting_helpers(gv):
    brute = lambda T, C: sum(1 for i in range(T) for j in range(i + 1) if not C or i // C == j // C)  # noqa: E731
    for T, C in ((10, 4), (16, 8), (17, 8), (5, None), (8, 8), (3, 16)):
        assert gv.visible_pairs(T, C) == brute(T, C), (T, C)
    assert gv.device_slug("NVIDIA H200") == "h200"
    assert gv.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    # The Scout-shaped config of the GPU run: ~1B parameters, a quarter of its layers global.
    config = gv.scout_shaped(gv.Sizes())
    t = config.text
    assert sum(not f.is_chunked for f in t.layer_flags) == t.num_hidden_layers // 4
    D, E, F = t.hidden_size, t.num_local_experts, t.intermediate_size
    attn = 2 * D * t.num_attention_heads * t.head_dim + 2 * D * t.num_key_value_heads * t.head_dim
    assert gv.active_matmul_params(t) == t.num_hidden_layers * (attn + D * E + 6 * D * F) + D * t.vocab_size
