"""Safetensors files: header parsing, lazy reading of regions, streaming writing.

`SafetensorsReader` parses the (JSON) headers of a checkpoint directory and reads any
rectangular region of a tensor with `os.pread` into a fresh numpy buffer. Nothing is
memory-mapped, so a read costs exactly the bytes of the region in host RSS
(`safe_open` maps the file, which doubles resident memory per tensor and, in numpy
mode, cannot return bfloat16 or float8 at all). Headers and the shard index are
untrusted input and are validated before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from .base import CheckpointError


def _norm_region(region, shape) -> tuple[slice, ...]:
    """Turn a tuple of slices (possibly None / open-ended, possibly short) into concrete ones."""
    region = tuple(region) + (slice(None),) * (len(shape) - len(region))
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided regions are not supported: {s}")
        out.append(slice(start, stop))
    return tuple(out)


def _st_dtypes():
    return {
        "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    }


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header (the data itself is not read)."""
    dtypes = _st_dtypes()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(
                    f"{path} is truncated or corrupted: header says {n} header bytes, file has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupted: its header is not valid JSON ({e})") from None
    out = {}
    data_start = 8 + n
    spans = []  # (begin, end, name): data ranges, checked below for overlaps
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[h["dtype"]]
            shape = tuple(_header_int(x) for x in h["shape"])
            b, e = (_header_int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise CheckpointError(f"{path} is corrupted: bad header entry for tensor {name!r}: {h!r} ({ex})") from None
        if b < 0 or e < b or any(d < 0 for d in shape):
            raise CheckpointError(f"{path} is corrupted: tensor {name} has data_offsets [{b}, {e}] and shape {shape}")
        if e - b != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{path} is corrupted: tensor {name} has {e - b} bytes for shape {shape} of {h['dtype']}")
        if data_start + e > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + e}, the file has {size} bytes")
        spans.append((b, e, name))
        out[name] = TensorInfo(path, dtype, shape, data_start + b)
    # Two tensors sharing bytes would alias each other's data (a crafted or corrupted
    # file); empty tensors occupy no bytes and cannot overlap anything.
    spans.sort()
    end, last = 0, None
    for b, e, name in spans:
        if b < end and e > b:
            raise CheckpointError(f"{path} is corrupted: the data of tensors {last} and {name} overlap "
                                  f"(bytes {b}..{e} begin before {end})")
        if e > end:
            end, last = e, name
    return out


def _header_int(x) -> int:
    """An integer of a safetensors header (JSON numbers only: no floats, strings, booleans)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{x!r} is not an integer")
    return x


def _shard_path(root: str, name) -> str:
    """The path of shard `name` listed in the index, refused unless it stays inside `root`.

    The index is untrusted input: an absolute name, a `..` component, or a symlink
    leading out of the checkpoint directory would read (and report on) any file.
    """
    if (not isinstance(name, str) or not name or os.path.isabs(name)
            or ".." in name.replace("\\", "/").split("/")):
        raise CheckpointError(f"{root}: the index names shard {name!r}, which is not a file name inside the "
                              "checkpoint directory")
    full = os.path.join(root, name)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise CheckpointError(f"{root}: shard {name!r} named in the index leads outside the checkpoint directory "
                              f"(to {os.path.realpath(full)})")
    return full


class SafetensorsReader:
    """Every tensor of a checkpoint directory, read lazily by region.

    Handles one `*.safetensors` file, several, or shards listed in
    `model.safetensors.index.json`. Headers are parsed up front (and checked against
    the file sizes, so truncation is caught before any data is read); data is read
    with `os.pread` only when asked, one region at a time.
    """

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint path does not exist: {path}")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is not a directory")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
            shards = {v: _shard_path(path, v) for v in weight_map.values()}
            files = sorted(shards)
            missing = [v for v in files if not os.path.isfile(shards[v])]
            if missing:
                raise CheckpointError(f"{path}: shard(s) named in the index are missing: {', '.join(missing)}")
            self._add_files(shards[v] for v in files)
            misplaced = sorted(k for k, v in weight_map.items()
                               if k not in self.tensors or self.tensors[k].file != shards[v])
            if misplaced:
                k = misplaced[0]
                where = os.path.basename(self.tensors[k].file) if k in self.tensors else "no shard"
                raise CheckpointError(
                    f"{path}: tensors named in the index are not in their shard: {misplaced[:5]} "
                    f"({k}: index says {weight_map[k]}, found in {where})")
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(
                    f"{path} has no *.safetensors weights (pickled .bin/.pth weights are never read)")
            self._add_files(os.path.join(path, fn) for fn in files)

    def _add_files(self, files: Iterable[str]) -> None:
        """Read the headers of `files`; a tensor stored in two of them is refused, naming both."""
        for file in files:
            for name, info in _read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name} is stored twice, in "
                                          f"{os.path.basename(self.tensors[name].file)} and {os.path.basename(file)}")
                self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint") from None

    def read(self, name: str, region=()) -> np.ndarray:
        """The region (tuple of slices) of a tensor as a new numpy array in its stored dtype.

        Reads whole rows of the outermost sliced axis when the inner rows are small,
        else recurses row by row, so a device that needs 1/n of a tensor reads about
        1/n of its bytes.
        """
        info = self.info(name)
        region = _norm_region(region, info.shape)
        out = np.empty(tuple(s.stop - s.start for s in region), info.dtype)
        if out.size == 0:
            return out
        fd = os.open(info.file, os.O_RDONLY)
        try:
            self._read_into(fd, info, info.start, info.shape, region, out)
        finally:
            os.close(fd)
        return out

    def _read_into(self, fd, info, offset, shape, region, out):
        item = info.dtype.itemsize
        # Trailing axes taken whole form one contiguous run per index of the axes before.
        a = len(shape)
        while a > 0 and region[a - 1].start == 0 and region[a - 1].stop == shape[a - 1]:
            a -= 1
        if a == 0:  # the whole (sub)tensor
            _pread_into(fd, offset, out, info.file)
            return
        row0 = math.prod(shape[1:]) * item  # bytes of one index of the first axis
        s0 = region[0]
        if a == 1:  # a range of whole rows: one contiguous read
            _pread_into(fd, offset + s0.start * row0, out, info.file)
            return
        if row0 <= 1 << 16:  # small rows: read the bounding rows once, slice in memory
            buf = np.empty((s0.stop - s0.start,) + tuple(shape[1:]), info.dtype)
            _pread_into(fd, offset + s0.start * row0, buf, info.file)
            out[...] = buf[(slice(None),) + tuple(region[1:])]
            return
        for i, r in enumerate(range(s0.start, s0.stop)):
            self._read_into(fd, info, offset + r * row0, shape[1:], region[1:], out[i])


def _pread_into(fd: int, offset: int, out: np.ndarray, file: str) -> None:
    """Fill a C-contiguous array from the file at `offset`, in reads of at most 1 GiB."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done, total = 0, view.nbytes
    while done < total:
        n = os.preadv(fd, [view[done: min(total, done + (1 << 30))]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{file} is truncated: no data at byte {offset + done}")
        done += n


def _st_name(dtype: np.dtype) -> str:
    for k, v in _st_dtypes().items():
        if v == np.dtype(dtype):
            return k
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def write_safetensors(path: str, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file, producing tensors one at a time (peak memory: one tensor).

    `tensors` holds (name, shape, dtype, produce); the header is written first from the
    declared shapes, then each tensor's bytes in order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, dtype, _ in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_name(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype, produce in tensors:
            a = produce()
            if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {a.shape} {a.dtype}, declared {shape} {dtype}")
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
