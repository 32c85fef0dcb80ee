"""Checkpoints: streaming HF load, sharded load, orbax conversion, exact export, FP8, errors.

Tiny transformers checkpoints (tests/hf_models.py) in both layouts: `Llama4ForCausalLM`
in one file, and `Llama4ForConditionalGeneration` in many shards (`max_shard_size`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import llama4_jax
from llama4_jax import checkpoint as ck
from llama4_jax import convert as cv
from llama4_jax.config import ConfigError
from tests import hf_models

# fp32 parity with transformers is ~1e-5 on these configs (see test_parity.py); 1e-4
# leaves room for summation-order differences, and a wrong transform moves logits by O(1).
PARITY_ATOL = 1e-4


@pytest.fixture(scope="session")
def cond_sharded(tmp_path_factory):
    return hf_models.build("maverick_like", tmp_path_factory, max_shard_size="20KB", conditional=True)


@pytest.fixture(scope="session", params=["causal_1file", "cond_sharded"])
def ckpt(request, scout_like, cond_sharded):
    return scout_like if request.param == "causal_1file" else cond_sharded


_LOADED: dict = {}


def loaded(path, dtype="float32"):
    """Session cache of `llama4_jax.load` (params are immutable)."""
    if (path, dtype) not in _LOADED:
        _LOADED[path, dtype] = llama4_jax.load(path, dtype=dtype)
    return _LOADED[path, dtype]


def ids_for(config, seed=1):
    return np.random.RandomState(seed).randint(0, config.text.vocab_size, (2, 19))


def convert(*argv) -> int:
    p = argparse.ArgumentParser()
    cv.add_arguments(p)
    return cv.run(p.parse_args([*map(str, argv), "--no-progress"]))


def assert_same_params(a, b):
    fa, fb = dict(ck.base._flatten(a)), dict(ck.base._flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{'/'.join(k)} differs"


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# --------------------------------------------------------------------------------------
# Loading, converting, exporting
# --------------------------------------------------------------------------------------

def test_load_matches_transformers(ckpt):
    config, params = loaded(ckpt.path)
    assert config.text == ckpt.config.text
    ids = ids_for(config)
    ours = np.asarray(llama4_jax.forward(config, params, ids))
    ref = hf_models.hf_logits(ckpt.hf_model, ids)
    np.testing.assert_allclose(ours, ref, atol=PARITY_ATOL, rtol=0)


def _mesh_shardings(abstract, mesh):
    """Shard the last even axis over x (2) and the first other multiple-of-4 axis over y (4).

    On these odd-sized configs that puts `head_dim` on x for q/k/v, so a device's slice
    of an HF row block is not contiguous (the gather path), and experts, vocab or
    widths on y elsewhere.
    """
    def spec(shape):
        axes = [None] * len(shape)
        for i in reversed(range(len(shape))):
            if shape[i] % 2 == 0:
                axes[i] = "x"
                break
        for i in range(len(shape)):
            if axes[i] is None and shape[i] % 4 == 0:
                axes[i] = "y"
                break
        return NamedSharding(mesh, P(*axes))

    return jax.tree_util.tree_map(lambda s: spec(s.shape), abstract)


def test_sharded_load_equals_unsharded(scout_like, tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    config, ref = loaded(scout_like.path)
    shardings = _mesh_shardings(llama4_jax.abstract_params(config, dtype="float32"), mesh)
    n_sharded = sum(len(set(s.spec) - {None}) > 0 for s in jax.tree_util.tree_leaves(shardings))
    assert n_sharded > 10  # the test must actually shard most leaves
    _, params = llama4_jax.load(scout_like.path, dtype="float32", shardings=shardings)
    assert_same_params(params, ref)
    for path, arr in ck.base._flatten(params):
        assert arr.sharding == ck.base._get(shardings, path), path
    # the converted directory restores straight into the same shardings
    dst = tmp_path / "orbax"
    assert convert(scout_like.path, dst, "--dtype", "float32") == 0
    _, restored = llama4_jax.load(str(dst), dtype="float32", shardings=shardings)
    assert_same_params(restored, ref)
    for path, arr in ck.base._flatten(restored):
        assert arr.sharding == ck.base._get(shardings, path), path


@pytest.fixture(scope="session")
def converted(ckpt, tmp_path_factory):
    """Converted with no --dtype: the fp32 source stays fp32 (so the export is bitwise)."""
    dst = tmp_path_factory.mktemp("converted") / "orbax"
    assert convert(ckpt.path, dst) == 0
    with open(dst / ck.FORMAT_FILE) as f:
        assert json.load(f)["dtype"] == "float32"
    return str(dst)


def test_convert_then_load_gives_identical_params(ckpt, converted):
    assert {"config.json", ck.FORMAT_FILE, "params"} <= set(os.listdir(converted))
    config, params = llama4_jax.load(converted, dtype="float32")
    assert config == loaded(ckpt.path)[0]
    assert_same_params(params, loaded(ckpt.path)[1])


def test_converted_restores_in_another_dtype(ckpt, converted):
    import ml_dtypes

    _, params = llama4_jax.load(converted, dtype="bfloat16")  # stored float32
    ref = loaded(ckpt.path)[1]
    for (path, a), (_, b) in zip(ck.base._flatten(params), ck.base._flatten(ref)):
        assert a.dtype == ml_dtypes.bfloat16, path
        # orbax's cast on restore rounds to nearest even, as numpy's (and torch's) does
        assert np.array_equal(np.asarray(a).view(np.int16), np.asarray(b).astype(ml_dtypes.bfloat16).view(np.int16))


def test_export_is_bitwise_and_transformers_loads_it(ckpt, converted, tmp_path):
    out = tmp_path / "hf"
    assert convert(converted, out, "--to-hf", "--max-shard-size", "30KB") == 0
    assert os.path.exists(out / "model.safetensors.index.json")
    src, dst = ck.SafetensorsReader(ckpt.path), ck.SafetensorsReader(str(out))
    assert set(dst.tensors) == set(src.tensors)  # text and vision tensors, nothing more or less
    for k in sorted(src.tensors):
        a, b = src.read(k), dst.read(k)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    model = type(ckpt.hf_model).from_pretrained(str(out), dtype="float32").eval()
    ids = ids_for(ckpt.config, seed=2)
    # Same weights, same code: transformers must give bit-identical logits.
    np.testing.assert_array_equal(hf_models.hf_logits(model, ids), hf_models.hf_logits(ckpt.hf_model, ids))


def test_bfloat16_convert_and_export_round_trip(scout_like, tmp_path):
    import torch
    from safetensors.torch import load_file

    assert convert(scout_like.path, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    assert convert(tmp_path / "bf16", tmp_path / "hf_out", "--to-hf") == 0
    ref = load_file(os.path.join(scout_like.path, "model.safetensors"))
    got = load_file(str(tmp_path / "hf_out" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:  # our fp32 -> bf16 cast rounds to nearest even, like torch's
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k].view(torch.int16), ref[k].to(torch.bfloat16).view(torch.int16)), k
    # bf16 HF -> ours -> HF is bitwise too
    config, params = llama4_jax.load(str(tmp_path / "hf_out"), dtype="bfloat16")
    ck.save_hf(config, params, str(tmp_path / "hf_out2"))
    again = load_file(str(tmp_path / "hf_out2" / "model.safetensors"))
    assert all(torch.equal(again[k].view(torch.int16), got[k].view(torch.int16)) for k in got)


def test_convert_refuses_existing_destination_and_overwrites_on_request(scout_like, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert convert(scout_like.path, dst) == 2
    assert "already exists" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert convert(scout_like.path, dst, "--overwrite", "--dtype", "float32") == 0
    assert not (dst / "keep.txt").exists() and ck.is_converted(str(dst))


def test_interrupted_conversion_leaves_no_destination(scout_like, tmp_path, monkeypatch):
    real = ck.convert_hf_to_orbax

    def dies_midway(src, dst, **kw):
        real(src, dst, **kw)  # everything written ...
        raise KeyboardInterrupt  # ... but interrupted before the rename

    monkeypatch.setattr(ck, "convert_hf_to_orbax", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(scout_like.path, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither DST nor the temporary directory remains


# --------------------------------------------------------------------------------------
# FP8 checkpoints (both layouts), built here by quantizing a tiny model
# --------------------------------------------------------------------------------------

def _quantize_rows(w, top=448.0):
    """Per-output-row FP8 e4m3: w [..., out, in] -> (w8, scale [..., out, 1]) with amax -> top."""
    import torch

    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / top
    return (w / scale).to(torch.float8_e4m3fn), scale.float()


def _write_fp8(src: str, dst: str, layout: str, top: float = 448.0):
    """Quantize routed experts and shared-expert Linears of a causal checkpoint (each
    row's largest |w| stored as `top`).

    Returns the dequantized fp32 state dict (what a correct reader must reproduce).
    """
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            wt = v.transpose(1, 2)  # [E, out, in]
            w8, s = _quantize_rows(wt, top)
            deq[k] = (w8.float() * s).transpose(1, 2).contiguous()
            if layout == "compressed-tensors":
                base = k[: -len("gate_up_proj" if k.endswith("gate_up_proj") else "down_proj")]
                F = wt.shape[1] // 2
                for e in range(v.shape[0]):
                    if k.endswith("gate_up_proj"):
                        out[f"{base}{e}.gate_proj.weight"] = w8[e, :F].contiguous()
                        out[f"{base}{e}.gate_proj.weight_scale"] = s[e, :F].contiguous()
                        out[f"{base}{e}.up_proj.weight"] = w8[e, F:].contiguous()
                        out[f"{base}{e}.up_proj.weight_scale"] = s[e, F:].contiguous()
                    else:
                        out[f"{base}{e}.down_proj.weight"] = w8[e].contiguous()
                        out[f"{base}{e}.down_proj.weight_scale"] = s[e].contiguous()
            else:  # fbgemm: fused, scales [E, 1, 2F] for gate_up and [E, D, 1] for down
                out[k] = w8.transpose(1, 2).contiguous()
                out[k + "_scale"] = s.transpose(1, 2).contiguous() if k.endswith("gate_up_proj") else s.contiguous()
        elif "shared_expert" in k:
            w8, s = _quantize_rows(v, top)
            out[k], out[k[: -len("weight")] + "weight_scale"] = w8, s
            deq[k] = w8.float() * s
        else:
            out[k] = v
            deq[k] = v
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if layout == "compressed-tensors":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
            "ignore": ["re:.*self_attn.*", "re:.*router.*", "lm_head"]}
    else:
        cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                      "modules_to_not_convert": ["self_attn", "router", "lm_head"]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return deq


@pytest.mark.parametrize("layout", ["compressed-tensors", "fbgemm_fp8"])
def test_fp8_checkpoint_dequantizes(scout_like, tmp_path, layout):
    import copy

    dst = str(tmp_path / layout)
    deq = _write_fp8(scout_like.path, dst, layout)
    reader = ck.SafetensorsReader(dst)
    assert any(t.dtype.name == "float8_e4m3fn" for t in reader.tensors.values())
    config, params = llama4_jax.load(dst, dtype="float32")
    ids = ids_for(config)
    ours = np.asarray(llama4_jax.forward(config, params, ids))
    # Against transformers running the same dequantized weights: as tight as plain parity.
    ref_model = copy.deepcopy(scout_like.hf_model)
    ref_model.load_state_dict(deq, strict=True)
    np.testing.assert_allclose(ours, hf_models.hf_logits(ref_model, ids), atol=PARITY_ATOL, rtol=0)
    # Against the unquantized original: e4m3 keeps 3 mantissa bits (~3.6% rms error per
    # weight); through this random 12-layer model that measured 0.11-0.12 rms logit error
    # for a logit std of ~1.0. A scale on the wrong axis, or a missing one, is O(std) or
    # worse, so 0.2 of the logit spread separates the two.
    orig = hf_models.hf_logits(scout_like.hf_model, ids)
    err = np.sqrt(np.mean((ours - orig) ** 2))
    assert err < 0.2 * orig.std(), (err, orig.std())
    assert err > 0  # the weights really were quantized
    if layout == "fbgemm_fp8":  # conversion dequantizes the same way
        assert convert(dst, tmp_path / "orbax", "--dtype", "float32") == 0
        assert_same_params(llama4_jax.load(str(tmp_path / "orbax"), dtype="float32")[1], params)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fbgemm_fp8"])
def test_fp8_checkpoint_kept_as_stored(scout_like, tmp_path, layout):
    """load(quantize="fp8") keeps the stored e4m3 weights and per-channel scales as they
    are: the scales here are stored at max|w| / 300, which quantizing again (max / 448)
    would change. So the FP8 weights dequantize exactly to what the float load reads,
    and the weights stored in fp32 (attention) are quantized from their values. FP8 ->
    int4 quantizes the dequantized weights."""
    from llama4_jax import quant

    dst = str(tmp_path / layout)
    _write_fp8(scout_like.path, dst, layout, top=300.0)
    _, deq = llama4_jax.load(dst, dtype="float32")
    config, got = llama4_jax.load(dst, dtype="float32", quantize="fp8")
    reader = ck.SafetensorsReader(dst)
    pre = "model.layers.0.feed_forward."
    E = config.text.num_local_experts
    if layout == "fbgemm_fp8":
        stored = reader.read(pre + "experts.gate_up_proj")  # [E, D, 2F]
        F = stored.shape[-1] // 2
        want_q, want_s = stored[..., :F], reader.read(pre + "experts.gate_up_proj_scale")[:, 0, :F]
    else:
        want_q = np.stack([reader.read(f"{pre}experts.{e}.gate_proj.weight").T for e in range(E)])
        want_s = np.stack([reader.read(f"{pre}experts.{e}.gate_proj.weight_scale")[:, 0] for e in range(E)])
    gate = got["params"]["layers"]["layer_0"]["moe"]["gate"]  # [G, E, D, F]; HF layer 0 is group 0
    assert gate.q.dtype == np.dtype("float8_e4m3fn")
    assert np.abs(np.asarray(gate.q[0], np.float32)).max() <= 320  # 300 rounded in e4m3, not 448
    assert np.array_equal(np.asarray(gate.q[0]).view(np.uint8), want_q.view(np.uint8))
    assert np.array_equal(np.asarray(gate.scale[0]), want_s.astype(np.float32))
    quantize_params = jax.jit(quant.quantize_params, static_argnums=1)  # one compilation, not one per op
    requantized = quantize_params(deq, "fp8")
    flat = jax.tree_util.tree_flatten_with_path(got, is_leaf=quant.is_quantized)[0]
    kept = 0
    for path, w in flat:
        if not quant.is_quantized(w):
            continue
        keys = [str(getattr(k, "key", k)) for k in path]
        ref = _leaf(requantized, keys)
        if "moe" in keys:  # stored FP8: kept, and dequantized exactly as the float load reads
            kept += 1
            assert np.array_equal(np.asarray(quant.dequantize(w)), np.asarray(_leaf(deq, keys))), keys
            assert not np.array_equal(np.asarray(w.scale), np.asarray(ref.scale))  # quantizing again differs
        else:
            for a, b in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(ref)):
                assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), keys
    assert kept == 4 * 6  # layer_0..3: the experts' gate/up/down and the shared expert's three
    if layout == "fbgemm_fp8":  # FP8 -> int4: dequantized in fp32, then quantized like the float load
        _, int4 = llama4_jax.load(dst, dtype="float32", quantize="int4")
        want = quantize_params(deq, "int4")
        for a, b in zip(jax.tree_util.tree_leaves(int4), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def _leaf(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def test_fp8_channel_scale_only_for_per_channel_e4m3(tmp_path):
    """A stored scale that varies along the contraction (or an e5m2 weight) cannot be
    kept per output channel: None, so the loader dequantizes and quantizes again."""
    import ml_dtypes

    from llama4_jax.checkpoint.names import Rule
    from llama4_jax.checkpoint.quantized import fp8_channel_scale

    w = np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6)  # HF Linear [out 4, in 6]
    cases = {"row": np.arange(1, 5, dtype=np.float32).reshape(4, 1), "tensor": np.array([0.5], np.float32),
             "column": np.ones((1, 6), np.float32)}
    tensors = []
    for name, sc in cases.items():
        tensors += [(f"{name}.weight", (4, 6), np.dtype(ml_dtypes.float8_e4m3fn),
                     lambda: w.astype(ml_dtypes.float8_e4m3fn)),
                    (f"{name}.weight_scale", sc.shape, np.dtype(np.float32), lambda sc=sc: sc)]
    tensors += [("e5m2.weight", (4, 6), np.dtype(ml_dtypes.float8_e5m2), lambda: w.astype(ml_dtypes.float8_e5m2)),
                ("e5m2.weight_scale", (4, 1), np.dtype(np.float32), lambda: cases["row"])]
    os.makedirs(tmp_path / "ck")
    ck.write_safetensors(str(tmp_path / "ck" / "model.safetensors"), tensors)
    reader = ck.SafetensorsReader(str(tmp_path / "ck"))
    linear = Rule("x", ("x",), "linear")
    scale = lambda n: fp8_channel_scale(reader, f"{n}.weight", linear, 0, (6, 4), 1, 1, None)  # noqa: E731
    np.testing.assert_array_equal(scale("row"), [1, 2, 3, 4])
    np.testing.assert_array_equal(scale("tensor"), [0.5] * 4)
    assert scale("column") is None and scale("e5m2") is None


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint path does not exist: .*nowhere"):
        llama4_jax.load(str(tmp_path / "nowhere"))
    assert convert(tmp_path / "nowhere", tmp_path / "out") == 2


def test_error_no_config(scout_like, tmp_path):
    d = copy_ckpt(scout_like.path, tmp_path / "c")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ck.CheckpointError, match="has no config.json"):
        llama4_jax.load(d)


def test_error_no_weights(scout_like, tmp_path):
    d = copy_ckpt(scout_like.path, tmp_path / "c")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"has no \*\.safetensors weights"):
        llama4_jax.load(d)


def test_error_missing_shard(cond_sharded, tmp_path):
    d = copy_ckpt(cond_sharded.path, tmp_path / "c")
    os.remove(os.path.join(d, next(f for f in os.listdir(d) if f.startswith("model-00003-of-"))))
    with pytest.raises(ck.CheckpointError, match="shard.*missing: model-00003-of-"):
        llama4_jax.load(d)


def test_error_truncated_file(scout_like, tmp_path):
    d = copy_ckpt(scout_like.path, tmp_path / "c")
    f = os.path.join(d, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors is truncated: tensor .* ends at byte"):
        llama4_jax.load(d)


def test_error_corrupted_header(scout_like, tmp_path):
    d = copy_ckpt(scout_like.path, tmp_path / "c")
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="corrupted: its header is not valid JSON"):
        llama4_jax.load(d)


def test_error_unsupported_model_type(scout_like, tmp_path):
    d = copy_ckpt(scout_like.path, tmp_path / "c")
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_type"] = "llama"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        llama4_jax.load(d)


def test_error_unsupported_dtype(scout_like):
    with pytest.raises(ConfigError, match=r"unsupported dtype 'int8'; choose from \['float32', 'bfloat16'"):
        llama4_jax.load(scout_like.path, dtype="int8")


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(src, dst)
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return d


def test_error_wrong_shape_names_tensor_expected_and_found(scout_like, tmp_path):
    name = "model.layers.5.self_attn.k_proj.weight"
    d = _rewrite(scout_like.path, tmp_path / "c", lambda sd: sd.__setitem__(name, sd[name][:-1].clone()))
    with pytest.raises(ck.CheckpointError, match=rf"tensor {name} has shape \(19, 60\), expected \(20, 60\)"):
        llama4_jax.load(d)


def test_error_missing_and_unexpected_tensors(scout_like, tmp_path):
    name = "model.layers.7.feed_forward.router.weight"
    d = _rewrite(scout_like.path, tmp_path / "a", lambda sd: sd.pop(name))
    with pytest.raises(ck.CheckpointError, match=f"tensor {name} is missing"):
        llama4_jax.load(d)
    d = _rewrite(scout_like.path, tmp_path / "b", lambda sd: sd.__setitem__("model.extra.weight", sd[name].clone()))
    with pytest.raises(ck.CheckpointError, match=r"tensors not used by the model: \['model.extra.weight'\]"):
        llama4_jax.load(d)


def test_error_fp8_without_scale_and_unknown_quantization(scout_like, tmp_path):
    dst = str(tmp_path / "fp8")
    _write_fp8(scout_like.path, dst, "fbgemm_fp8")
    _rewrite(dst, tmp_path / "noscale", lambda sd: sd.pop("model.layers.0.feed_forward.experts.down_proj_scale"))
    with pytest.raises(ck.CheckpointError, match="FP8 tensor model.layers.0.feed_forward.experts.down_proj has no "
                                                 "scale"):
        llama4_jax.load(str(tmp_path / "noscale"))
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ck.CheckpointError, match="quantization method 'gptq' is not supported"):
        llama4_jax.load(dst)


def test_to_hf_needs_a_converted_directory(scout_like, tmp_path, capsys):
    assert convert(scout_like.path, tmp_path / "out", "--to-hf") == 1
    assert "is not a converted checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# The reader refuses untrusted headers and indexes
# --------------------------------------------------------------------------------------

def _raw_safetensors(path, header: dict, nbytes: int) -> None:
    """A safetensors file with exactly this header and `nbytes` zero bytes of data."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + bytes(nbytes))


def _f32(name_offsets: dict) -> dict:
    """Header of float32 [2] tensors at the given data offsets."""
    return {k: {"dtype": "F32", "shape": [2], "data_offsets": list(v)} for k, v in name_offsets.items()}


def _shards(tmp_path, files: dict) -> str:
    """A checkpoint directory of float32 [2] tensors: {file name: {tensor: offsets}};
    each file holds as many data bytes as its largest end offset."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for fn, offsets in files.items():
        _raw_safetensors(d / fn, _f32(offsets), max(e for _, e in offsets.values()))
    return str(d)


def _index(d, weight_map: dict) -> None:
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_reader_refuses_index_shard_outside_the_directory(tmp_path, how):
    outside = tmp_path / "outside.safetensors"
    _raw_safetensors(outside, _f32({"w": (0, 8)}), 8)
    d = tmp_path / "ckpt"
    d.mkdir()
    if how == "symlink":
        os.symlink(outside, d / "link.safetensors")
    name = {"absolute": str(outside), "dotdot": "../outside.safetensors", "symlink": "link.safetensors"}[how]
    _index(d, {"w": name})
    with pytest.raises(ck.CheckpointError, match=rf"shard '{name}'.*(not a file name inside|leads outside)"):
        ck.SafetensorsReader(str(d))


def test_reader_refuses_a_tensor_stored_in_two_shards(tmp_path):
    d = _shards(tmp_path, {"a.safetensors": {"w": (0, 8), "x": (8, 16)}, "b.safetensors": {"x": (0, 8)}})
    # without an index every *.safetensors file is read; with one, every listed shard
    for index in (False, True):
        if index:
            _index(d, {"w": "a.safetensors", "x": "b.safetensors"})
        with pytest.raises(ck.CheckpointError, match=r"tensor x is stored twice, in a.safetensors and b.safetensors"):
            ck.SafetensorsReader(d)


def test_reader_refuses_a_tensor_in_another_shard_than_the_index_says(tmp_path):
    d = _shards(tmp_path, {"a.safetensors": {"w": (0, 8), "x": (8, 16)}, "b.safetensors": {"y": (0, 8)}})
    _index(d, {"w": "a.safetensors", "x": "b.safetensors", "y": "b.safetensors"})
    with pytest.raises(ck.CheckpointError, match=r"not in their shard: \['x'\] \(x: index says b.safetensors, "
                                                 r"found in a.safetensors\)"):
        ck.SafetensorsReader(str(d))


@pytest.mark.parametrize("offsets, nbytes, message", [
    ({"a": (0, 8), "b": (4, 12)}, 12, "the data of tensors a and b overlap"),
    ({"a": (0, 8), "b": (0, 8)}, 8, "the data of tensors a and b overlap"),
    ({"a": (0, 16), "b": (4, 12)}, 16, "bytes for shape"),  # a is too long for its shape: refused first
    ({"a": (8, 0)}, 8, r"data_offsets \[8, 0\]"),
    ({"a": (-8, 0)}, 8, r"data_offsets \[-8, 0\]"),
    ({"a": (0, 8), "b": (8, 16)}, 12, "truncated: tensor b ends at byte"),
    ({"a": (0.0, 8)}, 8, "bad header entry for tensor 'a'"),
])
def test_reader_refuses_bad_data_offsets(tmp_path, offsets, nbytes, message):
    d = tmp_path / "ckpt"
    d.mkdir()
    _raw_safetensors(d / "model.safetensors", _f32(offsets), nbytes)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.SafetensorsReader(str(d))


def test_reader_reads_adjacent_and_empty_tensors(tmp_path):
    """The overlap check accepts what valid files do: back-to-back tensors, and empty
    tensors (zero bytes) at any offset, including inside another tensor's range."""
    d = tmp_path / "ckpt"
    d.mkdir()
    ck.write_safetensors(str(d / "model.safetensors"), [
        ("a", (2,), np.float32, lambda: np.array([1, 2], np.float32)),
        ("e", (0, 3), np.float32, lambda: np.zeros((0, 3), np.float32)),
        ("b", (3,), np.float32, lambda: np.array([3, 4, 5], np.float32))])
    header = _f32({"a": (0, 8)}) | {"b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]},
                                    "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    _raw_safetensors(d / "raw.safetensors", {k + "_raw": v for k, v in header.items()}, 20)
    r = ck.SafetensorsReader(str(d))
    np.testing.assert_array_equal(r.read("b"), [3, 4, 5])
    assert r.read("e").shape == (0, 3) and r.read("e_raw").shape == (0,) and r.read("b_raw").shape == (3,)
