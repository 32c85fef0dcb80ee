"""Tree comparisons shared by the checkpoint and quantization tests."""

import jax
import numpy as np


def assert_bitwise(got, want):
    """Same tree (QuantizedWeight static fields included), same dtypes, shapes and bits."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), jax.tree_util.keystr(path)
