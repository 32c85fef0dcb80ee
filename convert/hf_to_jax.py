"""Hugging Face checkpoint -> converted (orbax) directory.

    python convert/hf_to_jax.py /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-jax
    python convert/hf_to_jax.py SRC DST --dtype bfloat16 --overwrite

The same conversion as `llama4-jax convert SRC DST` (see `llama4_jax/convert.py`):
streams one tensor at a time, keeps the source's dtype unless `--dtype` is given,
carries the tokenizer and generation files, writes atomically.
"""

import sys

from llama4_jax.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], to_hf=False, prog="convert/hf_to_jax.py", description=__doc__.splitlines()[0]))
