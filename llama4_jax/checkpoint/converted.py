"""Converted checkpoints (orbax), and `load_checkpoint` over either kind of directory.

`convert_hf_to_orbax` writes `config.json` (Hugging Face format), `llama4_jax.json`
(format marker) and `params/`, an orbax checkpoint. Scanned parameters are stored as
one array per group (`.../<leaf>/group_<g>`), each the size of one HF tensor, written
with orbax partial saves, so conversion holds about one HF tensor in host memory no
matter how large the model is (measured: 1.2x the largest tensor, benchmarks/convert.py).
`load_orbax` restores the groups straight into the target shardings and stacks them
on device. `convert_orbax_to_hf` exports back through `save_hf`; it first restores the
whole model onto the default device.

orbax is imported by the functions that use it, not at module import: it adds ~0.7 s
to every start-up that only reads Hugging Face directories.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os

import jax

from ..config import load_config, to_hf as config_to_hf
from ..model.text import abstract_params
from .base import CheckpointError, _default_sharding, _get, _np_dtype, _progress, _set
from .hf import (_check_consumed, _jitted, _piece_sharding, _read_leaf_region, copy_side_files, load_hf, save_hf,
                 source_dtype)
from .names import plan_leaves
from .quantized import read_quantization
from .safetensors_io import SafetensorsReader


FORMAT_FILE = "llama4_jax.json"
FORMAT_VERSION = 1


def is_converted(path: str) -> bool:
    """Whether `path` is a converted (orbax) checkpoint directory written by this library."""
    return os.path.isfile(os.path.join(path, FORMAT_FILE))


def _group_key(g: int) -> str:
    return f"group_{g}"


def _orbax_context():
    """Orbax options for our converted checkpoints.

    No zstd: trained bf16 weights compress by only ~10%, and compressing costs more
    time than writing. Chunks of <= 16 MiB bound orbax's per-write buffers and let
    each device read only its chunks on restore. No defensive copy of the host
    arrays (orbax's default doubles the memory of every batch).
    """
    from orbax.checkpoint.experimental import v1 as ocp

    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = 16 << 20
    # The batch is ours and not touched while it is written: no defensive copy.
    ctx.memory.deepcopy_host_arrays = False
    return ctx


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere).

    tensorstore's writer threads allocate their chunk buffers from per-thread malloc
    arenas, which glibc keeps after they are freed; without a trim, resident memory
    creeps up by a few chunks per batch over a long conversion.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def convert_hf_to_orbax(src: str, dst: str, *, dtype: str | None = None, progress: bool = False,
                        batch_bytes: int = 64 << 20) -> None:
    """Stream an HF checkpoint into a converted directory at `dst` (which must not exist).

    Writes `config.json`, `llama4_jax.json` and `params/` (orbax). Tensors are read one
    at a time and handed to orbax partial saves in batches of at most `batch_bytes`
    (or one tensor, if larger), so host memory stays about one tensor. dtype: None
    keeps the source's dtype (`source_dtype`: an fp32 checkpoint stays fp32, FP8 ones
    become the dtype their config names). The tokenizer, chat template, processor and
    generation config files are copied across (`copy_side_files`).
    """
    from orbax.checkpoint.experimental import v1 as ocp

    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint path does not exist: {src}")
    if os.path.exists(dst):
        raise FileExistsError(f"destination already exists: {dst}")
    src, dst = os.path.abspath(src), os.path.abspath(dst)  # orbax refuses relative paths
    config = load_config(src)
    quant = read_quantization(src)
    reader = SafetensorsReader(src)
    dtype = dtype or source_dtype(src, reader)
    np_dtype = _np_dtype(dtype)
    leaves = plan_leaves(config, abstract_params(config, dtype=dtype), reader.tensors)
    consumed: set[str] = set()
    os.makedirs(dst)
    pdir = os.path.join(dst, "params")
    total = sum(math.prod(lf.shape) * np_dtype.itemsize for lf in leaves)
    batch: dict = {}
    nbatch = 0

    def flush():
        nonlocal batch, nbatch
        if batch:
            with _orbax_context():
                ocp.partial.save(pdir, batch)
        batch, nbatch = {}, 0
        _release_freed_memory()

    with _progress(total, "convert", progress) as bar:
        for lf in leaves:
            piece_bytes = math.prod(lf.shape[1:] if lf.stacked else lf.shape) * np_dtype.itemsize
            for g, entry in enumerate(lf.sources):
                if nbatch and nbatch + piece_bytes > batch_bytes:
                    flush()  # before reading, so the batch and the next piece never coexist
                x = _read_leaf_region(reader, lf, entry, (), np_dtype, consumed)
                _set(batch, lf.path + ((_group_key(g),) if lf.stacked else ()), x)
                nbatch += x.nbytes
                bar.update(x.nbytes)
                del x
        flush()
    _check_consumed(reader, consumed)
    with _orbax_context():
        ocp.partial.finalize(pdir)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config_to_hf(config), "torch_dtype": dtype}, f, indent=2)
    copy_side_files(src, dst)
    with open(os.path.join(dst, FORMAT_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "dtype": np_dtype.name, "source": src,
                   "dequantized_from": (quant or {}).get("quant_method")}, f, indent=2)


def _read_format(path: str) -> dict:
    with open(os.path.join(path, FORMAT_FILE)) as f:
        fmt = json.load(f)
    if fmt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: converted format version {fmt.get('format_version')!r} is not "
                              f"supported (this library reads version {FORMAT_VERSION})")
    return fmt


def load_orbax(path: str, *, dtype: str | None = None, shardings=None):
    """Restore a converted directory into (config, params) on device.

    dtype: None keeps the stored dtype; else the parameters are cast by orbax on read.
    shardings: as for `load_hf`. Each stored group lands directly in its device
    sharding; the groups of a scanned leaf are then stacked on device, one leaf at a
    time (transient device memory: one leaf).
    """
    from orbax.checkpoint.experimental import v1 as ocp

    path = os.path.abspath(path)  # orbax refuses relative paths
    fmt = _read_format(path)
    config = load_config(path)
    dt = _np_dtype(dtype or fmt["dtype"])
    leaves = plan_leaves(config, abstract_params(config, dtype=dt.name), ())
    target: dict = {}
    final_shardings = {}
    for lf in leaves:
        s = _get(shardings, lf.path) if shardings is not None else None
        s = s if s is not None else _default_sharding()
        final_shardings[lf.path] = s
        if lf.stacked:
            ps = _piece_sharding(s)
            for g in range(lf.shape[0]):
                _set(target, lf.path + (_group_key(g),), jax.ShapeDtypeStruct(lf.shape[1:], dt, sharding=ps))
        else:
            _set(target, lf.path, jax.ShapeDtypeStruct(lf.shape, dt, sharding=s))
    try:
        stored = ocp.load(os.path.join(path, "params"), target)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore the converted params: {e}") from None
    params: dict = {}
    for lf in leaves:
        if lf.stacked:
            node = _get(stored, lf.path)
            pieces = [node.pop(_group_key(g)) for g in range(lf.shape[0])]
            arr = _jitted("stack", final_shardings[lf.path])(*pieces)
            del pieces
        else:
            arr = _get(stored, lf.path)
        _set(params, lf.path, arr)
    return config, params


def convert_orbax_to_hf(src: str, dst: str, *, dtype: str | None = None, progress: bool = False,
                        max_shard_bytes: int = 5 << 30) -> None:
    """Export a converted directory back to Hugging Face safetensors at `dst`."""
    config, params = load_orbax(src, dtype=dtype)
    save_hf(config, params, dst, max_shard_bytes=max_shard_bytes, progress=progress)
    copy_side_files(src, dst)
    del params
    jax.clear_caches()


def load_checkpoint(path: str, *, dtype: str = "bfloat16", shardings=None, progress: bool = False):
    """(config, params) from either a Hugging Face directory or a converted one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if is_converted(path):
        return load_orbax(path, dtype=dtype, shardings=shardings)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face or converted checkpoint")
    return load_hf(path, dtype=dtype, shardings=shardings, progress=progress)
