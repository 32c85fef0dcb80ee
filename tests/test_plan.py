"""The memory planner agrees with what sharded placement really allocates."""

import jax
import numpy as np
import pytest

from llama4_jax import cli, sharding
from llama4_jax.cache import init_cache
from llama4_jax.config import preset
from llama4_jax.model.text import abstract_params
from llama4_jax.plan import GiB, format_plan, plan


def _per_device_bytes(tree) -> int:
    """Bytes of the most loaded device, summed over the shards each device holds."""
    per = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values())


@pytest.mark.parametrize("spec,dtype", [("data=2,expert=2,tensor=2", "float32"), ("expert=4,tensor=2", "bfloat16"),
                                        ("fsdp=8", "float32")])
def test_plan_matches_placed_params_and_cache(spec, dtype):
    cfg = preset("tiny-vision")  # vision tower included: its rules are planned too
    mesh = sharding.make_mesh(spec)
    fmt = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    p = plan(cfg, mesh, weight_format=fmt, batch=4, max_len=40)

    shardings = sharding.param_shardings(cfg, mesh, dtype=dtype)
    host = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(cfg, dtype=dtype))
    placed = jax.device_put(host, shardings)
    assert p.weights == _per_device_bytes(placed)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(host))
    assert p.weights_total == total

    cache = init_cache(cfg, 4, 40, dtype=dtype)
    cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))
    assert p.kv_cache == _per_device_bytes(cache)


def test_plans_of_record():
    """Scout int4 on one 80 GiB device at 128K tokens; Maverick fp8 on expert=8 x 80 GiB
    at 256K tokens (both with the vision tower, bf16 KV cache). The quantized weight
    bytes equal those `load(quantize=, mesh=)` places: test_quant.py
    test_load_quantized_onto_a_mesh."""
    scout = plan(preset("scout"), "data=1", quantize="int4", max_len=131072)
    assert scout.fits and 60 * GiB < scout.weights < 62 * GiB  # 60.9 GiB + 7.1 GiB KV
    maverick = plan(preset("maverick"), "expert=8", quantize="fp8", max_len=262144)
    assert maverick.fits and 61 * GiB < maverick.weights < 63 * GiB  # 61.8 GiB + 13.1 GiB KV
    assert not plan(preset("maverick"), "expert=8", max_len=262144).fits  # bf16 does not
    text = format_plan(scout, "scout")
    assert "decoder matrices int4 in groups of 128 with their scales, the rest bf16" in text


def test_scout_needs_three_h100s_in_bf16():
    p = plan(preset("scout"), "expert=8", weight_format="bf16", max_len=1 << 20)
    assert p.min_devices_for_weights == 3  # ~202 GiB of weights over 80 GiB devices
    assert 200 * GiB < p.weights_total < 205 * GiB
    # Routed experts split 8 ways; everything else is replicated by the expert-only rules.
    assert p.weights_by_part["routed experts"] * 8 == pytest.approx(180 * GiB, rel=0.01)
    assert plan(preset("scout"), "data=1", quantize="int4").weights < 80 * GiB  # int4 fits one H100


def test_long_context_needs_the_chunk_capped_cache():
    cfg = preset("scout").replace(vision=None)
    t = cfg.text
    n = 10 * 2**20  # 10M tokens
    p = plan(cfg, "data=1", max_len=n, kv_format="bf16")
    # Per token and layer: k and v [K, d] in bf16 plus an int32 position.
    per_slot = 2 * t.num_key_value_heads * t.head_dim * 2 + 4
    chunked = sum(f.is_chunked for f in t.layer_flags)  # 36 of 48
    assert p.kv_cache == per_slot * (chunked * t.attention_chunk_size + (t.num_hidden_layers - chunked) * n)
    assert p.kv_cache_uncapped == per_slot * t.num_hidden_layers * n
    assert p.kv_cache_uncapped > 3.9 * p.kv_cache


def test_plan_cli(capsys):
    assert cli.main(["plan", "--preset", "scout", "--mesh", "expert=8", "--dtype", "bf16", "--max-len", "1048576",
                     "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "mesh expert=8 (8 devices)" in out
    assert "routed experts" in out and "chunked layers capped at the chunk" in out
    assert "the weights alone need at least 3 device(s) of 80 GiB" in out
    text = format_plan(plan(preset("tiny"), "tensor=2", max_len=64), "tiny")
    assert "fits" in text and "DOES NOT FIT" not in text


def test_plan_rejects_bad_input():
    with pytest.raises(sharding.ShardingError, match="unknown axis 'model'"):
        plan(preset("tiny"), "model=8")
    with pytest.raises(ValueError, match="weight format must be one of"):
        plan(preset("tiny"), "data=1", weight_format="int3")
    with pytest.raises(ValueError, match="int4 is a quantization: pass quantize='int4'"):
        plan(preset("tiny"), "data=1", weight_format="int4")
    with pytest.raises(ValueError, match="unknown quantization format 'int3'"):
        plan(preset("tiny"), "data=1", quantize="int3")
    with pytest.raises(ValueError, match="KV cache format must be one of"):
        plan(preset("tiny"), "data=1", kv_format="int4")


@pytest.mark.parametrize("flags, message", [
    (["--preset", "scoot"], "unknown preset 'scoot'"),
    (["--preset", "tiny", "--mesh", "expert=3x"], "size of 'expert' must be an integer, found '3x'"),
    (["--preset", "tiny", "--mesh", "data=2,,expert=2"], "empty axis entry"),
    (["--preset", "tiny", "--mesh", "model=2"], "unknown axis 'model'"),
    (["--preset", "tiny", "--device-memory", "0"], "--device-memory must be > 0 GiB, got 0.0"),
    (["--preset", "tiny", "--max-len", "0"], "--max-len must be >= 1, got 0"),
    (["--preset", "tiny", "--batch", "-1"], "--batch must be >= 1, got -1"),
    (["--config", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--preset", "tiny", "--quantize", "int3"], "unknown quantization format 'int3'; choose from"),
    (["--preset", "tiny", "--dtype", "int4"], "int4 is a quantization: --quantize int4"),
    (["--preset", "tiny", "--quantize", "int4", "--group-size", "0"], "group size must be a positive integer"),
    (["--preset", "tiny", "--quantize", "int4", "--group-size", "x"], "--group-size must be a positive integer"),
    (["--preset", "tiny", "--quantize", "int8", "--group-size", "64"], "a group size applies to int4 only"),
])
def test_plan_cli_mistakes_are_one_line_errors(capsys, flags, message):
    assert cli.main(["plan", *flags]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("llama4-jax plan: error: ") and message in err, err


def test_activations_follow_the_prefill_piece_that_runs():
    """`plan` sizes activations for the piece `generate` prefills in (the attention chunk
    by default), and a prefill in pieces needs temporary memory by the piece, not by the
    prompt: the compiled prefill of 2048 tokens in 128-token pieces uses less than half
    the temporaries of the same prompt in one piece, and less than a 512-token prompt in
    one piece (tiny preset, fp32, batch 2; 5.2, 18.2 and 10.3 MB with `auto` attention,
    blockwise past 256 tokens)."""
    import jax.numpy as jnp

    from llama4_jax import engine
    from llama4_jax.generate import default_prefill_chunk

    for name in ("scout", "maverick"):
        cfg = preset(name)
        assert plan(cfg, "expert=8", max_len=1 << 20).prefill_chunk == default_prefill_chunk(cfg) == 8192
    cfg = preset("tiny")
    params = abstract_params(cfg, dtype="float32")
    B = 2
    samp = dict(temperature=jnp.zeros(B), top_k=jnp.zeros(B, jnp.int32), top_p=jnp.ones(B), min_p=jnp.zeros(B),
                seed=jnp.zeros(B, jnp.uint32), stop_ids=jnp.zeros((B, 1), jnp.int32))

    def temp(T, piece):
        ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
        return engine.prefill.lower(params, ids, ids, samp, jnp.ones(B, jnp.int32),
                                    text=cfg.text, max_len=T + 16, max_new=16, attn_impl="auto", moe_impl="ragged",
                                    kv_dtype=None, piece=piece).compile().memory_analysis().temp_size_in_bytes

    pieces = temp(2048, 128)
    assert pieces < temp(2048, None) / 2 and pieces < temp(512, None)
