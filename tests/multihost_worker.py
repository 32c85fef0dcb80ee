"""One process of the two-process test (tests/test_multihost.py); not a test itself.

    python -m tests.multihost_worker COORDINATOR PROCESS_ID CHECKPOINT OUT_JSON

4 CPU devices per process; meshes over both processes' 8 devices. Process 0 writes
the logits of each mesh, the tokens generated on GENERATE_MESH and the checkpoint
bytes each process read while loading to OUT_JSON.
"""

import os
import sys

if __name__ == "__main__":  # the test imports MESHES and inputs from here: leave its devices alone
    # The suite's other XLA flags (conftest's), with 4 devices instead of its 8.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import llama4_jax  # noqa: E402
from llama4_jax import distributed, sharding  # noqa: E402

MESHES = ("data=2,expert=4", "expert=4,tensor=2")
# generate runs on the mesh whose batch axis spans the processes: each decodes its own
# rows and the completions are gathered from both (one mesh: its compilations are most
# of the test's time).
GENERATE_MESH = "data=2,expert=4"


def inputs(vocab: int):
    ids = np.random.default_rng(0).integers(3, vocab, (4, 19)).astype(np.int32)
    return ids, [row[:7 + 2 * i].tolist() for i, row in enumerate(ids)]


def count_reads():
    """Record the distinct checkpoint byte ranges this process reads (wraps the loader's
    one read primitive; a replicated tensor is read once per local device, counted once)."""
    from llama4_jax.checkpoint import safetensors_io

    ranges = set()
    read = safetensors_io._pread_into

    def counted(fd, offset, out, file):
        ranges.add((file, offset, out.nbytes))
        read(fd, offset, out, file)

    safetensors_io._pread_into = counted
    return ranges


def main(coordinator, process_id, path, out):
    distributed.initialize(coordinator, 2, int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    counter = count_reads()
    result = {}
    for spec in MESHES:
        mesh = sharding.make_mesh(spec)
        counter.clear()
        config, params = llama4_jax.load(path, dtype="float32", mesh=mesh)
        read = sum(n for _, _, n in counter)
        from jax.experimental import multihost_utils

        result[spec + "/bytes_read"] = np.asarray(multihost_utils.process_allgather(np.int64(read))).tolist()
        ids, prompts = inputs(config.text.vocab_size)
        logits = llama4_jax.forward(config, params, ids)
        result[spec] = np.asarray(multihost_utils.process_allgather(logits, tiled=True)).tolist()
        if spec == GENERATE_MESH:
            outs = llama4_jax.generate(config, params, prompts, max_new_tokens=5, batch_size=4)
            result[spec + "/tokens"] = [o.token_ids for o in outs]
    if distributed.is_main_process():
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
