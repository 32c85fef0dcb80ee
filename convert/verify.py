"""Check a converted or quantized checkpoint against its source: logits and greedy tokens.

    python convert/verify.py /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-int4
    python convert/verify.py /ckpt/scout-hf /ckpt/scout-jax --atol 1e-5
    python convert/verify.py SRC --quantize int8 --prompt "12+30=" --max-new-tokens 16

Loads SRC (the reference) and DST (or SRC itself loaded with `--quantize`) in
`--dtype` (float32 by default), runs both on a few prompts (`--prompt` texts through
SRC's tokenizer, the built-in defaults, or `--random-prompts N` token ids when there is
no tokenizer) and prints, per prompt and overall, the largest |logit difference|, how
often the next-token argmax agrees over the prompt, and how many greedy tokens agree.
Exit status 1 when `--atol` is given and exceeded. Both models are held at once.
"""

import sys

from llama4_jax.convert import verify_main

if __name__ == "__main__":
    sys.exit(verify_main(sys.argv[1:], prog="convert/verify.py", description=__doc__.splitlines()[0]))
