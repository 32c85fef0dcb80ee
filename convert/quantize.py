"""Quantize a checkpoint: Hugging Face (or a converted float directory) -> a converted
directory of int8 / int4 / fp8 weights.

    python convert/quantize.py /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-int4 --quantize int4
    python convert/quantize.py /ckpt/Llama-4-Maverick-17B-128E-Instruct-FP8 /ckpt/maverick-fp8 --quantize fp8
    python convert/quantize.py /ckpt/Llama-4-Maverick-17B-128E-Instruct-FP8 /ckpt/maverick-int4 --quantize int4

The same conversion as `llama4-jax convert SRC DST --quantize FMT` (see
`llama4_jax/convert.py`): the attention, dense-MLP, shared- and routed-expert matrices
are quantized one tensor at a time as they are read (bitwise what
`llama4_jax.load(SRC, quantize=FMT)` gives); embeddings, LM head, norms, router and
vision tower keep the source dtype (or `--dtype`). An FP8 source keeps its stored e4m3
weights and per-channel scales with `--quantize fp8`, and is dequantized then
re-quantized for int8 / int4 (FP8 -> int4). `llama4_jax.load(DST)` restores the
quantized tree as it is; check it with `convert/verify.py SRC DST`.
"""

import sys

from llama4_jax.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], to_hf=False, quantize_required=True, prog="convert/quantize.py",
                  description=__doc__.splitlines()[0]))
