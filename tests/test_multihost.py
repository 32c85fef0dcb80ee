"""Two processes x 4 CPU devices on loopback (`jax.distributed`, gloo collectives) give the
logits and tokens of one device, on meshes that span both processes.

One launch runs every check (tests/multihost_worker.py): `load(mesh=)` (each process
reads only its devices' slices: counted), `forward` on each mesh, and `generate` on
the mesh whose batch axis spans both processes (results gathered from both). Tolerance: logits within 5e-5, as for a one-process mesh against
one device (tests/test_sharding.py: partitioned matmuls and collectives sum in another
order).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import llama4_jax
from tests.multihost_worker import GENERATE_MESH, MESHES, inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Scout-like (top-1, qk norm, chunk 8, 8 layers: two scanned groups of three chunked
    layers and a global one) with 8 experts, so expert=4 splits them."""
    import dataclasses

    import jax

    from llama4_jax.checkpoint import save_hf
    from llama4_jax.config import Llama4Config
    from tests.hf_models import TEXT

    config = Llama4Config(text=dataclasses.replace(TEXT["scout_like"], num_local_experts=8, hidden_size=64))
    assert config.text.num_hidden_layers == 8
    path = str(tmp_path_factory.mktemp("multihost") / "ckpt")
    save_hf(config, llama4_jax.init_params(config, jax.random.key(3)), path)
    return path


def test_two_processes_equal_one(checkpoint, tmp_path):
    out = str(tmp_path / "result.json")
    addr = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the worker sets its devices
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", addr, str(i), checkpoint, out],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = json.load(open(out))
    # The reference: one device of this process (the meshes' programs equal it within
    # the sharding tests' tolerance; one reference instead of one per mesh halves the
    # compilations this process makes).
    config, params = llama4_jax.load(checkpoint, dtype="float32")
    ids, prompts = inputs(config.text.vocab_size)
    ref = np.asarray(llama4_jax.forward(config, params, ids))
    tokens = [o.token_ids for o in llama4_jax.generate(config, params, prompts, max_new_tokens=5, batch_size=4)]
    for spec in MESHES:
        np.testing.assert_allclose(np.asarray(got[spec]), ref, atol=5e-5, rtol=0, err_msg=spec)
    assert got[GENERATE_MESH + "/tokens"] == tokens
    # Each process reads only its devices' slices: on expert=4,tensor=2 (experts 0-1 on
    # process 0, 2-3 on process 1) each reads half the experts, not the checkpoint.
    total = os.path.getsize(os.path.join(checkpoint, "model.safetensors"))
    for p_bytes in got["expert=4,tensor=2/bytes_read"]:
        assert 0 < p_bytes < 0.75 * total, (p_bytes, total)


def test_start_up_arguments_are_checked(tmp_path, capsys):
    from llama4_jax import distributed
    from llama4_jax.cli import main

    with pytest.raises(ValueError, match="coordinator address"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "1+1="}\n')
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--num-processes", "2",
            "--process-id", "0"]
    assert main(argv) == 2
    assert "multi-host start-up failed: several processes need a coordinator address" in capsys.readouterr().err
