"""Test setup: 8 fake CPU devices and exact fp32 matmuls, before jax is imported."""

import atexit
import gc
import os
import shutil
import tempfile

# LLVM at -O0: the suite is mostly compilation of tiny programs, and what the tests check
# (values, HLO after XLA's passes, which still all run) does not depend on how well LLVM
# optimises the machine code. Measured: 37 compilations of a continuous-batching test
# 16 s -> 12 s; the whole suite 24.6 -> 19.1 min on 2 cores. The tiny models' logits
# (|x| ~4) move by up to 3.5e-6 against the default level (fp32 rounding of the
# generated code), inside the parity tolerance (1e-4); tests comparing two of our paths
# compile both at the same level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["LLAMA4_JAX_COMPILE_CACHE"] = ""  # the CLI's tests compile; they never write the user's cache
# One persistent compilation cache for the run: made by the first process that imports
# this file (pytest itself, before it starts the xdist workers) and inherited through the
# environment by the workers and every process a test starts (CLI runs, notebooks, the
# multi-host pair). A program compiled again (after a module's `jax.clear_caches()`, in
# another worker, in a subprocess) is then loaded, not compiled. Removed when that first
# process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama4_jax_tests_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from llama4_jax import engine  # noqa: E402
from tests import hf_models  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_executables():
    """After each test module, drop its compiled executables (the engine's and jax's).
    XLA:CPU maps memory regions for each executable (~12 for a small function,
    hundreds for a model's); a worker that keeps every executable of its share of the
    suite passes Linux's vm.max_map_count (65530) and dies in a later compile (seen as
    a segfault or abort at ~85% of the suite). The engine also bounds its own
    (`engine.map_budget`)."""
    yield
    engine.COMPILED.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def scout_like(tmp_path_factory):
    return hf_models.build("scout_like", tmp_path_factory)


@pytest.fixture(scope="session")
def maverick_like(tmp_path_factory):
    return hf_models.build("maverick_like", tmp_path_factory)
