"""benchmarks/generate.py's batch roofline: the bytes a batch decode step must read."""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

import llama4_jax
from llama4_jax import probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(ROOT, "benchmarks", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench):
    config = bench.scout_shaped().replace_text(
        vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
        moe_layers=(0, 1, 2, 3), no_rope_layers=(1, 1, 1, 0), eos_token_id=())
    return config, llama4_jax.init_params(config, jax.random.key(0), dtype="float32")


@pytest.mark.parametrize("routing", ["same", "distinct"])
def test_batch_roofline_counts_each_chosen_expert_once(bench, tiny, monkeypatch, routing):
    config, params = tiny
    t = config.text
    B, T, N = 4, 6, 5
    M = len(t.moe_layers)
    prompts = [[3 + b] * T for b in range(B)]
    tokens = [[5] * N for _ in range(B)]
    # Every row on expert 0, or row b on expert b: each (layer, expert) is read once a step.
    experts = np.zeros((M, B, T + N, 1), np.int32) if routing == "same" else \
        np.broadcast_to(np.arange(B, dtype=np.int32)[None, :, None, None], (M, B, T + N, 1))
    monkeypatch.setattr(probes, "moe_trace", lambda config, params, ids: probes.MoETrace(
        t.moe_layers, None, experts, None, None, None))
    monkeypatch.setattr(bench, "read_bandwidth", lambda: (1e9, 2))
    monkeypatch.setattr(bench, "matvec_bandwidth", lambda devices, rows, d: 0.5e9 * devices)
    expert = 3 * t.hidden_size * t.intermediate_size * 4  # gate, up and down, fp32
    shared = bench.active_bytes_per_token(config, params) - M * expert
    steps = range(T, T + N - 1)  # decode feeds the generated tokens but the last
    cache = np.mean([B * bench.occupied_cache_bytes(config, p + 1) for p in steps])
    per_layer = 1 if routing == "same" else B
    one = bench.batch_roofline(config, params, prompts, tokens, devices=1)
    assert one["expert_bytes"] == expert and one["shared_bytes"] == shared
    assert one["ideal_bytes"] == pytest.approx(shared + M * per_layer * expert + cache)
    assert one["lanes_bytes"] == one["ideal_bytes"]
    assert one["ideal_s"] == pytest.approx(one["ideal_bytes"] / 1e9)
    # Two devices: each reads the shared weights and its own two rows' experts.
    two = bench.batch_roofline(config, params, prompts, tokens, devices=2)
    assert two["ideal_bytes"] == one["ideal_bytes"]
    assert two["lanes_bytes"] == pytest.approx(2 * shared + 2 * M * (1 if routing == "same" else 2) * expert + cache)
    assert two["lanes_matvec_s"] == pytest.approx(two["lanes_bytes"] / 1e9)  # at the devices' matvec rate


def test_mixed_parts_give_each_part_s_ratio(bench):
    static = {"prefill_s": 80.0, "decode_s": 100.0, "decode_steps": 1000, "compile_s": 10.0}
    cont = {"prefill_s": 64.0, "decode_s": 50.0, "decode_steps": 400, "compile_s": 4.0}
    line = bench.mixed_parts(cont, static)
    assert "prefill 1.25x, decode 2.00x (1000 / 400 steps = 2.50x, 0.80x per step), compile 2.50x" in line
    cont["compile_s"] = 0.0  # nothing compiled after the warm-up
    assert "compile n/a" in bench.mixed_parts(cont, static)


@pytest.mark.parametrize("mesh, message", [("tensor=3", "--batch-mesh tensor=3 has 3 devices; --cpu-devices is 2"),
                                           ("tensor", "--batch-mesh: mesh spec 'tensor'")])
def test_batch_mesh_is_checked_before_anything_runs(bench, monkeypatch, capsys, mesh, message):
    """A --batch-mesh that does not name the --cpu-devices devices is refused at once:
    no child process (which would build the checkpoint first) is started."""
    monkeypatch.setattr(bench, "child", lambda *a, **k: pytest.fail("a child ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--part", "batch", "--cpu-devices", "2", "--batch-mesh", mesh])
    assert e.value.code == 2 and message in capsys.readouterr().err
