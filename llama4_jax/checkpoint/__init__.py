"""Checkpoints: Hugging Face safetensors in and out, the converted (orbax) format, FP8.

One concern per module:

  names           the one HF name map (`Rule`, `Entry`, `checkpoint_entries`), the
                  HF <-> our-layout transforms, `plan_leaves`;
  safetensors_io  `SafetensorsReader` (validated headers, regions read with `pread`),
                  `write_safetensors`;
  quantized       FP8 stored formats (`read_quantization`, scales checked against their
                  tensors by `check_fp8_scales`, dequantizing or keeping them) and
                  quantizing one weight as it is read (`quantize_piece`);
  hf              `load_hf` (streaming, sharded, optionally quantizing) and `save_hf`
                  (exact export);
  converted       `convert_hf_to_orbax` (optionally quantized), `quantize_converted`,
                  `load_orbax`, `convert_orbax_to_hf`, `load_checkpoint` (either kind of
                  directory; `llama4_jax.load` wraps it), `load_format`,
                  `check_load_dtype`, `check_converted` (stored shapes, from metadata);
  atomic          `atomic_dir` (a write completes at its destination or leaves nothing);
  base            the error type and nested-dict/dtype helpers they share.

The public names are re-exported here: `from llama4_jax.checkpoint import load_hf`.
"""

from __future__ import annotations

from .atomic import atomic_dir
from .base import CheckpointError
from .converted import (FORMAT_FILE, FORMAT_VERSION, QUANTIZED_FORMAT_VERSION, check_converted, check_load_dtype,
                        convert_hf_to_orbax, convert_orbax_to_hf, describe_format, is_converted, load_checkpoint,
                        load_format, load_orbax, quantize_converted)
from .hf import load_hf, save_hf
from .names import (TEXT_EXPERT_MAP, TEXT_GLOBAL_MAP, TEXT_LAYER_MAP, VISION_GLOBAL_MAP, VISION_LAYER_MAP, Entry,
                    Leaf, Rule, checkpoint_entries, hf_shape, plan_leaves, text_entries, text_prefix, to_hf,
                    vision_entries)
from .quantized import check_fp8_scales, fp8_weight_names, read_quantization
from .safetensors_io import SafetensorsReader, TensorInfo, write_safetensors

__all__ = [
    "Rule", "Entry", "Leaf", "TEXT_LAYER_MAP", "TEXT_GLOBAL_MAP", "TEXT_EXPERT_MAP", "VISION_LAYER_MAP",
    "VISION_GLOBAL_MAP", "vision_entries", "text_entries", "text_prefix", "checkpoint_entries", "hf_shape",
    "to_hf", "plan_leaves", "CheckpointError", "SafetensorsReader", "TensorInfo", "write_safetensors",
    "read_quantization", "load_hf", "save_hf", "load_checkpoint", "convert_hf_to_orbax", "convert_orbax_to_hf",
    "load_orbax", "is_converted", "FORMAT_FILE", "FORMAT_VERSION", "QUANTIZED_FORMAT_VERSION", "atomic_dir",
    "load_format", "quantize_converted", "describe_format", "check_load_dtype", "check_converted",
    "check_fp8_scales", "fp8_weight_names",
]
