"""`llama4-jax convert` safety and completeness: paths that reach the source are refused,
a regular-file DST leaves nothing behind, relative paths work, the source dtype is kept,
and a converted directory serves `llama4-jax generate` like its source."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import sys

import jax
import numpy as np
import pytest

import llama4_jax
from llama4_jax import checkpoint as ck
from llama4_jax import quant
from llama4_jax.checkpoint.base import _flatten
from llama4_jax.cli import main
from llama4_jax.generate import DEFAULT_MODEL
from tests.trees import assert_bitwise


def _tree(root) -> dict:
    """Every file below root -> its bytes (what a refused convert must leave untouched)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.mark.parametrize("dst, message", [
    ("x/a", "contains the source"),  # the parent: --overwrite used to delete the source and its siblings
    ("x", "contains the source"),
    ("x/a/ckpt", "same directory"),
    ("x/a/ckpt/", "same directory"),
    ("x/a/ckpt/out", "inside the source"),
    ("link/ckpt", "same directory"),  # through a symlinked parent
    ("link", "contains the source"),
    ("link/ckpt/sub/out", "inside the source"),
])
def test_convert_refuses_destinations_that_reach_the_source(tmp_path, monkeypatch, capsys, dst, message):
    src = tmp_path / "x" / "a" / "ckpt"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (tmp_path / "x" / "a" / "sibling.txt").write_text("keep")
    os.symlink(tmp_path / "x" / "a", tmp_path / "link")
    before = _tree(tmp_path / "x")
    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    assert main(["convert", "x/a/ckpt", dst, "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path / "x") == before


def test_converted_default_checkpoint_round_trip_and_generate(tmp_path, monkeypatch, capsys):
    """The shipped (fp32) checkpoint converted with relative paths over a regular file:
    no leftovers, fp32 kept, tokenizer files carried, identical params, identical
    greedy completions from `generate --model CONVERTED`, and a bitwise export back."""
    # a private copy: the source must not change while it is compared with its conversion
    shutil.copytree(DEFAULT_MODEL, tmp_path / "src")
    source = str(tmp_path / "src")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with open(os.path.join(source, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"
    (tmp_path / "run" / "conv").write_text("a regular file in the way")
    assert main(["convert", source, "conv", "--no-progress"]) == 2  # exists: needs --overwrite
    assert main(["convert", source, "conv", "--overwrite", "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path / "run")) == ["conv"]  # no "-old" file, no temporary directory
    with open("conv/" + ck.FORMAT_FILE) as f:
        assert json.load(f)["dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "processor_config.json", "preprocessor_config.json"):
        with open(os.path.join(source, name), "rb") as a, open(os.path.join("conv", name), "rb") as b:
            assert a.read() == b.read(), name

    _, ref = llama4_jax.load(source, dtype="float32")
    _, got = llama4_jax.load("conv", dtype=None)  # relative path; the stored dtype
    for (path, a), (_, b) in zip(_flatten(ref), _flatten(got)):
        assert np.asarray(b).dtype == np.float32 and np.array_equal(np.asarray(a), np.asarray(b)), path

    with open("in.jsonl", "w") as f:
        f.write(json.dumps({"id": "a", "prompt": "12+30="}) + "\n" + json.dumps({"prompt": "red"}) + "\n")
    outs = {}
    for model in (source, "conv"):
        out = f"out-{len(outs)}.jsonl"
        assert main(["generate", "--input", "in.jsonl", "--output", out, "--model", model, "--dtype", "float32",
                     "--batch-size", "2", "--max-new-tokens", "8", "--temperature", "0", "--no-progress"]) == 0
        with open(out) as f:
            outs[model] = [json.loads(x)["text"] for x in f]
    assert outs["conv"] == outs[source]

    # the export through the script in convert/ (the same code as `convert --to-hf`)
    assert _script("jax_to_hf.py", "conv", "hf", "--no-progress") == 0
    a, b = ck.SafetensorsReader(source), ck.SafetensorsReader("hf")
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), name
    assert os.path.exists("hf/tokenizer.json") and os.path.exists("hf/chat_template.jinja")

    capsys.readouterr()

def _script(name, *argv) -> int:
    """Run a script of convert/ in this process, as `python convert/<name> argv...`."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert", name)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "argv", [path, *argv])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(path, run_name="__main__")
    return e.value.code


# --------------------------------------------------------------------------------------
# Quantized conversion: convert --quantize, convert/quantize.py, convert/verify.py
# --------------------------------------------------------------------------------------

QUANTIZE_FLAGS = {"int8": ["--quantize", "int8"], "int4": ["--quantize", "int4", "--group-size", "16"],
                  "fp8": ["--quantize", "fp8"]}


def _fmt(name):
    return quant.QuantFormat("int4", 16) if name == "int4" else quant.QuantFormat(name)


@pytest.fixture(scope="module")
def quantized_dirs(maverick_like, tmp_path_factory):
    """maverick_like (fp32) converted with each --quantize: int8 through
    convert/quantize.py, int4 (groups of 16) and fp8 through `llama4-jax convert`."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, flags in QUANTIZE_FLAGS.items():
        out[name] = str(root / name)
        if name == "int8":
            assert _script("quantize.py", maverick_like.path, out[name], *flags, "--no-progress") == 0
        else:
            assert main(["convert", maverick_like.path, out[name], *flags, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("name", list(QUANTIZE_FLAGS))
def test_quantized_convert_round_trip(maverick_like, quantized_dirs, name):
    """load(DST) restores the stored quantized tree as it is, bitwise the leaves
    load(SRC, quantize=) gives (float leaves in the source's fp32); asking for the
    stored format again is a no-op; int4 also restores straight into a mesh."""
    dst = quantized_dirs[name]
    with open(os.path.join(dst, ck.FORMAT_FILE)) as f:
        info = json.load(f)
    assert info["quantize"] == {"format": name, "group_size": 16 if name == "int4" else None}
    assert info["dtype"] == "float32" and info["format_version"] == ck.QUANTIZED_FORMAT_VERSION
    config, want = llama4_jax.load(maverick_like.path, dtype="float32", quantize=_fmt(name))
    assert_bitwise(llama4_jax.load(dst, dtype=None)[1], want)
    assert_bitwise(llama4_jax.load(dst, dtype="float32", quantize=name)[1], want)
    if name == "int4":
        from llama4_jax import sharding

        mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
        _, placed = llama4_jax.load(dst, dtype="float32", mesh=mesh)
        assert_bitwise(placed, want)
        shardings = sharding.param_shardings(config, mesh, dtype="float32", quantize=_fmt(name))
        for a, s in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(shardings)):
            assert a.sharding == s


def test_quantize_a_converted_float_directory(maverick_like, quantized_dirs, tmp_path, capsys):
    """A converted float directory quantizes like its HF source, both while loading
    (one stored group at a time) and with `convert --quantize`; without --quantize or
    --to-hf there is nothing to do (one-line error)."""
    conv, out = str(tmp_path / "f32"), str(tmp_path / "q8")
    assert main(["convert", maverick_like.path, conv, "--no-progress"]) == 0
    _, want = llama4_jax.load(quantized_dirs["int8"], dtype=None)
    assert_bitwise(llama4_jax.load(conv, dtype=None, quantize="int8")[1], want)
    assert main(["convert", conv, out, "--quantize", "int8", "--no-progress"]) == 0
    assert_bitwise(llama4_jax.load(out, dtype=None)[1], want)
    capsys.readouterr()
    assert main(["convert", conv, str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already a converted checkpoint: pass --to-hf to export it, or --quantize" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("argv, message", [
    (["SRC", "--quantize", "int3"], "unknown quantization format 'int3'; choose from ['int8', 'int4', 'fp8']"),
    (["SRC", "--quantize", "int4", "--group-size", "0"], "int4 group size must be a positive integer, got 0"),
    (["SRC", "--quantize", "int4", "--group-size", "x"], "--group-size must be a positive integer, got 'x'"),
    (["SRC", "--quantize", "int8", "--group-size", "64"], "a group size applies to int4 only"),
    (["Q4", "--to-hf", "--quantize", "int4"], "exporting quantized weights to Hugging Face safetensors (--to-hf) "
                                              "is not supported"),
    (["Q4", "--to-hf"], "holds weights quantized as int4 (groups of 16); --to-hf exports float weights only"),
    (["Q4", "--quantize", "int8"], "is already quantized as int4 (groups of 16): nothing to convert"),
    (["Q4", "--quantize", "int4"], "is already quantized as int4 (groups of 16): nothing to convert"),
    (["Q4"], "is already quantized as int4 (groups of 16): nothing to convert"),
])
def test_quantize_mistakes_are_one_line_errors(maverick_like, quantized_dirs, tmp_path, capsys, argv, message):
    src = {"SRC": maverick_like.path, "Q4": quantized_dirs["int4"]}[argv[0]]
    out = str(tmp_path / "out")
    assert main(["convert", src, out, *argv[1:], "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not os.path.exists(out)


def test_quantized_load_mistakes(maverick_like, quantized_dirs):
    q4 = quantized_dirs["int4"]
    with pytest.raises(ck.CheckpointError, match=r"stored quantized as int4 \(groups of 16\); it loads as stored "
                                                 r"\(quantize=None or 'int4'\), not as int8"):
        llama4_jax.load(q4, quantize="int8")
    with pytest.raises(ck.CheckpointError, match=r"not as int4 \(groups of 32\)"):
        llama4_jax.load(q4, quantize="int4", group_size=32)
    with pytest.raises(quant.QuantError, match="unknown quantization format 'int2'"):
        llama4_jax.load(maverick_like.path, quantize="int2")
    with pytest.raises(quant.QuantError, match="a group size needs quantize='int4'"):
        llama4_jax.load(maverick_like.path, group_size=64)


def test_verify_script(maverick_like, quantized_dirs, capsys):
    """convert/verify.py prints per prompt and overall the max |logit diff| and the
    greedy agreement; --atol makes a quantized checkpoint fail; verify() of a model
    against itself is exact."""
    from llama4_jax import convert as cv

    argv = [maverick_like.path, quantized_dirs["int8"], "--random-prompts", "2", "--max-new-tokens", "3"]
    assert _script("verify.py", *argv, "--atol", "1e-6") == 1
    out = capsys.readouterr().out
    assert "quantized as int8" in out and out.count("greedy") == 3, out
    diff = float(out.split("overall: max |logit diff| ")[1].split(";")[0])
    assert 1e-6 < diff < 10
    ref = llama4_jax.load(maverick_like.path, dtype="float32")
    report = cv.verify(ref, ref, [[5, 7, 11], [13] * 9], max_new_tokens=3)
    assert report["max_abs_diff"] == 0 and report["greedy_identical"] == 2 and report["argmax_agreement"] == 1


# --------------------------------------------------------------------------------------
# FP8 -> int4 (convert/fp8_to_int4.py), and bad input: dtypes, scales that do not fit
# --------------------------------------------------------------------------------------

FP8_LAYOUTS = {"compressed-tensors": "compressed-tensors", "fbgemm_fp8": "fbgemm_fp8"}


@pytest.fixture(scope="module")
def fp8_checkpoints(maverick_like, tmp_path_factory):
    """maverick_like with its routed and shared experts stored FP8 e4m3 (per-channel
    scales), in each layout; its attention and dense MLPs stay fp32."""
    from tests.test_checkpoint import _write_fp8

    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for layout in FP8_LAYOUTS:
        out[layout] = str(root / layout)
        _write_fp8(maverick_like.path, out[layout], layout)
    return out


def _one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
def test_fp8_to_int4_script(fp8_checkpoints, tmp_path, capsys, layout):
    """convert/fp8_to_int4.py stores int4 (groups of --group-size) bitwise what
    load(SRC, quantize=int4) gives, which is quantize_params of the FP8 weights
    dequantized in fp32 (and of the fp32 attention / dense MLPs as stored)."""
    src, dst = fp8_checkpoints[layout], str(tmp_path / "int4")
    assert ck.fp8_weight_names(ck.SafetensorsReader(src))
    assert _script("fp8_to_int4.py", src, dst, "--group-size", "16", "--no-progress") == 0
    assert "quantized as int4 (groups of 16)" in capsys.readouterr().out
    with open(os.path.join(dst, ck.FORMAT_FILE)) as f:
        info = json.load(f)
    assert info["quantize"] == {"format": "int4", "group_size": 16} and info["dtype"] == "float32"
    assert info["source_quantization"] == layout
    _, got = llama4_jax.load(dst, dtype=None)
    fmt = quant.QuantFormat("int4", 16)
    assert_bitwise(got, llama4_jax.load(src, dtype="float32", quantize=fmt)[1])
    _, deq = llama4_jax.load(src, dtype="float32")
    assert_bitwise(got, jax.jit(quant.quantize_params, static_argnums=1)(deq, fmt))


def test_fp8_to_int4_refusals(maverick_like, quantized_dirs, fp8_checkpoints, tmp_path, capsys):
    """A source with no FP8 weights (or a converted directory) is refused with one line,
    exit 2, nothing written; the format is fixed (no --quantize)."""
    out = str(tmp_path / "out")
    assert _script("fp8_to_int4.py", maverick_like.path, out, "--no-progress") == 2
    _one_line_error(capsys, f"{maverick_like.path} has no FP8 weights (no float8 tensors)", "quantize.py")
    assert _script("fp8_to_int4.py", quantized_dirs["int8"], out, "--no-progress") == 2
    _one_line_error(capsys, "is a converted directory; this script reads a Hugging Face FP8 checkpoint")
    assert _script("fp8_to_int4.py", fp8_checkpoints["fbgemm_fp8"], out, "--group-size", "0", "--no-progress") == 2
    _one_line_error(capsys, "int4 group size must be a positive integer, got 0")
    assert _script("fp8_to_int4.py", fp8_checkpoints["fbgemm_fp8"], out, "--quantize", "int8") == 2
    assert "unrecognized arguments: --quantize int8" in capsys.readouterr().err
    assert not os.path.exists(out)


def _with_tensor(src: str, dst: str, name: str, value) -> str:
    """A copy of single-file HF checkpoint `src` with tensor `name` replaced by `value`."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    sd = load_file(f)
    assert name in sd
    sd[name] = torch.as_tensor(value)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout, scale, tensor, bad_shape", [
    # per-expert Linear: down_proj [D, F] with scale [D, 1]; one row too many
    ("compressed-tensors", "model.layers.1.feed_forward.experts.2.down_proj.weight_scale",
     "model.layers.1.feed_forward.experts.2.down_proj.weight", (46, 1)),
    # fused experts: gate_up_proj [E, D, 2F] with scale [E, 1, 2F]; one channel short
    ("fbgemm_fp8", "model.layers.3.feed_forward.experts.gate_up_proj_scale",
     "model.layers.3.feed_forward.experts.gate_up_proj", (6, 1, 51)),
    # fbgemm's down_proj [E, F, D] has its scale swapped, [E, D, 1]: [E, F, 1] does not fit
    ("fbgemm_fp8", "model.layers.5.feed_forward.experts.down_proj_scale",
     "model.layers.5.feed_forward.experts.down_proj", (6, 26, 1)),
    # a shared-expert Linear [F, D] whose scale has two columns
    ("fbgemm_fp8", "model.layers.7.feed_forward.shared_expert.up_proj.weight_scale",
     "model.layers.7.feed_forward.shared_expert.up_proj.weight", (26, 2)),
])
def test_fp8_scale_that_does_not_fit_its_tensor(fp8_checkpoints, tmp_path, capsys, layout, scale, tensor,
                                                bad_shape):
    """An FP8 scale whose shape does not fit its tensor is refused naming both, from the
    headers alone (before any data is read) by every load and conversion."""
    bad = _with_tensor(fp8_checkpoints[layout], str(tmp_path / "bad"), scale, np.ones(bad_shape, np.float32))
    message = f"scale {scale} has shape {bad_shape}, which does not match FP8 tensor {tensor}"
    reads = []
    with pytest.MonkeyPatch.context() as m:
        real = ck.SafetensorsReader.read
        m.setattr(ck.SafetensorsReader, "read", lambda self, *a, **k: reads.append(a[0]) or real(self, *a, **k))
        for quantize in (None, "fp8", "int4"):
            with pytest.raises(ck.CheckpointError, match=re.escape(message)):
                llama4_jax.load(bad, dtype="float32", quantize=quantize)
    assert reads == []
    out = str(tmp_path / "out")
    for argv in ([], ["--quantize", "fp8"], ["--quantize", "int4"]):
        assert main(["convert", bad, out, *argv, "--no-progress"]) == 2
        _one_line_error(capsys, message)
    assert _script("fp8_to_int4.py", bad, out, "--no-progress") == 2
    _one_line_error(capsys, message)
    assert not os.path.exists(out)


def test_fp8_per_tensor_scale_reads_and_checks(tmp_path):
    """A per-tensor scale (one value, any rank) dequantizes every element by that value,
    as it is kept for fp8; check_fp8_scales lists the FP8 tensors and refuses a scale
    that fits neither per tensor nor axis by axis."""
    import ml_dtypes

    from llama4_jax.checkpoint.quantized import _read_hf

    w = np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.float8_e4m3fn)
    tensors = [("a.weight", (4, 6), w.dtype, lambda: w),
               ("a.weight_scale", (1,), np.dtype(np.float32), lambda: np.array([0.5], np.float32)),
               ("b.weight", (4, 6), w.dtype, lambda: w),
               ("b.weight_scale", (), np.dtype(np.float32), lambda: np.array(0.25, np.float32)),
               ("plain.weight", (4, 6), np.dtype(np.float32), lambda: np.zeros((4, 6), np.float32))]
    os.makedirs(tmp_path / "ok")
    ck.write_safetensors(str(tmp_path / "ok" / "model.safetensors"), tensors)
    reader = ck.SafetensorsReader(str(tmp_path / "ok"))
    assert ck.check_fp8_scales(reader) == ["a.weight", "b.weight"]
    np.testing.assert_array_equal(_read_hf(reader, "a.weight", (slice(1, 3),), None),
                                  w[1:3].astype(np.float32) * 0.5)
    np.testing.assert_array_equal(_read_hf(reader, "b.weight", (), None), w.astype(np.float32) * 0.25)
    os.makedirs(tmp_path / "bad")
    ck.write_safetensors(str(tmp_path / "bad" / "model.safetensors"), tensors[:2] + [
        ("c.weight", (4, 6), w.dtype, lambda: w),
        ("c.weight_scale", (2, 1), np.dtype(np.float32), lambda: np.ones((2, 1), np.float32))])
    with pytest.raises(ck.CheckpointError, match=r"scale c.weight_scale has shape \(2, 1\), which does not match "
                                                 r"FP8 tensor c.weight of shape \(4, 6\)"):
        ck.check_fp8_scales(ck.SafetensorsReader(str(tmp_path / "bad")))


def _restored_tree(qdir: str) -> dict:
    from orbax.checkpoint.experimental import v1 as ocp

    return ocp.load(os.path.join(qdir, "params"))


def _rewritten(qdir: str, dst: str, edit) -> str:
    """A copy of converted directory `qdir` whose stored params tree (restored as it
    is stored: one array per group) went through edit(tree) and was saved again."""
    from orbax.checkpoint.experimental import v1 as ocp

    from llama4_jax.checkpoint.converted import _orbax_context

    tree = _restored_tree(qdir)
    edit(tree)
    os.makedirs(dst)
    for f in os.listdir(qdir):
        if f != "params":
            shutil.copy(os.path.join(qdir, f), dst)
    with _orbax_context():
        ocp.save(os.path.join(dst, "params"), tree)
    return dst


def test_converted_stored_array_that_does_not_match(maverick_like, quantized_dirs, tmp_path, capsys):
    """A converted directory whose stored scale has the wrong shape, whose int4 values
    have the wrong dtype, or which lacks an offset, is refused naming the stored array
    and its weight, before anything is restored: by load (one device or a mesh), by
    convert/verify.py (exit 2), and by `convert` of a converted float directory."""
    from llama4_jax import sharding

    q4 = quantized_dirs["int4"]
    stored = _restored_tree(q4)["params"]["layers"]["layer_1"]["moe"]["down"]
    good_shape = stored["scale"]["group_1"].shape
    bad_shape = good_shape[:-1] + (good_shape[-1] - 1,)
    moe = lambda t: t["params"]["layers"]["layer_1"]["moe"]  # noqa: E731
    cases = [
        (lambda t: moe(t)["down"]["scale"].__setitem__("group_1", np.ones(bad_shape, np.float32)),
         f"stored array params/layers/layer_1/moe/down/scale/group_1 has shape {bad_shape}, expected {good_shape} "
         "(the scale of params/layers/layer_1/moe/down, stored int4 (groups of 16), layer group 1)"),
        (lambda t: moe(t)["up"]["q"].__setitem__("group_0", moe(t)["up"]["q"]["group_0"].astype(np.int8)),
         "stored array params/layers/layer_1/moe/up/q/group_0 has dtype int8, expected uint8 (the q of "
         "params/layers/layer_1/moe/up, stored int4 (groups of 16), layer group 0)"),
        (lambda t: moe(t)["gate"]["offset"].pop("group_1"),
         "the stored params have no array params/layers/layer_1/moe/gate/offset/group_1 (the offset of "
         "params/layers/layer_1/moe/gate"),
    ]
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    for i, (edit, message) in enumerate(cases):
        bad = _rewritten(q4, str(tmp_path / f"bad{i}"), edit)
        with pytest.raises(ck.CheckpointError, match=re.escape(message)):
            llama4_jax.load(bad, dtype=None)
        if i == 0:
            with pytest.raises(ck.CheckpointError, match=re.escape(message)):
                llama4_jax.load(bad, dtype="bfloat16", mesh=mesh)
            capsys.readouterr()
            assert _script("verify.py", maverick_like.path, bad, "--random-prompts", "1") == 2
            _one_line_error(capsys, message)
    # a float converted directory with a weight of the wrong shape: refused before quantizing it
    conv = str(tmp_path / "f32")
    assert main(["convert", maverick_like.path, conv, "--no-progress"]) == 0
    router = _restored_tree(conv)["params"]["layers"]["layer_1"]["moe"]["router"]["group_0"]
    bad = _rewritten(conv, str(tmp_path / "badf"), lambda t: t["params"]["layers"]["layer_1"]["moe"]["router"]
                     .__setitem__("group_0", router[:-1]))
    message = (f"stored array params/layers/layer_1/moe/router/group_0 has shape {router[:-1].shape}, expected "
               f"{router.shape} (params/layers/layer_1/moe/router, layer group 0)")
    capsys.readouterr()
    assert main(["convert", bad, str(tmp_path / "q"), "--quantize", "int8", "--no-progress"]) == 2
    _one_line_error(capsys, message)
    with pytest.raises(ck.CheckpointError, match=re.escape(message)):
        llama4_jax.load(bad, dtype=None, quantize="int8")
    assert not os.path.exists(tmp_path / "q")


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "int4", "fp8", np.int8, "float64", "uint8"])
def test_quantized_directory_refuses_a_non_float_dtype(quantized_dirs, dtype):
    """dtype names the float leaves' dtype; on a quantized directory anything but
    float32 / bfloat16 / float16 (or None) is refused before anything is read, with
    or without a mesh."""
    from llama4_jax import sharding

    q8 = quantized_dirs["int8"]
    message = (f"is stored quantized as int8: dtype={dtype!r} is not a compute dtype; dtype casts only its float "
               "leaves, so pass one of ['float32', 'bfloat16', 'float16'] or None (as stored, float32); the quantized "
               "weights and their scales load as stored")
    with pytest.raises(ck.CheckpointError, match=re.escape(message)):
        llama4_jax.load(q8, dtype=dtype)
    if dtype == "int8":
        with pytest.raises(ck.CheckpointError, match=re.escape(message)):
            llama4_jax.load(q8, dtype=dtype, mesh=sharding.make_mesh("data=2,expert=2,tensor=2"))


def test_load_dtype_of_float_and_quantized_checkpoints(maverick_like, quantized_dirs, capsys):
    """A float checkpoint refuses a weight format given as dtype, pointing at quantize=;
    a quantized directory loaded in bfloat16 casts its float leaves only (its int8
    weights and fp32 scales restored as stored); `convert --dtype int8` is a usage error."""
    import ml_dtypes

    from llama4_jax.config import ConfigError

    for dtype, fmt in (("int8", "int8"), ("float8_e4m3fn", "fp8"), ("int4", "int4")):
        with pytest.raises(ConfigError, match=re.escape(
                f"unsupported dtype {dtype!r}; choose from ['float32', 'bfloat16', 'float16'] (dtype is the float "
                f"leaves' dtype; to load the weights quantized pass quantize={fmt!r})")):
            llama4_jax.load(maverick_like.path, dtype=dtype)
    with pytest.raises(ConfigError, match=r"unsupported dtype 'float64'; choose from \['float32', 'bfloat16', "
                                          r"'float16'\]$"):
        llama4_jax.load(maverick_like.path, dtype="float64")
    _, stored = llama4_jax.load(quantized_dirs["int8"], dtype=None)
    _, got = llama4_jax.load(quantized_dirs["int8"], dtype="bfloat16")
    want = jax.tree_util.tree_map(lambda w: w if quant.is_quantized(w) else np.asarray(w).astype(ml_dtypes.bfloat16),
                                  stored, is_leaf=quant.is_quantized)
    assert_bitwise(got, want)
    assert any(quant.is_quantized(w) for w in jax.tree_util.tree_leaves(got, is_leaf=quant.is_quantized))
    with pytest.raises(SystemExit) as e:
        main(["convert", maverick_like.path, "out", "--dtype", "int8"])
    assert e.value.code == 2 and "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err
