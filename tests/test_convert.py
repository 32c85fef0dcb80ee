"""`llama4-jax convert` safety and completeness: paths that reach the source are refused,
a regular-file DST leaves nothing behind, relative paths work, the source dtype is kept,
and a converted directory serves `llama4-jax generate` like its source."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest

import llama4_jax
from llama4_jax import checkpoint as ck
from llama4_jax.checkpoint.base import _flatten
from llama4_jax.cli import main
from llama4_jax.generate import DEFAULT_MODEL


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
