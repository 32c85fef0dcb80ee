"""Per-device memory plan: `llama4-jax plan --preset scout --mesh expert=8 --dtype bf16`.

Nothing here restates a shape or a sharding. Parameter shapes come from
`abstract_params` (`jax.eval_shape` of the model's init), the KV cache from
`cache.abstract_cache` (chunked layers hold `attention_chunk_size` slots, global
layers `max_len`), and every per-device size from `NamedSharding.shard_shape` under
the same `Rules` that `forward` and `load` use, on a device-free `AbstractMesh`. So
the plan is exactly what loading onto that mesh allocates (a test checks it against
real sharded arrays).

Weights: `weight_format` (bf16/fp16/fp32) is the dtype of the parameters; with
`quantize` (int8 / int4 / fp8, see `llama4_jax.quant`) the decoder layers' matrices
(attention, dense MLP, shared and routed experts) are the `QuantizedWeight`s of
`abstract_params(..., quantize=)`, counted array by array (packed values, scales,
int4 zero points) under the sharding rules of their scale leaves: the tree and the
shardings `llama4_jax.load(..., quantize=, mesh=)` produces, not a bytes-per-parameter
table.

Activations are an estimate, not a measurement: one prefill chunk per batch row
through the largest layer with blockwise attention, plus the last-position logits.
On CPU, prompts longer than `scheduler.BATCHED_PREFILL_MAX` tokens are prefilled one
per device per call, so there the estimate bounds what runs from above.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import numpy as np

from . import quant, sharding
from .generate import default_prefill_chunk

GiB = 1 << 30
# the float dtypes parameters are stored in
WEIGHT_FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
KV_FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
# Query rows of one attention block in the blockwise estimate (kernels' default tile).
_ATTN_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device (the most loaded device) for a config on a mesh."""

    mesh: tuple[tuple[str, int], ...]
    weight_format: str  # float dtype of the parameters
    quantize: quant.QuantFormat | None  # format of the decoder layers' matrices (None: float)
    kv_format: str
    batch: int
    max_len: int
    prefill_chunk: int
    weights_total: int  # all devices together, unsharded
    weights_by_part: dict  # part -> bytes on one device
    kv_cache: int  # per device, chunked layers capped at the chunk
    kv_cache_uncapped: int  # per device if chunked layers kept max_len slots
    activations: int  # per device, estimate
    device_memory: int

    @property
    def devices(self) -> int:
        return math.prod(s for _, s in self.mesh)

    @property
    def weights(self) -> int:
        return sum(self.weights_by_part.values())

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    @property
    def min_devices_for_weights(self) -> int:
        """Devices of this memory needed just to hold the weights, perfectly split."""
        return max(1, math.ceil(self.weights_total / self.device_memory))


def _part(path: tuple[str, ...]) -> str:
    if path[1] in ("vision", "projector"):
        return "vision tower + projector"
    if path[1] in ("embed", "lm_head"):
        return "embedding + lm head"
    if "attn" in path:
        return "attention"
    if path[-1] in ("scale", "router"):
        return "norms + router"
    if "moe" in path and "shared" not in path:
        return "routed experts"
    return "shared expert + dense MLP"


def _mesh(mesh):
    if isinstance(mesh, (str, dict)):
        return sharding.abstract_mesh(mesh)
    return mesh


def _float_dtype(weight_format: str) -> str:
    if weight_format not in WEIGHT_FORMATS:
        hint = (f"; {weight_format} is a quantization: pass quantize={weight_format!r}"
                if weight_format in quant.FORMATS else "")
        raise ValueError(f"weight format must be one of {sorted(WEIGHT_FORMATS)}, got {weight_format!r}{hint}")
    return WEIGHT_FORMATS[weight_format]


def weight_bytes(config, mesh, *, rules=None, weight_format: str = "bf16", quantize=None,
                 group_size: int | None = None) -> tuple[int, dict]:
    """(total bytes unsharded, {part: bytes on the most loaded device}) of the tree
    `abstract_params(config, dtype=weight_format, quantize=)` placed by the rules:
    every array of a quantized weight (values, scales, zero points) counted under its
    own sharding."""
    from .model.text import abstract_params

    mesh = _mesh(mesh)
    float_dtype = _float_dtype(weight_format)
    fmt = quant.as_format(quantize, group_size)
    abstract = abstract_params(config, dtype=float_dtype, quantize=fmt)
    shardings = sharding.param_shardings(config, mesh, rules, dtype=float_dtype, quantize=fmt)
    nodes = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=quant.is_quantized)[0]
    total, parts = 0, {}
    for (path, node), sh in zip(nodes, jax.tree_util.tree_leaves(shardings, is_leaf=quant.is_quantized)):
        part = _part(tuple(str(getattr(k, "key", k)) for k in path))
        for leaf, s in zip(jax.tree_util.tree_leaves(node), jax.tree_util.tree_leaves(sh)):
            item = np.dtype(leaf.dtype).itemsize
            total += math.prod(leaf.shape) * item
            parts[part] = parts.get(part, 0) + math.prod(s.shard_shape(leaf.shape)) * item
    return total, parts


def kv_cache_bytes(config, mesh, *, rules=None, batch: int, max_len: int, kv_format: str = "bf16",
                   capped: bool = True) -> int:
    """KV cache bytes on one device; `capped=False` sizes chunked layers at max_len too."""
    from .cache import abstract_cache

    if kv_format not in KV_FORMATS:
        raise ValueError(f"KV cache format must be one of {sorted(KV_FORMATS)}, got {kv_format!r}")
    mesh = _mesh(mesh)
    if not capped:
        text = config.text
        config = config.replace(text=dataclasses.replace(text, chunked_layers=()))
    cache = abstract_cache(config, batch, max_len, dtype="bfloat16", kv_dtype=KV_FORMATS[kv_format])
    shardings = sharding.cache_shardings(cache, mesh, rules)
    return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(shardings)))


def activation_bytes(config, mesh, *, rules=None, batch: int, prefill_chunk: int, act_bytes: int = 2) -> int:
    """Estimated peak activations on one device while prefilling `prefill_chunk` tokens per row.

    The residual stream and its normed copy, q/k/v and the attention output, one fp32
    score block per head [block x (block + chunk)], the widest feed-forward (gate, up
    and their product), the expert-parallel dispatch buffers (k rows per token, sent and
    received), and fp32 logits of the last position.
    """
    mesh = _mesh(mesh)
    rules = sharding.default_rules(mesh) if rules is None else rules
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    split = lambda name: math.prod(sizes.get(a, 1) for a in rules.mesh_axes(name))  # noqa: E731
    t = config.text
    rows = math.ceil(batch / split("batch"))
    T = math.ceil(prefill_chunk / split("length"))
    H = math.ceil(t.num_attention_heads / split("q_heads"))
    K = math.ceil(t.num_key_value_heads / split("kv_heads"))
    F = max(math.ceil(t.intermediate_size_mlp / split("mlp")), math.ceil(t.intermediate_size / split("expert_mlp")))
    blk = min(_ATTN_BLOCK, T)
    span = blk + (t.attention_chunk_size or T)
    per_row = (
        4 * T * t.hidden_size * act_bytes  # residual, normed input, attention output, ffn output
        + T * (2 * H + 2 * K) * t.head_dim * act_bytes  # q, k, v, attention values
        + H * blk * min(span, T + blk) * 4  # one fp32 score block
        + 3 * T * F * act_bytes  # gate, up, silu(gate) * up
        + 2 * T * t.num_experts_per_tok * t.hidden_size * act_bytes * 2  # ep send + receive buffers
        + math.ceil(t.vocab_size / split("vocab")) * 4  # last-position logits
    )
    return rows * per_row


def plan(config, mesh, *, rules=None, weight_format: str = "bf16", quantize=None, group_size: int | None = None,
         kv_format: str | None = None, batch: int = 1, max_len: int = 8192, prefill_chunk: int | None = None,
         device_memory_gib: float = 80.0) -> Plan:
    """The memory plan of `config` on `mesh` (a spec string like "expert=8", or a mesh).

    weight_format: the parameters' float dtype; quantize / group_size: the format of
    the decoder layers' matrices (as for `llama4_jax.load`)."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
    mesh = _mesh(mesh)
    _float_dtype(weight_format)
    fmt = quant.as_format(quantize, group_size)
    kv_format = kv_format or weight_format
    # The piece `generate` prefills in (the attention chunk by default), so the
    # activation estimate describes the prefill that runs.
    chunk = min(max_len, prefill_chunk or default_prefill_chunk(config))
    total, parts = weight_bytes(config, mesh, rules=rules, weight_format=weight_format, quantize=fmt)
    kv = dict(rules=rules, batch=batch, max_len=max_len, kv_format=kv_format)
    return Plan(
        mesh=tuple(zip(mesh.axis_names, mesh.axis_sizes)),
        weight_format=weight_format,
        quantize=fmt,
        kv_format=kv_format,
        batch=batch,
        max_len=max_len,
        prefill_chunk=chunk,
        weights_total=total,
        weights_by_part=parts,
        kv_cache=kv_cache_bytes(config, mesh, **kv),
        kv_cache_uncapped=kv_cache_bytes(config, mesh, capped=False, **kv),
        activations=activation_bytes(config, mesh, rules=rules, batch=batch, prefill_chunk=chunk),
        device_memory=int(device_memory_gib * GiB),
    )


def _gib(n: int) -> str:
    return f"{n / GiB:10.2f} GiB"


def _describe_weights(p: Plan) -> str:
    if p.quantize is None:
        return p.weight_format
    q = p.quantize.name + (f" in groups of {p.quantize.group_size}" if p.quantize.name == "int4" else "")
    return f"decoder matrices {q} with their scales, the rest {p.weight_format}"


def format_plan(p: Plan, name: str = "") -> str:
    mesh = ",".join(f"{a}={s}" for a, s in p.mesh)
    lines = [f"plan{' for ' + name if name else ''} on mesh {mesh} ({p.devices} devices), "
             f"batch {p.batch}, max length {p.max_len:,} tokens",
             f"weights ({_describe_weights(p)}), per device:"]
    for part in sorted(p.weights_by_part, key=lambda k: -p.weights_by_part[k]):
        lines.append(f"  {part:<28}{_gib(p.weights_by_part[part])}")
    lines += [
        f"  {'total':<28}{_gib(p.weights)}   (all devices: {p.weights_total / GiB:.2f} GiB)",
        f"KV cache ({p.kv_format}), per device:  {_gib(p.kv_cache)}   "
        f"(chunked layers capped at the chunk; uncapped it would be {p.kv_cache_uncapped / GiB:.2f} GiB)",
        f"activations (estimate, prefill chunk {p.prefill_chunk:,}): {_gib(p.activations)}",
        f"total per device: {p.total / GiB:.2f} GiB of {p.device_memory / GiB:.1f} GiB -> "
        + ("fits" if p.fits else "DOES NOT FIT"),
        f"the weights alone need at least {p.min_devices_for_weights} device(s) of {p.device_memory / GiB:.0f} GiB",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named config: scout, maverick, behemoth-estimate, tiny")
    src.add_argument("--config", help="a checkpoint directory or config.json")
    parser.add_argument("--mesh", default="data=1", help="mesh spec, e.g. expert=8 or data=2,expert=2,tensor=2")
    parser.add_argument("--rules", choices=("default", "fsdp"), default="default", help="sharding rule set")
    parser.add_argument("--dtype", default="bf16", metavar="{bf16,fp16,fp32}", help="float dtype of the weights")
    parser.add_argument("--quantize", default=None, metavar="{int8,int4,fp8}",
                        help="quantize the decoder layers' matrices (what load(..., quantize=) produces)")
    parser.add_argument("--group-size", default=None, metavar="N", help="int4: elements per scale (default 128)")
    parser.add_argument("--kv-dtype", choices=sorted(KV_FORMATS), default=None,
                        help="KV cache format (default: the weight dtype)")
    parser.add_argument("--max-len", type=int, default=8192, help="tokens per row the KV cache holds")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill piece (default: what generate uses, the attention chunk)")
    parser.add_argument("--device-memory", type=float, default=80.0, help="GiB of memory per device")
    parser.add_argument("--text-only", action="store_true", help="leave out the vision tower")


def _bad_arguments(args) -> str | None:
    """What is wrong with the command line before any config is read (None: nothing)."""
    if any(not part.strip() for part in str(args.mesh).split(",")):
        return f"--mesh {args.mesh!r}: empty axis entry; write e.g. data=2,expert=2"
    for flag, value in (("--max-len", args.max_len), ("--batch", args.batch), ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            return f"{flag} must be >= 1, got {value}"
    if not args.device_memory > 0:  # also refuses nan
        return f"--device-memory must be > 0 GiB, got {args.device_memory}"
    if args.dtype not in WEIGHT_FORMATS:
        hint = f" ({args.dtype} is a quantization: --quantize {args.dtype})" if args.dtype in quant.FORMATS else ""
        return f"--dtype must be one of {sorted(WEIGHT_FORMATS)}, got {args.dtype!r}{hint}"
    try:
        _weight_format(args)
    except quant.QuantError as e:
        return str(e)
    return None


def _weight_format(args) -> quant.QuantFormat | None:
    """--quantize / --group-size as a format (None: float); QuantError on a bad value."""
    return quant.parse_format(args.quantize, args.group_size)


def run(args) -> int:
    """`llama4-jax plan`: print the plan. A user's mistake (unknown preset, bad mesh
    spec, non-positive sizes, unreadable config) is one line on stderr and exit code 2."""
    from .config import ConfigError

    problem = _bad_arguments(args)
    if problem is None:
        try:
            return _run(args)
        except (ConfigError, sharding.ShardingError, OSError) as e:
            problem = str(e)
    print(f"llama4-jax plan: error: {problem}", file=sys.stderr)
    return 2


def _run(args) -> int:
    from .config import load_config, preset

    config = preset(args.preset) if args.preset else load_config(args.config)
    if args.text_only:
        config = config.replace(vision=None)
    mesh = sharding.abstract_mesh(args.mesh)
    rules = sharding.fsdp_rules(mesh) if args.rules == "fsdp" else sharding.default_rules(mesh)
    p = plan(config, mesh, rules=rules, weight_format=args.dtype, quantize=_weight_format(args),
             kv_format=args.kv_dtype, batch=args.batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
             device_memory_gib=args.device_memory)
    print(format_plan(p, args.preset or args.config))
    return 0
