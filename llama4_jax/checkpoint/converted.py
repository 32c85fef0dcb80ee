"""Converted checkpoints (orbax), and `load_checkpoint` over either kind of directory.

`convert_hf_to_orbax` writes `config.json` (Hugging Face format), `llama4_jax.json`
(format marker) and `params/`, an orbax checkpoint. Scanned parameters are stored as
one array per group (`.../<leaf>/group_<g>`), each the size of one HF tensor, written
with orbax partial saves, so conversion holds about one HF tensor in host memory no
matter how large the model is (measured: 1.2x the largest tensor, benchmarks/convert.py).
`load_orbax` restores the groups straight into the target shardings and stacks them
on device. `convert_orbax_to_hf` exports back through `save_hf`; it first restores the
whole model onto the default device.

Quantized directories (`convert_hf_to_orbax(quantize=)`, `quantize_converted`) store
each quantized weight's arrays the same way, `.../<leaf>/<q|scale|offset>/group_<g>`,
and `llama4_jax.json` names the format (`"quantize": {"format": "int4", "group_size":
128}`, format version 2); they restore as stored, bitwise, into the tree of
`abstract_params(quantize=)`. A float directory can also be quantized while it is
restored (`load_orbax(quantize=)`), one stored group at a time.

orbax is imported by the functions that use it, not at module import: it adds ~0.7 s
to every start-up that only reads Hugging Face directories.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os

import jax
import numpy as np

from .. import quant
from ..config import ConfigError, load_config, to_hf as config_to_hf
from ..model.text import abstract_params
from .base import _DTYPES, CheckpointError, _default_sharding, _get, _np_dtype, _progress, _set
from .hf import (_PARTS, _check_consumed, _jitted, _nbytes, _part_sharding, _piece_sharding, _place_quantized,
                 _quantized_piece, _read_leaf_region, copy_side_files, load_hf, save_hf, source_dtype)
from .names import Leaf, plan_leaves
from .quantized import check_fp8_scales, quantize_piece, read_quantization
from .safetensors_io import SafetensorsReader


FORMAT_FILE = "llama4_jax.json"
FORMAT_VERSION = 1  # float weights
QUANTIZED_FORMAT_VERSION = 2  # quantized decoder matrices ("quantize" names the format); older readers refuse it


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


def _stored_format(path: str, info: dict) -> quant.QuantFormat | None:
    """The weight format a converted directory stores (None: float weights)."""
    q = info.get("quantize")
    if q is None:
        return None
    try:
        return quant.QuantFormat(q["format"], q.get("group_size") or quant.DEFAULT_GROUP_SIZE)
    except (KeyError, TypeError, AttributeError, quant.QuantError) as e:
        raise CheckpointError(f"{path}: {FORMAT_FILE} has an invalid quantize entry {q!r} ({e})") from None


def describe_format(fmt: quant.QuantFormat | None) -> str:
    """'int4 (groups of 128)', 'int8', 'fp8', or 'float' for None."""
    if fmt is None:
        return "float"
    return f"{fmt.name} (groups of {fmt.group_size})" if fmt.name == "int4" else fmt.name


def _resolve_format(path: str, stored: quant.QuantFormat | None, quantize, group_size=None):
    """The format a load of a directory storing `stored` produces when asked `quantize`.

    A quantized directory loads as it is stored: quantize None or its own format (a
    group size, if given, must match). Quantizing it again to another format would
    quantize already rounded weights, so that is refused, pointing at the float source.
    """
    fmt = quant.as_format(quantize, group_size)
    if stored is None:
        return fmt
    if fmt is None:
        return stored
    explicit_group = group_size is not None or isinstance(quantize, quant.QuantFormat)
    if fmt.name != stored.name or (explicit_group and fmt.group_size != stored.group_size):
        raise CheckpointError(f"{path} is stored quantized as {describe_format(stored)}; it loads as stored "
                              f"(quantize=None or {stored.name!r}), not as {describe_format(fmt)}: quantize the "
                              "float checkpoint it was made from instead")
    return stored


def load_format(path: str, quantize=None, group_size: int | None = None) -> quant.QuantFormat | None:
    """The weight format `load_checkpoint(path, quantize=...)` gives: the stored one for a
    quantized converted directory (asking another raises CheckpointError), else
    `quantize` (None: float weights). Reads only the format marker."""
    if os.path.isdir(path) and is_converted(path):
        return _resolve_format(path, _stored_format(path, _read_format(path)), quantize, group_size)
    return quant.as_format(quantize, group_size)


def _format_named_by(dtype) -> str | None:
    """The weight format a mistaken load `dtype` names ('int8', np.int8 -> 'int8';
    'int4' -> 'int4'; 'fp8', 'float8_e4m3fn' -> 'fp8'), or None."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        return None
    name = name.lower()
    if name in ("int8", "int4", "uint4"):
        return "int8" if name == "int8" else "int4"
    if name == "fp8" or name.startswith("float8"):
        return "fp8"
    return None


def check_load_dtype(path: str, dtype) -> None:
    """Refuse a load `dtype` that is not a compute dtype, before anything is read.

    `dtype` is the dtype of the float leaves: float32, bfloat16 or float16 (names,
    numpy or jax dtypes), or None for a converted directory's stored dtype. It never
    selects a weight format (that is `quantize=`): the int8 / int4 / fp8 weights and
    fp32 scales of a quantized directory load as stored whatever `dtype` is, and only
    its float leaves (embeddings, LM head, norms, router, vision tower) are cast. On a
    quantized directory another dtype raises CheckpointError; on a float checkpoint,
    ConfigError ("unsupported dtype", pointing at `quantize=` when the dtype names a
    weight format).
    """
    converted = os.path.isdir(path) and is_converted(path)
    if dtype is None and converted:
        return
    try:
        _np_dtype(dtype)
        return
    except ConfigError as e:
        error = e
    info = _read_format(path) if converted else {}
    stored = _stored_format(path, info)
    if stored is not None:
        raise CheckpointError(
            f"{path} is stored quantized as {describe_format(stored)}: dtype={dtype!r} is not a compute dtype; "
            f"dtype casts only its float leaves, so pass one of {list(_DTYPES)} or None (as stored, "
            f"{info.get('dtype')}); the quantized weights and their scales load as stored")
    fmt = _format_named_by(dtype)
    if fmt is not None:
        raise ConfigError(f"{error} (dtype is the float leaves' dtype; to load the weights quantized pass "
                          f"quantize={fmt!r})")
    raise error


def _check_stored(path: str, pdir: str, leaves, stored_target, stored_fmt) -> None:
    """Every array a restore of `pdir` reads, against the tree the config and the stored
    format describe (`stored_target`: abstract params, quantized as stored), from the
    checkpoint's metadata alone: a missing array, a wrong shape, or a quantized part
    (q / scale / offset) of the wrong dtype raises CheckpointError naming the stored
    array and the weight it belongs to. Float arrays may be stored in any float dtype
    (they are cast on restore)."""
    from orbax.checkpoint.experimental import v1 as ocp

    try:
        meta = ocp.metadata(pdir).metadata
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the converted params' metadata: {e}") from None
    for lf in leaves:
        node = _get(stored_target, lf.path)
        for g in range(len(lf.sources)):
            for key, part in _piece_keys(lf, node, g):
                want = node if part is None else getattr(node, part)
                shape = tuple(want.shape[1:] if lf.stacked else want.shape)
                what = "/".join(lf.path) if part is None else (
                    f"the {part} of {'/'.join(lf.path)}, stored {describe_format(stored_fmt)}")
                if lf.stacked:
                    what += f", layer group {g}"
                try:
                    got = _get(meta, key)
                    got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
                except (KeyError, TypeError, AttributeError):
                    raise CheckpointError(f"{path}: the stored params have no array {'/'.join(key)} ({what}, "
                                          f"shape {shape})") from None
                if got_shape != shape:
                    raise CheckpointError(f"{path}: stored array {'/'.join(key)} has shape {got_shape}, expected "
                                          f"{shape} ({what})")
                if part is not None and got_dtype != np.dtype(want.dtype):
                    raise CheckpointError(f"{path}: stored array {'/'.join(key)} has dtype {got_dtype}, expected "
                                          f"{np.dtype(want.dtype)} ({what})")


def check_converted(path: str) -> None:
    """Check a converted directory's format marker, config and every stored array's
    shape (and the quantized parts' dtypes) against what they describe, from metadata
    alone (`_check_stored`); raises CheckpointError naming what does not match."""
    path = os.path.abspath(path)
    stored = _stored_format(path, _read_format(path))
    config = load_config(path)
    abstract = abstract_params(config, dtype="float32")
    _check_stored(path, os.path.join(path, "params"), plan_leaves(config, abstract, ()),
                  quant.quantize_params(abstract, stored), stored)


def _piece_keys(lf: Leaf, node, g: int) -> list[tuple[tuple[str, ...], str | None]]:
    """Where group g of leaf `lf` is stored: (path, part) per array; part None for a
    float leaf, else "q" / "scale" / "offset" of its QuantizedWeight."""
    suffix = (_group_key(g),) if lf.stacked else ()
    if not quant.is_quantized(node):
        return [(lf.path + suffix, None)]
    return [(lf.path + (p,) + suffix, p) for p in _PARTS if getattr(node, p) is not None]


def _write_params(pdir: str, leaves, target, produce, *, progress: bool, batch_bytes: int, desc: str) -> None:
    """Write every leaf's groups into the orbax checkpoint `pdir` with partial saves.

    produce(lf, g) -> the host array (float leaf) or QuantizedWeight of numpy arrays
    (quantized leaf) of group g. Batches hold at most `batch_bytes` (or one group).
    """
    from orbax.checkpoint.experimental import v1 as ocp

    batch: dict = {}
    nbatch = 0

    def flush():
        nonlocal batch, nbatch
        if batch:
            with _orbax_context():
                ocp.partial.save(pdir, batch)
        batch, nbatch = {}, 0
        _release_freed_memory()

    total = sum(_nbytes(_get(target, lf.path)) for lf in leaves)
    with _progress(total, desc, progress) as bar:
        for lf in leaves:
            node = _get(target, lf.path)
            piece_bytes = _nbytes(node) // (lf.shape[0] if lf.stacked else 1)
            for g in range(len(lf.sources)):
                if nbatch and nbatch + piece_bytes > batch_bytes:
                    flush()  # before reading, so the batch and the next piece never coexist
                x = produce(lf, g)
                for key, part in _piece_keys(lf, node, g):
                    a = x if part is None else getattr(x, part)
                    _set(batch, key, a)
                    nbatch += a.nbytes
                    bar.update(a.nbytes)
                del x
        flush()
    with _orbax_context():
        ocp.partial.finalize(pdir)


def _write_side(dst: str, config, dtype: str, fmt, info: dict, side_src: str | None) -> None:
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config_to_hf(config), "torch_dtype": dtype}, f, indent=2)
    if side_src is not None:
        copy_side_files(side_src, dst)
    quantized = {"format_version": QUANTIZED_FORMAT_VERSION, "quantize": {
        "format": fmt.name, "group_size": fmt.group_size if fmt.name == "int4" else None}} if fmt else {}
    with open(os.path.join(dst, FORMAT_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "dtype": _np_dtype(dtype).name, **info, **quantized}, f,
                  indent=2)


def convert_hf_to_orbax(src: str, dst: str, *, dtype: str | None = None, progress: bool = False,
                        batch_bytes: int = 64 << 20, quantize=None) -> None:
    """Stream an HF checkpoint into a converted directory at `dst` (which must not exist).

    Writes `config.json`, `llama4_jax.json` and `params/` (orbax). Tensors are read one
    at a time and handed to orbax partial saves in batches of at most `batch_bytes`
    (or one tensor, if larger), so host memory stays about one tensor. dtype: None
    keeps the source's dtype (`source_dtype`: an fp32 checkpoint stays fp32, FP8 ones
    become the dtype their config names). quantize: None or a format (see
    `llama4_jax.quant`): the decoder layers' matrices are quantized as they are read,
    exactly as `load(src, quantize=)` quantizes them, and stored quantized (the
    tree of `abstract_params(quantize=)`; `load(dst)` restores it as it is); FP8
    weights kept as stored with quantize="fp8". The tokenizer, chat template,
    processor and generation config files are copied across (`copy_side_files`).
    """
    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint path does not exist: {src}")
    if os.path.exists(dst):
        raise FileExistsError(f"destination already exists: {dst}")
    src, dst = os.path.abspath(src), os.path.abspath(dst)  # orbax refuses relative paths
    fmt = quant.as_format(quantize)
    config = load_config(src)
    src_quant = read_quantization(src)
    reader = SafetensorsReader(src)
    check_fp8_scales(reader)
    dtype = dtype or source_dtype(src, reader)
    np_dtype = _np_dtype(dtype)
    abstract = abstract_params(config, dtype=dtype)
    target = quant.quantize_params(abstract, fmt)
    leaves = plan_leaves(config, abstract, reader.tensors)
    consumed: set[str] = set()

    def produce(lf, g):
        if quant.is_quantized(_get(target, lf.path)):
            return _quantized_piece(reader, lf, lf.sources[g], fmt, consumed)
        return _read_leaf_region(reader, lf, lf.sources[g], (), np_dtype, consumed)

    os.makedirs(dst)
    _write_params(os.path.join(dst, "params"), leaves, target, produce, progress=progress, batch_bytes=batch_bytes,
                  desc="convert")
    _check_consumed(reader, consumed)
    method = (src_quant or {}).get("quant_method")
    _write_side(dst, config, dtype, fmt, {"source": src, "dequantized_from": method if fmt is None else None,
                                          "source_quantization": method}, src)


def quantize_converted(src: str, dst: str, quantize, *, group_size: int | None = None, dtype: str | None = None,
                       progress: bool = False, batch_bytes: int = 64 << 20) -> None:
    """A converted directory of float weights -> a new converted directory at `dst` with
    the decoder layers' matrices quantized from their stored values (one stored group
    at a time); the other weights are copied in `dtype` (None: as stored). A
    directory already quantized is refused.
    """
    if os.path.exists(dst):
        raise FileExistsError(f"destination already exists: {dst}")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    info = _read_format(src)
    if _stored_format(src, info) is not None:
        stored = describe_format(_stored_format(src, info))
        raise CheckpointError(f"{src} is already quantized as {stored}; quantize the float checkpoint it was made "
                              "from instead")
    fmt = quant.as_format(quantize, group_size)
    if fmt is None:
        raise CheckpointError("quantize_converted needs a format: 'int8', 'int4' or 'fp8'")
    config = load_config(src)
    dt = _np_dtype(dtype or info["dtype"])
    abstract = abstract_params(config, dtype=dt.name)
    target = quant.quantize_params(abstract, fmt)  # = abstract_params(quantize=)
    leaves = plan_leaves(config, abstract, ())
    _check_stored(src, os.path.join(src, "params"), leaves, abstract, None)
    pieces = _StoredPieces(os.path.join(src, "params"), leaves, [
        (lf, g, np.float32 if quant.is_quantized(_get(target, lf.path)) else dt)
        for lf in leaves for g in range(len(lf.sources))], batch_bytes)

    def produce(lf, g):
        if not quant.is_quantized(_get(target, lf.path)):
            return pieces.read(lf, g)
        return _quantize_stored(pieces, lf, g, fmt)

    os.makedirs(dst)
    _write_params(os.path.join(dst, "params"), leaves, target, produce, progress=progress, batch_bytes=batch_bytes,
                  desc="quantize")
    _write_side(dst, config, dt.name, fmt, {k: info[k] for k in ("source", "dequantized_from",
                                                                  "source_quantization") if k in info}, src)


def _read_format(path: str) -> dict:
    with open(os.path.join(path, FORMAT_FILE)) as f:
        fmt = json.load(f)
    if fmt.get("format_version") not in (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
        raise CheckpointError(f"{path}: converted format version {fmt.get('format_version')!r} is not "
                              f"supported (this library reads versions {FORMAT_VERSION} and "
                              f"{QUANTIZED_FORMAT_VERSION})")
    return fmt


class _StoredPieces:
    """Single groups of a converted checkpoint's leaves, restored onto the host in the
    order they will be asked for (`wanted`: (leaf, group, dtype)), for quantizing a
    float directory without restoring all of it. Each orbax load restores the next
    groups up to `batch_bytes` (at least one), every other array a placeholder: an
    orbax load costs ~50 ms however small, and host memory stays about one batch."""

    def __init__(self, pdir: str, leaves, wanted, batch_bytes: int = 64 << 20):
        from orbax.checkpoint.experimental import v1 as ocp

        self.pdir, self.skeleton, self.batch_bytes = pdir, {}, batch_bytes
        for lf in leaves:
            for g in range(len(lf.sources)):
                _set(self.skeleton, self._key(lf, g), ocp.PLACEHOLDER)
        self.wanted = [(lf, g, np.dtype(dt)) for lf, g, dt in wanted]
        self.index = {self._key(lf, g): i for i, (lf, g, _) in enumerate(self.wanted)}
        self.cache: dict = {}
        self.host = _host_sharding()

    @staticmethod
    def _key(lf: Leaf, g: int) -> tuple[str, ...]:
        return lf.path + ((_group_key(g),) if lf.stacked else ())

    def read(self, lf: Leaf, g: int) -> np.ndarray:
        from orbax.checkpoint.experimental import v1 as ocp

        key = self._key(lf, g)
        if key not in self.cache:
            batch, size = [], 0
            for lf2, g2, dt in self.wanted[self.index[key]:]:
                shape = lf2.shape[1:] if lf2.stacked else lf2.shape
                n = math.prod(shape) * dt.itemsize
                if batch and size + n > self.batch_bytes:
                    break
                batch.append((self._key(lf2, g2), jax.ShapeDtypeStruct(shape, dt, sharding=self.host)))
                size += n
            for k, sds in batch:
                _set(self.skeleton, k, sds)
            try:
                out = ocp.load(self.pdir, self.skeleton)
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise CheckpointError(f"{self.pdir}: cannot restore {'/'.join(key)}: {e}") from None
            finally:
                for k, _ in batch:
                    _set(self.skeleton, k, ocp.PLACEHOLDER)
            self.cache = {k: np.asarray(_get(out, k)) for k, _ in batch}
        return self.cache.pop(key)


def _quantize_stored(pieces: _StoredPieces, lf: Leaf, g: int, fmt) -> quant.QuantizedWeight:
    """Group g of a stored float leaf, quantized (from its stored values in fp32)."""
    n_in, n_out = quant.quantizable(lf.path)
    x = pieces.read(lf, g)
    return quantize_piece(lambda region: x[region], x.shape, fmt, n_in, n_out)


def _host_sharding():
    try:
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        return _default_sharding()


def load_orbax(path: str, *, dtype: str | None = None, shardings=None, quantize=None, group_size: int | None = None):
    """Restore a converted directory into (config, params) on device.

    dtype: None keeps the stored dtype; else the float parameters are cast by orbax on
    read (quantized weights and their fp32 scales are restored as stored); a dtype
    that is not float32 / bfloat16 / float16 is refused (`check_load_dtype`).
    Every stored array's shape is checked against the config's tree before anything is
    restored (`_check_stored`: CheckpointError naming the array, e.g. a scale that
    does not match its weight).
    shardings: as for `load_hf`. Each stored group lands directly in its device
    sharding; the groups of a scanned leaf are then stacked on device, one leaf at a
    time (transient device memory: one leaf).
    quantize: a directory stored quantized is restored as it is (see `load_format`);
    a float one is quantized while restoring, one stored group at a time.
    """
    from orbax.checkpoint.experimental import v1 as ocp

    path = os.path.abspath(path)  # orbax refuses relative paths
    check_load_dtype(path, dtype)
    info = _read_format(path)
    config = load_config(path)
    stored = _stored_format(path, info)
    fmt = _resolve_format(path, stored, quantize, group_size)
    dt = _np_dtype(dtype or info["dtype"])
    abstract = abstract_params(config, dtype=dt.name)
    target = quant.quantize_params(abstract, fmt)
    leaves = plan_leaves(config, abstract, ())
    pdir = os.path.join(path, "params")
    _check_stored(path, pdir, leaves, quant.quantize_params(abstract, stored), stored)
    restore: dict = {}
    given = {lf.path: _get(shardings, lf.path) if shardings is not None else None for lf in leaves}

    def array_sharding(lf, node, part):  # the final sharding of one stored array
        if part is None:
            return given[lf.path] if given[lf.path] is not None else _default_sharding()
        return _part_sharding(given[lf.path], node, part)

    requantize = stored is None and fmt is not None  # float groups quantized as they are restored
    for lf in leaves:
        node = _get(target, lf.path)
        for g in range(len(lf.sources)):
            if requantize and quant.is_quantized(node):  # restored one group at a time below
                _set(restore, lf.path + ((_group_key(g),) if lf.stacked else ()), ocp.PLACEHOLDER)
                continue
            for key, part in _piece_keys(lf, node, g):
                leaf = node if part is None else getattr(node, part)
                sh = array_sharding(lf, node, part)
                _set(restore, key, jax.ShapeDtypeStruct(leaf.shape[1:] if lf.stacked else leaf.shape,
                                                        dt if part is None else leaf.dtype,
                                                        sharding=_piece_sharding(sh) if lf.stacked else sh))
    try:
        stored_tree = ocp.load(pdir, restore)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore the converted params: {e}") from None
    pieces = _StoredPieces(pdir, leaves, [(lf, g, np.float32) for lf in leaves if quant.is_quantized(
        _get(target, lf.path)) for g in range(len(lf.sources))]) if requantize else None
    params: dict = {}
    for lf in leaves:
        node = _get(target, lf.path)
        if quant.is_quantized(node) and pieces is not None:
            arr = _place_quantized(node, given[lf.path], lf, lambda g, lf=lf: _quantize_stored(pieces, lf, g, fmt))
        elif quant.is_quantized(node):
            arr = dataclasses.replace(node, **{p: _stack(_get(stored_tree, lf.path + (p,)), lf,
                                                          array_sharding(lf, node, p))
                                               for p in _PARTS if getattr(node, p) is not None})
        else:
            arr = _stack(_get(stored_tree, lf.path), lf, array_sharding(lf, node, None))
        _set(params, lf.path, arr)
    return config, params


def _stack(stored, lf: Leaf, sharding):
    """The device array of one stored leaf: its groups stacked on device (scanned leaves)."""
    if not lf.stacked:
        return stored
    pieces = [stored.pop(_group_key(g)) for g in range(lf.shape[0])]
    return _jitted("stack", sharding)(*pieces)


def convert_orbax_to_hf(src: str, dst: str, *, dtype: str | None = None, progress: bool = False,
                        max_shard_bytes: int = 5 << 30) -> None:
    """Export a converted directory of float weights back to Hugging Face safetensors at `dst`.

    A quantized directory is refused: Hugging Face has no layout for our int8 / int4 /
    fp8 weights (export the float checkpoint it was made from)."""
    stored = _stored_format(src, _read_format(src))
    if stored is not None:
        raise CheckpointError(f"{src} holds weights quantized as {describe_format(stored)}; export to Hugging Face "
                              "safetensors needs float weights (export the float checkpoint it was made from)")
    config, params = load_orbax(src, dtype=dtype)
    save_hf(config, params, dst, max_shard_bytes=max_shard_bytes, progress=progress)
    copy_side_files(src, dst)
    del params
    jax.clear_caches()


def load_checkpoint(path: str, *, dtype: str = "bfloat16", shardings=None, progress: bool = False, quantize=None,
                    group_size: int | None = None):
    """(config, params) from either a Hugging Face directory or a converted one.

    quantize / group_size: see `load_hf` and `load_orbax` (`load_format` says which
    format results); dtype: see `check_load_dtype`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    check_load_dtype(path, dtype)
    if is_converted(path):
        return load_orbax(path, dtype=dtype, shardings=shardings, quantize=quantize, group_size=group_size)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face or converted checkpoint")
    return load_hf(path, dtype=dtype, shardings=shardings, progress=progress,
                   quantize=quant.as_format(quantize, group_size))
