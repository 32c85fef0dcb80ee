"""Checkpoints: the one Hugging Face name map, streaming safetensors, orbax, export, FP8.

Name map
--------
`TEXT_GLOBAL_MAP` / `TEXT_LAYER_MAP` (and `TEXT_EXPERT_MAP`, the per-expert spelling of
the routed experts used by FP8 checkpoints) are the single table from Hugging Face
tensor names to our parameter tree. A second table (the vision tower) plugs into
`checkpoint_entries` the same way. Each row says how an HF tensor becomes one or more
of our leaves and back:

  * "linear": an `nn.Linear` weight [out, in] -> our kernel [in..., out...]
    (transpose, then reshape to the parameter's shape; `n_in` leading dims are input);
  * "same": stored as is (norm weights, embeddings, `experts.down_proj`);
  * "split": the fused `experts.gate_up_proj` [E, D, 2F] -> gate [E, D, F], up [E, D, F].

Layer tensors are stacked on our leading `layers` axis: HF layer i is group
i // period, member `layer_{i % period}`. A row whose name holds `{e}` is one tensor per
expert, stacked on our `expert` axis.

Reading
-------
Safetensors files are read by `SafetensorsReader`, which parses the (JSON) header and
reads any rectangular region of a tensor with `os.pread` into a fresh numpy buffer.
Nothing is memory-mapped, so a read costs exactly the bytes of the region in host RSS
(`safe_open` maps the file, which doubles resident memory per tensor and, in numpy
mode, cannot return bfloat16 or float8 at all). `load_hf` builds every parameter with
`jax.make_array_from_callback`, so each device reads only its own slice of each HF
tensor. Scanned parameters are filled one group (one HF tensor) at a time into a
preallocated, donated device array, so host memory is bounded by a few buffers of one
HF tensor (read, transposed, and on the CPU backend the device copy: ~2x the largest
tensor measured), independent of depth. Every HF tensor must be consumed and every parameter produced:
`plan_leaves` and `_check_consumed` check both directions.

Converted checkpoints
---------------------
`convert_hf_to_orbax` writes `config.json` (Hugging Face format), `llama4_jax.json`
(format marker) and `params/`, an orbax checkpoint. Scanned parameters are stored as
one array per group (`.../<leaf>/group_<g>`), each the size of one HF tensor, written
with orbax partial saves, so conversion holds about one HF tensor in host memory no
matter how large the model is (measured: 1.2x the largest tensor, benchmarks/convert.py).
`load_orbax` restores the groups straight into the target shardings and stacks them
on device. `save_hf` / `convert_orbax_to_hf` export back; the export writes one tensor
at a time, but `convert_orbax_to_hf` first restores the whole model onto the default
device.

Public entry points: `load_checkpoint(path, dtype=, shardings=)` (either kind of
directory; `llama4_jax.load` wraps it), `load_hf`, `load_orbax`, `convert_hf_to_orbax`,
`convert_orbax_to_hf`, `save_hf`, `SafetensorsReader`, `write_safetensors`.

FP8
---
Float8 e4m3 tensors with per-output-channel scales (compressed-tensors: per-expert
`experts.{e}.{gate,up,down}_proj.weight` + `weight_scale` [out, 1]; fbgemm:
`experts.gate_up_proj` + `gate_up_proj_scale` [E, 1, 2F], `experts.down_proj` +
`down_proj_scale` [E, D, 1], Linear `weight` + `weight_scale`) are dequantized on read,
`w = float32(w8) * scale`, then cast to the requested dtype. `quantization_config`
in config.json is validated first (`read_quantization`); FP8 is not kept as a weight
format, so activations run unquantized (the checkpoint's `input_scale`s are ignored).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .config import ConfigError, Llama4Config, load_config, to_hf as config_to_hf

__all__ = [
    "Rule", "Entry", "TEXT_LAYER_MAP", "TEXT_GLOBAL_MAP", "TEXT_EXPERT_MAP", "VISION_LAYER_MAP",
    "VISION_GLOBAL_MAP", "vision_entries", "CheckpointError",
    "SafetensorsReader", "checkpoint_entries", "text_entries", "load_hf", "load_checkpoint", "save_hf",
    "convert_hf_to_orbax", "convert_orbax_to_hf", "load_orbax", "is_converted", "read_quantization",
    "write_safetensors", "atomic_dir", "plan_leaves",
]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked."""


# --------------------------------------------------------------------------------------
# The name map
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF suffix (after the layer prefix for layer rules); "{e}" = one tensor per expert
    ours: tuple[str, ...]  # one or more '/'-joined paths below the layer (or params) root
    kind: str  # "linear" | "same" | "split"
    n_in: int = 1  # input dims of our kernel for "linear"


TEXT_LAYER_MAP: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("attn_norm/scale",), "same"),
    Rule("post_attention_layernorm.weight", ("ffn_norm/scale",), "same"),
    Rule("self_attn.q_proj.weight", ("attn/q",), "linear"),
    Rule("self_attn.k_proj.weight", ("attn/k",), "linear"),
    Rule("self_attn.v_proj.weight", ("attn/v",), "linear"),
    Rule("self_attn.o_proj.weight", ("attn/o",), "linear", n_in=2),
    Rule("feed_forward.gate_proj.weight", ("mlp/gate",), "linear"),
    Rule("feed_forward.up_proj.weight", ("mlp/up",), "linear"),
    Rule("feed_forward.down_proj.weight", ("mlp/down",), "linear"),
    Rule("feed_forward.router.weight", ("moe/router",), "linear"),
    Rule("feed_forward.experts.gate_up_proj", ("moe/gate", "moe/up"), "split"),
    Rule("feed_forward.experts.down_proj", ("moe/down",), "same"),
    Rule("feed_forward.shared_expert.gate_proj.weight", ("moe/shared/gate",), "linear"),
    Rule("feed_forward.shared_expert.up_proj.weight", ("moe/shared/up",), "linear"),
    Rule("feed_forward.shared_expert.down_proj.weight", ("moe/shared/down",), "linear"),
)
# The routed experts spelled one Linear per expert (compressed-tensors FP8 checkpoints,
# transformers' `SequentialLlama4TextExperts`); replaces the two fused `experts.*` rows.
TEXT_EXPERT_MAP: tuple[Rule, ...] = (
    Rule("feed_forward.experts.{e}.gate_proj.weight", ("moe/gate",), "linear"),
    Rule("feed_forward.experts.{e}.up_proj.weight", ("moe/up",), "linear"),
    Rule("feed_forward.experts.{e}.down_proj.weight", ("moe/down",), "linear"),
)
TEXT_GLOBAL_MAP: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), "same"),
    Rule("model.norm.weight", ("final_norm/scale",), "same"),
    Rule("lm_head.weight", ("lm_head",), "linear"),
)
_FUSED_EXPERT_RULES = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")

# The vision tower (`params['vision']`; encoder layers stacked on its leading `layers`
# axis, HF vision layer i at index i) and the projector (`params['projector']`).
VISION_LAYER_MAP: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("attn_norm/scale",), "same"),
    Rule("input_layernorm.bias", ("attn_norm/bias",), "same"),
    Rule("post_attention_layernorm.weight", ("mlp_norm/scale",), "same"),
    Rule("post_attention_layernorm.bias", ("mlp_norm/bias",), "same"),
    Rule("self_attn.q_proj.weight", ("q",), "linear"),
    Rule("self_attn.q_proj.bias", ("q_bias",), "same"),
    Rule("self_attn.k_proj.weight", ("k",), "linear"),
    Rule("self_attn.k_proj.bias", ("k_bias",), "same"),
    Rule("self_attn.v_proj.weight", ("v",), "linear"),
    Rule("self_attn.v_proj.bias", ("v_bias",), "same"),
    Rule("self_attn.o_proj.weight", ("o",), "linear"),
    Rule("self_attn.o_proj.bias", ("o_bias",), "same"),
    Rule("mlp.fc1.weight", ("fc1",), "linear"),
    Rule("mlp.fc1.bias", ("fc1_bias",), "same"),
    Rule("mlp.fc2.weight", ("fc2",), "linear"),
    Rule("mlp.fc2.bias", ("fc2_bias",), "same"),
)
VISION_GLOBAL_MAP: tuple[Rule, ...] = (
    Rule("vision_model.patch_embedding.linear.weight", ("vision/patch_embed",), "linear"),
    Rule("vision_model.class_embedding", ("vision/class_embedding",), "same"),
    Rule("vision_model.positional_embedding_vlm", ("vision/pos_embed",), "same"),
    Rule("vision_model.layernorm_pre.weight", ("vision/pre_norm/scale",), "same"),
    Rule("vision_model.layernorm_pre.bias", ("vision/pre_norm/bias",), "same"),
    Rule("vision_model.layernorm_post.weight", ("vision/post_norm/scale",), "same"),
    Rule("vision_model.layernorm_post.bias", ("vision/post_norm/bias",), "same"),
    Rule("vision_model.vision_adapter.mlp.fc1.weight", ("vision/adapter_fc1",), "linear"),
    Rule("vision_model.vision_adapter.mlp.fc2.weight", ("vision/adapter_fc2",), "linear"),
    Rule("multi_modal_projector.linear_1.weight", ("projector/kernel",), "linear"),
)


def text_prefix(config: Llama4Config) -> str:
    """Prefix of the text tensors: `language_model.` for conditional-generation checkpoints."""
    return "language_model." if config.architecture == "Llama4ForConditionalGeneration" else ""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor (or, for `{e}` rules, one per expert) and where it goes.

    `paths` are full paths in the params tree (without the layer index); `group` is the
    index on the stacked `layers` axis, None for non-layer tensors.
    """

    hf_name: str
    rule: Rule
    paths: tuple[tuple[str, ...], ...]
    group: int | None

    def hf_names(self, num_experts: int) -> list[str]:
        if "{e}" in self.hf_name:
            return [self.hf_name.format(e=e) for e in range(num_experts)]
        return [self.hf_name]


def text_entries(config: Llama4Config, *, experts: str = "fused") -> Iterator[Entry]:
    """Every text tensor of the checkpoint for this config, with its destination.

    experts: "fused" (`experts.gate_up_proj` / `experts.down_proj`, the bf16 layout and
      fbgemm FP8) or "unfused" (`experts.{e}.*_proj.weight`, compressed-tensors FP8).
    """
    t = config.text
    pre = text_prefix(config)
    for rule in TEXT_GLOBAL_MAP:
        if rule.hf == "lm_head.weight" and t.tie_word_embeddings:
            continue
        yield Entry(pre + rule.hf, rule, tuple(("params",) + tuple(p.split("/")) for p in rule.ours), None)
    layer_rules = TEXT_LAYER_MAP
    if experts == "unfused":
        layer_rules = tuple(r for r in TEXT_LAYER_MAP if r.hf not in _FUSED_EXPERT_RULES) + TEXT_EXPERT_MAP
    elif experts != "fused":
        raise ValueError(f"experts must be 'fused' or 'unfused', got {experts!r}")
    p = t.scan_period
    for i, flags in enumerate(t.layer_flags):
        for rule in layer_rules:
            ffn = rule.ours[0].split("/")[0]
            if ffn == "mlp" and flags.is_moe or ffn == "moe" and not flags.is_moe:
                continue
            paths = tuple(("params", "layers", f"layer_{i % p}") + tuple(o.split("/")) for o in rule.ours)
            yield Entry(f"{pre}model.layers.{i}.{rule.hf}", rule, paths, i // p)


def vision_entries(config: Llama4Config) -> Iterator[Entry]:
    """Every vision-tower and projector tensor (none for text-only configs)."""
    if config.vision is None:
        return
    for rule in VISION_GLOBAL_MAP:
        yield Entry(rule.hf, rule, tuple(("params",) + tuple(p.split("/")) for p in rule.ours), None)
    for i in range(config.vision.num_hidden_layers):
        for rule in VISION_LAYER_MAP:
            paths = tuple(("params", "vision", "layers") + tuple(o.split("/")) for o in rule.ours)
            yield Entry(f"vision_model.model.layers.{i}.{rule.hf}", rule, paths, i)


def _is_ignored(name: str) -> str | None:
    """Why a checkpoint tensor is deliberately not read (None: it must be consumed)."""
    if name.endswith(("input_scale", "input_scale_ub")):
        # Static activation-quantization bounds of FP8 checkpoints: we dequantize the
        # weights and run activations unquantized, so they have no use.
        return "FP8 activation scale"
    return None


def checkpoint_entries(config: Llama4Config, *, experts: str = "fused") -> list[Entry]:
    """All entries of the name map for this config: the text decoder, then the vision tower."""
    return list(text_entries(config, experts=experts)) + list(vision_entries(config))


# --------------------------------------------------------------------------------------
# Layout transforms: HF array <-> our leaves, whole arrays and regions
# --------------------------------------------------------------------------------------

def hf_shape(rule: Rule, leaf_shape: Sequence[int]) -> tuple[int, ...]:
    """The HF tensor shape that produces our leaf of `leaf_shape` (per layer, per expert)."""
    s = tuple(int(n) for n in leaf_shape)
    if rule.kind == "same":
        return s
    if rule.kind == "linear":
        return (math.prod(s[rule.n_in:]), math.prod(s[: rule.n_in]))
    if rule.kind == "split":
        return s[:-1] + (2 * s[-1],)
    raise AssertionError(rule.kind)  # pragma: no cover - the table is closed


def to_hf(rule: Rule, leaves: tuple[np.ndarray, ...]) -> np.ndarray:
    """Our leaves (one layer) -> the HF array (exact inverse of the reading transform)."""
    if rule.kind == "same":
        return leaves[0]
    if rule.kind == "linear":
        a = leaves[0]
        n_in = int(np.prod(a.shape[: rule.n_in]))
        return np.ascontiguousarray(a.reshape(n_in, -1).T)
    if rule.kind == "split":
        return np.concatenate(leaves, axis=-1)
    raise AssertionError(rule.kind)  # pragma: no cover


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


def _hf_view(rule: Rule, k: int, leaf_shape: Sequence[int]):
    """How HF axes map onto leaf axes for output `k` of a rule.

    Returns (perm, groups, offsets): HF axis `perm[j]` becomes the leaf axes `groups[j]`
    (a contiguous run, in order, whose product is that HF axis' extent); `offsets[j]` is
    added to indices on that HF axis (the gate/up halves of `gate_up_proj`).
    """
    n = len(leaf_shape)
    if rule.kind == "same":
        return tuple(range(n)), tuple((a,) for a in range(n)), (0,) * n
    if rule.kind == "linear":  # HF [out, in] -> ours [in..., out...]
        return (1, 0), (tuple(range(rule.n_in)), tuple(range(rule.n_in, n))), (0, 0)
    if rule.kind == "split":
        offs = (0,) * (n - 1) + (k * int(leaf_shape[-1]),)
        return tuple(range(n)), tuple((a,) for a in range(n)), offs
    raise AssertionError(rule.kind)  # pragma: no cover


def _region_to_hf(rule: Rule, k: int, leaf_shape, region):
    """Map a leaf region to (HF region, per-HF-axis gather indices or None, perm).

    The HF region is the bounding box of the requested elements; the gather indices
    (relative to the box) are only needed when the leaf region does not map onto a
    contiguous HF range (e.g. a slice of `head_dim` inside the fused heads axis).
    """
    perm, groups, offsets = _hf_view(rule, k, leaf_shape)
    hf_region: list[slice | None] = [None] * len(perm)
    gathers: list[np.ndarray | None] = [None] * len(perm)
    for j, (ax, dims, off) in enumerate(zip(perm, groups, offsets)):
        flat = np.zeros((), np.int64)
        for d in dims:
            flat = flat[..., None] * int(leaf_shape[d]) + np.arange(region[d].start, region[d].stop)
        flat = flat.reshape(-1)
        if flat.size == 0:
            lo, hi = off, off
        else:
            lo, hi = int(flat.min()) + off, int(flat.max()) + 1 + off
        hf_region[ax] = slice(lo, hi)
        if flat.size != hi - lo:
            gathers[j] = flat + off - lo
    return tuple(hf_region), gathers, perm


# --------------------------------------------------------------------------------------
# Safetensors: lazy reading of regions, streaming writing
# --------------------------------------------------------------------------------------

def _st_dtypes():
    import ml_dtypes

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
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[h["dtype"]]
            shape = tuple(int(x) for x in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise CheckpointError(f"{path} is corrupted: bad header entry for tensor {name!r}: {h!r} ({ex})") from None
        if e - b != math.prod(shape) * dtype.itemsize or b < 0:
            raise CheckpointError(
                f"{path} is corrupted: tensor {name} has {e - b} bytes for shape {shape} of {h['dtype']}")
        if data_start + e > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + e}, the file has {size} bytes")
        out[name] = TensorInfo(path, dtype, shape, data_start + b)
    return out


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
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
            files = sorted(set(weight_map.values()))
            missing = [v for v in files if not os.path.exists(os.path.join(path, v))]
            if missing:
                raise CheckpointError(f"{path}: shard(s) named in the index are missing: {', '.join(missing)}")
            for fn in files:
                for name, info in _read_header(os.path.join(path, fn)).items():
                    self.tensors[name] = info
            absent = sorted(k for k, v in weight_map.items() if k not in self.tensors)
            if absent:
                raise CheckpointError(
                    f"{path}: tensors named in the index are not in their shard: {absent[:5]}")
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(
                    f"{path} has no *.safetensors weights (pickled .bin/.pth weights are never read)")
            for fn in files:
                self.tensors.update(_read_header(os.path.join(path, fn)))

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


# --------------------------------------------------------------------------------------
# Quantized (FP8) checkpoints
# --------------------------------------------------------------------------------------

def read_quantization(path: str) -> dict | None:
    """The validated `quantization_config` of a checkpoint's config.json (None if absent).

    Supported: compressed-tensors with float8 per-channel weights, and fbgemm_fp8.
    """
    with open(os.path.join(path, "config.json")) as f:
        q = json.load(f).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fbgemm_fp8":
        return q
    if method == "compressed-tensors":
        fmt = q.get("format", "float-quantized")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise CheckpointError(f"{path}: compressed-tensors format {fmt!r} is not supported "
                                  "(only 'float-quantized' FP8 weights)")
        for gname, g in (q.get("config_groups") or {}).items():
            w = g.get("weights") or {}
            got = (w.get("num_bits"), w.get("type"), w.get("strategy"))
            if got != (8, "float", "channel"):
                raise CheckpointError(
                    f"{path}: quantization group {gname} has weights (num_bits, type, strategy)={got}; "
                    "only (8, 'float', 'channel') is supported")
        return q
    raise CheckpointError(f"{path}: quantization method {method!r} is not supported "
                          "(supported: 'compressed-tensors' FP8, 'fbgemm_fp8')")


def _scale_name(reader: SafetensorsReader, name: str) -> str:
    """The per-channel scale stored beside an FP8 tensor."""
    cands = ([name[: -len("weight")] + "weight_scale"] if name.endswith(".weight") else []) + [name + "_scale"]
    for c in cands:
        if c in reader:
            return c
    raise CheckpointError(f"{reader.path}: FP8 tensor {name} has no scale (looked for {' or '.join(cands)})")


def _read_hf(reader: SafetensorsReader, name: str, region, consumed: set | None) -> np.ndarray:
    """A region of an HF tensor, dequantized to float32 if it is stored as FP8."""
    info = reader.info(name)
    x = reader.read(name, region)
    if not info.dtype.name.startswith("float8"):
        return x
    sname = _scale_name(reader, name)
    sshape = reader.info(sname).shape

    def fits(ss):
        return len(ss) == len(info.shape) and all(s in (1, n) for s, n in zip(ss, info.shape))

    # fbgemm stores `down_proj_scale` as [E, D, 1] for `down_proj` [E, F, D]: the scale
    # of output channel d is scale[e, d, 0], i.e. its last two axes are swapped.
    swap = name.endswith("experts.down_proj") and len(sshape) == 3
    if not fits(sshape[:-2] + (sshape[-1], sshape[-2]) if swap else sshape):
        raise CheckpointError(f"{reader.path}: scale {sname} has shape {sshape}, which does not broadcast "
                              f"per channel against {name} of shape {info.shape}")
    region = _norm_region(region, info.shape)
    eff = sshape[:-2] + (sshape[-1], sshape[-2]) if swap else sshape
    sregion = tuple(r if s == n else slice(0, 1) for r, s, n in zip(region, eff, info.shape))
    if swap:
        sregion = sregion[:-2] + (sregion[-1], sregion[-2])
    scale = reader.read(sname, sregion).astype(np.float32)
    if swap:
        scale = np.swapaxes(scale, -1, -2)
    if consumed is not None:
        consumed.add(sname)
    # Dequantize in fp32 (transformers' `w.float() * scale`); the one rounding to a
    # narrower dtype happens at the cast to the requested parameter dtype.
    return x.astype(np.float32) * scale


# --------------------------------------------------------------------------------------
# Reading our leaves
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Leaf:
    """One of our parameter leaves and where its data comes from.

    shape: the full leaf shape (with the leading `layers` axis for scanned leaves).
    sources: one Entry per group (or a single one for non-layer leaves).
    k: which output of the rule this leaf is (0, or 1 for the `up` half of a split).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[Entry, ...]
    k: int
    stacked: bool


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


def _expert_layout(config: Llama4Config, names: Iterable[str]) -> str:
    names = set(names)
    moe = [i for i, f in enumerate(config.text.layer_flags) if f.is_moe]
    if not moe:
        return "fused"
    base = f"{text_prefix(config)}model.layers.{moe[0]}.feed_forward.experts."
    if base + "gate_up_proj" in names:
        return "fused"
    if base + "0.gate_proj.weight" in names:
        return "unfused"
    return "fused"  # neither: the missing-tensor error will name the fused tensor


def plan_leaves(config: Llama4Config, abstract, names: Iterable[str]) -> list[Leaf]:
    """Every parameter leaf with the HF entries producing it, in parameter-tree order.

    `names` (the checkpoint's tensor names) only choose the expert layout. Every leaf
    must be produced by the name map and every map row must name a leaf; a mismatch
    is a bug in the table, not in the checkpoint, so it raises AssertionError.
    """
    entries = checkpoint_entries(config, experts=_expert_layout(config, names))
    by_leaf: dict[tuple[str, ...], list[tuple[Entry, int]]] = {}
    for e in entries:
        for k, p in enumerate(e.paths):
            by_leaf.setdefault(p, []).append((e, k))
    leaves, unproduced = [], []
    for path, sds in _flatten(abstract):
        got = by_leaf.pop(path, None)
        if not got:
            unproduced.append("/".join(path))
            continue
        stacked = got[0][0].group is not None
        got.sort(key=lambda ek: -1 if ek[0].group is None else ek[0].group)
        leaves.append(Leaf(path, tuple(sds.shape), tuple(e for e, _ in got), got[0][1], stacked))
    if unproduced or by_leaf:
        raise AssertionError(f"name map and parameter tree disagree: not produced {unproduced}, "
                             f"no such parameter {sorted('/'.join(p) for p in by_leaf)}")
    return leaves


def _read_leaf_region(reader: SafetensorsReader, leaf: Leaf, entry: Entry, region, dtype,
                      consumed: set | None) -> np.ndarray:
    """The region of one layer's (unstacked) leaf produced by `entry`, in `dtype`."""
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    region = _norm_region(region, shape)
    if "{e}" in entry.hf_name:  # one HF tensor per expert: leading axis of our leaf
        parts = [_read_view(reader, entry.hf_name.format(e=e), entry.rule, leaf.k, shape[1:], region[1:], dtype,
                            consumed) for e in range(region[0].start, region[0].stop)]
        return np.stack(parts) if parts else np.empty(tuple(s.stop - s.start for s in region), dtype)
    return _read_view(reader, entry.hf_name, entry.rule, leaf.k, shape, region, dtype, consumed)


def _read_view(reader, name, rule, k, shape, region, dtype, consumed) -> np.ndarray:
    info = reader.info(name)
    want = hf_shape(rule, shape)
    if info.shape != want:
        raise CheckpointError(f"{reader.path}: tensor {name} has shape {info.shape}, expected {want}")
    hf_region, gathers, perm = _region_to_hf(rule, k, shape, region)
    x = _read_hf(reader, name, hf_region, consumed)
    x = _transposed(x) if perm == (1, 0) else x.transpose(perm)
    for ax, g in enumerate(gathers):
        if g is not None:
            x = np.take(x, g, axis=ax)
    x = x.reshape(tuple(s.stop - s.start for s in region))
    if consumed is not None:
        consumed.add(name)
    return x.astype(dtype, copy=False)


def _transposed(x: np.ndarray, block: int = 256) -> np.ndarray:
    """x.T as a new C-contiguous array, copied in cache-sized tiles.

    numpy's plain strided copy of a transposed matrix misses cache on every element
    of one side; 256 x 256 tiles made the copy ~2.3x faster on this project's CPU.
    """
    a, b = x.shape
    out = np.empty((b, a), x.dtype)
    for i in range(0, a, block):
        for j in range(0, b, block):
            out[j:j + block, i:i + block] = x[i:i + block, j:j + block].T
    return out


def _check_consumed(reader: SafetensorsReader, consumed: set) -> None:
    left = sorted(k for k in reader.tensors if k not in consumed and _is_ignored(k) is None)
    if left:
        more = f" and {len(left) - 8} more" if len(left) > 8 else ""
        raise CheckpointError(f"{reader.path}: tensors not used by the model: {left[:8]}{more}")


_DTYPES = ("float32", "bfloat16", "float16")


def _np_dtype(dtype) -> np.dtype:
    """numpy dtype for a supported parameter dtype name (bfloat16 via ml_dtypes)."""
    import ml_dtypes

    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose from {list(_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _default_sharding():
    import jax

    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_hf(path: str, *, dtype: str = "bfloat16", shardings=None, progress: bool = False):
    """Read a Hugging Face Llama 4 checkpoint directory into (config, params) on device.

    Args:
      path: directory with config.json and safetensors weights (one file, several, or
        shards with `model.safetensors.index.json`). FP8 weights are dequantized.
      dtype: parameter dtype, "bfloat16" | "float32" | "float16".
      shardings: None (every parameter on the default device) or a pytree with the
        structure of the params (`{'params': ...}`) whose leaves are
        `jax.sharding.Sharding`s or None (default device). Each device reads only its
        slice of each HF tensor; a scanned leaf's slice spans one HF tensor per group.
      progress: show a tqdm bar over the bytes read.

    Returns: (Llama4Config, params) with params a tree of `jax.Array`.
    Peak host memory: a few buffers of one device shard of the largest HF tensor.
    """
    import jax

    from .model.text import abstract_params

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    config = load_config(path)
    np_dtype = _np_dtype(dtype)
    read_quantization(path)  # validates the quantization scheme before any data is read
    reader = SafetensorsReader(path)
    abstract = abstract_params(config, dtype=dtype)
    leaves = plan_leaves(config, abstract, reader.tensors)
    total = sum(math.prod(lf.shape) * np_dtype.itemsize for lf in leaves)
    consumed: set[str] = set()
    params: dict = {}
    with _progress(total, "load", progress) as bar:
        for lf in leaves:
            sharding = _get(shardings, lf.path) if shardings is not None else None
            sharding = sharding if sharding is not None else _default_sharding()

            def read(index, lf=lf, entry=lf.sources[0]):
                return _read_leaf_region(reader, lf, entry, index, np_dtype, consumed)

            if not lf.stacked:
                arr = jax.make_array_from_callback(lf.shape, sharding, read)
            else:
                # One group at a time into a preallocated stacked array, updated in place
                # (donated): host memory holds one device shard of one HF tensor, and
                # the device one group beyond the parameter itself.
                piece_sharding = _piece_sharding(sharding)
                arr = _zeros(lf.shape, np_dtype.name, sharding)()
                for g, entry in enumerate(lf.sources):
                    piece = jax.make_array_from_callback(
                        lf.shape[1:], piece_sharding, functools.partial(read, entry=entry))
                    arr = _update_layer(sharding)(arr, piece, np.int32(g))
                    del piece
            bar.update(math.prod(lf.shape) * np_dtype.itemsize)
            _set(params, lf.path, arr)
    _check_consumed(reader, consumed)
    return config, params


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype: str, sharding):
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda: jnp.zeros(shape, _np_dtype(dtype)), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _update_layer(sharding):
    """a[g] = x in place (a donated); g traced, so one compilation per leaf shape."""
    import jax

    return jax.jit(lambda a, x, g: jax.lax.dynamic_update_index_in_dim(a, x, g, 0), out_shardings=sharding,
                   donate_argnums=0)


# --------------------------------------------------------------------------------------
# Export to Hugging Face
# --------------------------------------------------------------------------------------

def _host_slice(x, g: int | None) -> np.ndarray:
    """x[g] (or x) on the host; a device array is sliced on device first (one layer moves)."""
    if g is None:
        return np.asarray(x)
    if isinstance(x, np.ndarray):
        return x[g]
    return np.asarray(_index_layer(x, g))


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, sharding=None):
    import jax
    import jax.numpy as jnp

    if kind == "index":  # traced index: one compilation per leaf shape, not per layer
        return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _index_layer(x, g):
    return _jitted("index")(x, np.int32(g))


def save_hf(config: Llama4Config, params, path: str, *, max_shard_bytes: int = 5 << 30,
            progress: bool = False) -> None:
    """Write params as a Hugging Face checkpoint directory transformers loads.

    config.json (from `config.to_hf`), safetensors shards of at most `max_shard_bytes`
    (`model.safetensors` when one is enough, else `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json`). Tensors keep the parameters' dtype and are
    produced one at a time. `path` must not exist or be an empty directory.
    """
    entries = checkpoint_entries(config)
    plan = []  # (name, shape, dtype, produce)
    for e in entries:
        leaves = [_get(params, p) for p in e.paths]
        shapes = [tuple(x.shape[1:]) if e.group is not None else tuple(x.shape) for x in leaves]
        shape = hf_shape(e.rule, shapes[0])
        dt = np.dtype(leaves[0].dtype)

        def produce(e=e, leaves=leaves):
            parts = tuple(_host_slice(x, e.group) for x in leaves)
            return to_hf(e.rule, parts)

        plan.append((e.hf_name, shape, dt, produce))
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        n = math.prod(t[1]) * t[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise CheckpointError(f"export destination {path} is not empty")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config_to_hf(config), "torch_dtype": _torch_dtype_name(plan[0][2])}, f, indent=2)
    total = sum(math.prod(t[1]) * t[2].itemsize for t in plan)
    weight_map = {}
    with _progress(total, "export", progress) as bar:
        for i, shard in enumerate(shards):
            fn = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

            def counted(t):
                name, shape, dt, produce = t

                def p():
                    a = produce()
                    bar.update(a.nbytes)
                    return a
                return (name, shape, dt, p)

            write_safetensors(os.path.join(path, fn), [counted(t) for t in shard])
            weight_map.update({t[0]: fn for t in shard})
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _torch_dtype_name(dt: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dt).name]


# --------------------------------------------------------------------------------------
# Converted (orbax) checkpoints
# --------------------------------------------------------------------------------------

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
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def convert_hf_to_orbax(src: str, dst: str, *, dtype: str = "bfloat16", progress: bool = False,
                        batch_bytes: int = 64 << 20) -> None:
    """Stream an HF checkpoint into a converted directory at `dst` (which must not exist).

    Writes `config.json`, `llama4_jax.json` and `params/` (orbax). Tensors are read one
    at a time and handed to orbax partial saves in batches of at most `batch_bytes`
    (or one tensor, if larger), so host memory stays about one tensor.
    """
    from orbax.checkpoint.experimental import v1 as ocp

    from .model.text import abstract_params

    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint path does not exist: {src}")
    if os.path.exists(dst):
        raise FileExistsError(f"destination already exists: {dst}")
    config = load_config(src)
    np_dtype = _np_dtype(dtype)
    quant = read_quantization(src)
    reader = SafetensorsReader(src)
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
    with open(os.path.join(dst, FORMAT_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "dtype": np_dtype.name, "source": os.path.abspath(src),
                   "dequantized_from": (quant or {}).get("quant_method")}, f, indent=2)


def _read_format(path: str) -> dict:
    with open(os.path.join(path, FORMAT_FILE)) as f:
        fmt = json.load(f)
    if fmt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: converted format version {fmt.get('format_version')!r} is not "
                              f"supported (this library reads version {FORMAT_VERSION})")
    return fmt


def _piece_sharding(sharding):
    """Sharding of one group of a stacked leaf: the stacked sharding without its first axis."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"scanned parameters need a NamedSharding or SingleDeviceSharding, got {sharding}")


def load_orbax(path: str, *, dtype: str | None = None, shardings=None):
    """Restore a converted directory into (config, params) on device.

    dtype: None keeps the stored dtype; else the parameters are cast by orbax on read.
    shardings: as for `load_hf`. Each stored group lands directly in its device
    sharding; the groups of a scanned leaf are then stacked on device, one leaf at a
    time (transient device memory: one leaf).
    """
    import jax
    from orbax.checkpoint.experimental import v1 as ocp

    from .model.text import abstract_params

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
    import jax

    config, params = load_orbax(src, dtype=dtype)
    save_hf(config, params, dst, max_shard_bytes=max_shard_bytes, progress=progress)
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


def atomic_dir(dst: str, *, overwrite: bool, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` into a fresh sibling temporary directory, then rename it to `dst`.

    An interrupted or failing write leaves `dst` untouched (the temporary directory is
    removed on failure). With `overwrite`, an existing `dst` is replaced only after the
    new one is complete.
    """
    import tempfile

    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"destination already exists: {dst} (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        out = os.path.join(tmp_root, "out")
        write(out)
        if os.path.exists(dst):
            old = tmp_root + "-old"
            os.rename(dst, old)
            os.rename(out, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(out, dst)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
