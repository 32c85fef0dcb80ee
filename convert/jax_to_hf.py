"""Converted (orbax) directory -> Hugging Face safetensors that transformers loads.

    python convert/jax_to_hf.py /ckpt/scout-jax /ckpt/scout-hf --max-shard-size 5GB

The same export as `llama4-jax convert SRC DST --to-hf` (see `llama4_jax/convert.py`):
exact (bitwise) in the stored dtype unless `--dtype` is given, tokenizer and
generation files carried, written atomically.
"""

import sys

from llama4_jax.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], to_hf=True, prog="convert/jax_to_hf.py", description=__doc__.splitlines()[0]))
