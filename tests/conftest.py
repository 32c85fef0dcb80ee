"""Test setup: 8 fake CPU devices and exact fp32 matmuls, before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["LLAMA4_JAX_COMPILE_CACHE"] = ""  # the CLI's tests compile; they never write the user's cache

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def scout_like(tmp_path_factory):
    return hf_models.build("scout_like", tmp_path_factory)


@pytest.fixture(scope="session")
def maverick_like(tmp_path_factory):
    return hf_models.build("maverick_like", tmp_path_factory)
