"""`llama4-jax convert` safety and completeness: paths that reach the source are refused,
a regular-file DST leaves nothing behind, relative paths work, the source dtype is kept,
and a converted directory serves `llama4-jax generate` like its source."""

from __future__ import annotations

import json
import os
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
