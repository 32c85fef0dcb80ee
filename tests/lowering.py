"""Lowering for TPU on a host without one, shared by the kernel, MoE and sharding tests."""

import pytest

from llama4_jax.kernels import platform


def lower_for_tpu_or_skip(fn, *args, **kwargs):
    """`platform.lower_for_tpu(fn, *args, **kwargs)`, or skip the test naming why this jax
    cannot lower Pallas TPU kernels without a chip (any other failure is raised)."""
    try:
        return platform.lower_for_tpu(fn, *args, **kwargs)
    except Exception as e:  # noqa: BLE001
        reason = platform.tpu_lowering_unsupported(e)
        if reason:
            pytest.skip(f"cannot lower for tpu without a chip: {reason}")
        raise
