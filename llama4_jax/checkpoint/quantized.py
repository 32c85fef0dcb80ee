"""Quantized stored formats: FP8 checkpoints, read and dequantized.

Float8 e4m3 tensors with per-output-channel scales (compressed-tensors: per-expert
`experts.{e}.{gate,up,down}_proj.weight` + `weight_scale` [out, 1]; fbgemm:
`experts.gate_up_proj` + `gate_up_proj_scale` [E, 1, 2F], `experts.down_proj` +
`down_proj_scale` [E, D, 1], Linear `weight` + `weight_scale`) are dequantized on read,
`w = float32(w8) * scale`, then cast to the requested dtype. `quantization_config`
in config.json is validated first (`read_quantization`); the checkpoint's
`input_scale`s (static activation bounds) are not used (`_is_ignored`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .base import CheckpointError
from .safetensors_io import SafetensorsReader, _norm_region


def _is_ignored(name: str) -> str | None:
    """Why a checkpoint tensor is deliberately not read (None: it must be consumed)."""
    if name.endswith(("input_scale", "input_scale_ub")):
        # Static activation-quantization bounds of FP8 checkpoints: we dequantize the
        # weights and run activations unquantized, so they have no use.
        return "FP8 activation scale"
    return None


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
