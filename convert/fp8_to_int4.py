"""FP8 -> int4: a Hugging Face FP8 checkpoint -> a converted directory of int4 weights.

    python convert/fp8_to_int4.py /ckpt/Llama-4-Maverick-17B-128E-Instruct-FP8 /ckpt/maverick-int4
    python convert/fp8_to_int4.py /ckpt/Llama-4-Maverick-17B-128E-Instruct-FP8 /ckpt/maverick-int4-g64 --group-size 64

`convert/quantize.py SRC DST --quantize int4` restricted to FP8 sources (the same code,
`llama4_jax/convert.py`): the FP8 weights (compressed-tensors or fbgemm layout, e4m3
with per-channel or per-tensor scales) are dequantized in fp32 (`w8 * scale`) one
tensor at a time, in chunks of experts, and quantized to int4 in groups of
`--group-size` (128) along the contraction with zero points; the quantizable weights the
checkpoint stores in bf16/fp32 (those its quantization config leaves out, e.g. the
attention projections) are quantized from their values.
Bitwise what `llama4_jax.load(SRC, quantize="int4", group_size=N)` gives. Embeddings,
LM head, norms, router and vision tower keep the dtype the config names (or `--dtype`).
Refused with a one-line error and exit 2, nothing written: a source with no FP8
weights (use quantize.py), a converted directory, a scale whose shape does not fit its
tensor (named). Check the result with `convert/verify.py SRC DST`.
"""

import sys

from llama4_jax.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], to_hf=False, quantize="int4", fp8_source=True, prog="convert/fp8_to_int4.py",
                  description=__doc__.splitlines()[0]))
