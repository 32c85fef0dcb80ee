"""What every checkpoint module shares: the error type, nested-dict paths, dtypes.

Parameter trees are nested dicts addressed by tuples of keys (`('params', 'layers',
'layer_0', 'attn', 'q')`); `_get` / `_set` / `_flatten` walk them. Parameter dtypes
are named by string ("float32" | "bfloat16" | "float16", `_np_dtype`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from ..config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked."""


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _flatten(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


_DTYPES = ("float32", "bfloat16", "float16")


def _np_dtype(dtype) -> np.dtype:
    """numpy dtype for a supported parameter dtype name (bfloat16 via ml_dtypes)."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose from {list(_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
