"""`llama4-jax convert SRC DST`: Hugging Face safetensors <-> our converted (orbax) format.

    llama4-jax convert /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-jax --dtype bfloat16
    llama4-jax convert /ckpt/scout-jax /ckpt/scout-hf --to-hf
    llama4-jax convert /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-int4 --quantize int4

HF -> orbax streams one tensor at a time (host memory about one tensor) and keeps the
source's dtype unless `--dtype` says otherwise (FP8 checkpoints are dequantized to the
dtype their config names); the tokenizer, chat template, processor and generation
config files come along, so a converted directory serves `llama4-jax generate`.
`--quantize int8|int4|fp8` (`--group-size` for int4) stores the decoder layers' weight
matrices quantized as they are read, exactly as `llama4_jax.load(SRC, quantize=)` would
(FP8 checkpoints keep their e4m3 weights with fp8); `load(DST)` restores that tree as it
is. SRC may also be a converted directory of float weights. A quantized directory
cannot be quantized again or exported with `--to-hf`. FP8 scales that do not fit
their tensors, and stored arrays of a converted SRC whose shapes do not match its
config, are refused before any work (exit 2, the tensor named).
`--to-hf` writes sharded safetensors, an index and config.json that transformers loads.
The result is written into a temporary sibling of DST and renamed at the end, so an
interrupted conversion never leaves a half-written DST; an existing DST is refused
unless `--overwrite`, and a DST that is, contains or lies inside SRC (symlinks
resolved) is always refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import checkpoint as ck
from . import quant
from .checkpoint.base import _DTYPES
from .config import ConfigError
from .processor import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser, *, to_hf: bool | None = None,
                  quantize_required: bool = False, quantize: str | None = None, fp8_source: bool = False) -> None:
    """The options of `llama4-jax convert`; `to_hf` fixes the direction (the scripts in
    `convert/`) instead of offering `--to-hf`; `quantize_required` makes `--quantize`
    mandatory (`convert/quantize.py`); `quantize` fixes the format instead of offering
    `--quantize`, and `fp8_source` accepts only Hugging Face checkpoints with FP8 weights
    (`convert/fp8_to_int4.py`)."""
    parser.add_argument("src", help="Hugging Face checkpoint directory with FP8 weights" if fp8_source else
                        "Hugging Face checkpoint directory (or a converted one: exported with --to-hf, "
                        "or quantized with --quantize)")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    if to_hf is None:
        parser.add_argument("--to-hf", action="store_true",
                            help="export a converted directory back to HF safetensors")
    else:
        parser.set_defaults(to_hf=to_hf)
    parser.add_argument("--dtype", default=None, choices=list(_DTYPES),
                        help="parameter dtype (default: the source's: config.json's dtype for HF -> orbax, "
                        "the stored dtype for --to-hf)")
    parser.set_defaults(fp8_source=fp8_source)
    if quantize is not None:
        parser.set_defaults(quantize=quantize)
    elif to_hf is not True:
        parser.add_argument("--quantize", default=None, metavar="{int8,int4,fp8}", required=quantize_required,
                            help="store the decoder layers' weight matrices quantized"
                            + ("" if quantize_required else " (default: float)"))
    if to_hf is not True and quantize in (None, "int4"):
        parser.add_argument("--group-size", default=None, metavar="N",
                            help="int4: elements of the contraction per scale (default 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard written by --to-hf, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_size(s: str) -> int:
    """'5GB' -> 5 * 2**30 bytes (KB/MB/GB/TB are powers of 1024; a bare number is bytes)."""
    units = {"TB": 1 << 40, "GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    t = s.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"--max-shard-size: cannot parse {s!r}; write e.g. 5GB or 500MB") from None


def check_paths(src: str, dst: str, *, overwrite: bool) -> str | None:
    """Why converting `src` into `dst` must not start (None: it may).

    Real paths are compared (symlinks and symlinked parents resolved), so no DST can
    reach the source: DST equal to SRC, inside it, or an ancestor of it is refused,
    since replacing DST would delete the source or write into it.
    """
    if not os.path.exists(src):
        return f"source does not exist: {src}"
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rs == rd:
        return f"source and destination are the same directory: {rs}"
    if os.path.commonpath([rs, rd]) == rd:
        return f"destination {dst} contains the source {src} (replacing it would delete the source)"
    if os.path.commonpath([rs, rd]) == rs:
        return f"destination {dst} is inside the source {src}"
    if os.path.lexists(dst) and not overwrite:
        return f"destination already exists: {dst} (pass --overwrite to replace it)"
    return None


def weight_format(args: argparse.Namespace) -> quant.QuantFormat | None:
    """The --quantize / --group-size format (None: float); a bad value raises QuantError."""
    return quant.parse_format(getattr(args, "quantize", None), getattr(args, "group_size", None))


def check_formats(args: argparse.Namespace, fmt: quant.QuantFormat | None) -> str | None:
    """Why this conversion of formats cannot be done (None: it can), before any work.

    Also checks, from headers and metadata alone, what the conversion would otherwise
    find only part way through: a Hugging Face source's FP8 scales against their
    tensors, a converted source's stored arrays against its config (both raise
    CheckpointError naming the tensor); with `args.fp8_source` a source without FP8
    weights is refused.
    """
    src = args.src
    converted = os.path.isdir(src) and ck.is_converted(src)
    stored = ck.load_format(src) if converted else None
    if getattr(args, "fp8_source", False):
        if converted:
            return (f"{src} is a converted directory; this script reads a Hugging Face FP8 checkpoint (quantize a "
                    "converted float directory with convert/quantize.py --quantize int4)")
        if not ck.check_fp8_scales(ck.SafetensorsReader(src)):
            return (f"{src} has no FP8 weights (no float8 tensors): nothing to convert from FP8; quantize a float "
                    "checkpoint with convert/quantize.py --quantize int4")
    if args.to_hf:
        if fmt is not None:
            return ("--quantize applies to conversion into the converted format; exporting quantized weights to "
                    "Hugging Face safetensors (--to-hf) is not supported")
        if stored is not None:
            return (f"{src} holds weights quantized as {ck.describe_format(stored)}; --to-hf exports float weights "
                    "only (export the float checkpoint it was made from)")
        return None
    if converted and stored is not None:
        return (f"{src} is already quantized as {ck.describe_format(stored)}: nothing to convert; quantize the "
                "float checkpoint it was made from to change the format")
    if converted and fmt is None:
        return f"{src} is already a converted checkpoint: pass --to-hf to export it, or --quantize to quantize it"
    if converted:
        ck.check_converted(src)
    elif os.path.isdir(src):
        ck.check_fp8_scales(ck.SafetensorsReader(src))
    return None


def run(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    progress = not args.no_progress
    problem = check_paths(src, dst, overwrite=args.overwrite)
    fmt = None
    if not problem:
        try:
            fmt = weight_format(args)
            problem = check_formats(args, fmt)
        except (quant.QuantError, ck.CheckpointError, ConfigError) as e:
            problem = str(e)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.to_hf:
            if not ck.is_converted(src):
                raise ck.CheckpointError(f"{src} is not a converted checkpoint (no {ck.FORMAT_FILE}); "
                                         "--to-hf exports directories written by `llama4-jax convert`")
            shard = parse_size(args.max_shard_size)
            ck.atomic_dir(dst, overwrite=args.overwrite, write=lambda out: ck.convert_orbax_to_hf(
                src, out, dtype=args.dtype, progress=progress, max_shard_bytes=shard))
        elif ck.is_converted(src):  # a float converted directory, quantized (check_formats)
            ck.atomic_dir(dst, overwrite=args.overwrite, write=lambda out: ck.quantize_converted(
                src, out, fmt, dtype=args.dtype, progress=progress))
        else:
            ck.atomic_dir(dst, overwrite=args.overwrite, write=lambda out: ck.convert_hf_to_orbax(
                src, out, dtype=args.dtype, progress=progress, quantize=fmt))
    except (ck.CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    dt = time.perf_counter() - t0
    what = f", quantized as {ck.describe_format(fmt)}" if fmt is not None else ""
    print(f"wrote {dst}{what}: {size / 2**20:.1f} MiB in {dt:.1f} s ({size / 2**20 / max(dt, 1e-9):.1f} MiB/s)")
    return 0


def main(argv=None, *, to_hf: bool | None = None, quantize_required: bool = False, quantize: str | None = None,
         fp8_source: bool = False, prog: str | None = None, description: str | None = None) -> int:
    """Parse `argv` and convert: the entry point of the scripts in `convert/` (the
    keywords as for `add_arguments`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, to_hf=to_hf, quantize_required=quantize_required, quantize=quantize,
                  fp8_source=fp8_source)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------
# Verification: a converted (or quantized) checkpoint against its source
# --------------------------------------------------------------------------------------

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "12+30=")


def verify(reference, candidate, prompts, *, max_new_tokens: int = 8) -> dict:
    """Compare two loaded models of the same config on token-id prompts.

    reference, candidate: (config, params) pairs (the candidate may be quantized).
    Per prompt: the largest |logit difference| over the prompt's positions, and each
    model's greedy continuation of `max_new_tokens` tokens (full forwards of one
    right-padded batch, so each parameter tree compiles once). Returns
    {"prompts": [{"tokens", "max_abs_diff", "argmax_agree", "reference", "candidate",
    "greedy_equal"}], "max_abs_diff", "argmax_agreement", "greedy_identical"}, where
    argmax_agree counts prompt positions whose next-token choice is the same, and
    greedy_equal the generated tokens equal before the first difference.
    """
    import numpy as np

    from .model.text import forward

    (config, ref), (config_c, cand) = reference, candidate
    if config.text != config_c.text:
        raise ValueError("verify: the two checkpoints have different text configs")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or min(map(len, prompts)) < 1 or max_new_tokens < 0:
        raise ValueError("verify: needs non-empty prompts and max_new_tokens >= 0")
    n = [len(p) for p in prompts]
    width = max(n) + max_new_tokens
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, :n[i]], mask[i, :n[i]] = p, True
    step = lambda params, x, m: forward(config, params, x, attention_mask=m)  # noqa: E731 (forward is jitted)

    def run(params):
        x, m = ids.copy(), mask.copy()
        first, out = None, [[] for _ in prompts]
        for t in range(max_new_tokens + 1):
            logits = np.asarray(step(params, x, m), np.float32)
            first = logits if first is None else first
            if t == max_new_tokens:
                break
            for i in range(len(prompts)):
                tok = int(np.argmax(logits[i, n[i] + t - 1]))
                x[i, n[i] + t], m[i, n[i] + t] = tok, True
                out[i].append(tok)
        return first, out

    logits_r, greedy_r = run(ref)
    logits_c, greedy_c = run(cand)
    rows = []
    for i in range(len(prompts)):
        a, b = logits_r[i, :n[i]], logits_c[i, :n[i]]
        same = 0
        while same < max_new_tokens and greedy_r[i][same] == greedy_c[i][same]:
            same += 1
        rows.append({"tokens": n[i], "max_abs_diff": float(np.abs(a - b).max()),
                     "argmax_agree": int((a.argmax(-1) == b.argmax(-1)).sum()), "reference": greedy_r[i],
                     "candidate": greedy_c[i], "greedy_equal": same})
    return {"prompts": rows, "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "argmax_agreement": sum(r["argmax_agree"] for r in rows) / sum(n),
            "greedy_identical": sum(r["greedy_equal"] == max_new_tokens for r in rows)}


def format_verify(report: dict, max_new_tokens: int) -> str:
    lines = [f"prompt {i} ({r['tokens']} tokens): max |logit diff| {r['max_abs_diff']:.6g}, next-token argmax "
             f"agrees at {r['argmax_agree']}/{r['tokens']} positions, greedy {r['greedy_equal']}/{max_new_tokens} "
             "tokens equal" for i, r in enumerate(report["prompts"])]
    lines.append(f"overall: max |logit diff| {report['max_abs_diff']:.6g}; next-token argmax agreement "
                 f"{100 * report['argmax_agreement']:.1f}%; greedy continuations identical "
                 f"{report['greedy_identical']}/{len(report['prompts'])}")
    return "\n".join(lines)


def _verify_prompts(args, path: str, vocab_size: int) -> list[list[int]]:
    """--prompt texts (or the defaults) through the source's tokenizer when it has one,
    else --random-prompts seeded random token ids."""
    import numpy as np

    has_tokenizer = any(f.startswith("tokenizer") for f in os.listdir(path))
    if args.prompt or (has_tokenizer and not args.random_prompts):
        if not has_tokenizer:
            raise ck.CheckpointError(f"{path} has no tokenizer files to encode --prompt; use --random-prompts N")
        tok = load_tokenizer(path)
        return [tok(t)["input_ids"] for t in (args.prompt or DEFAULT_PROMPTS)]
    rng = np.random.RandomState(0)
    return [rng.randint(0, vocab_size, 16 + 5 * i).tolist() for i in range(args.random_prompts or 3)]


def verify_main(argv=None, *, prog: str | None = None, description: str | None = None) -> int:
    """`convert/verify.py SRC [DST]`: the logits of DST (or of SRC loaded with
    --quantize) against SRC's on a few prompts; exit 1 if --atol is exceeded."""
    import llama4_jax

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("src", help="the source checkpoint (the reference), loaded in --dtype")
    parser.add_argument("dst", nargs="?", default=None,
                        help="the converted or quantized checkpoint to check (default: SRC itself, with --quantize)")
    parser.add_argument("--quantize", default=None, metavar="{int8,int4,fp8}",
                        help="load the checked checkpoint quantized (a stored quantized DST needs none)")
    parser.add_argument("--group-size", default=None, metavar="N", help="int4 group size with --quantize")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype both are loaded in (default float32)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable; needs a tokenizer)")
    parser.add_argument("--random-prompts", type=int, default=0, metavar="N",
                        help="N random token-id prompts instead of text (the default without a tokenizer: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared per prompt")
    parser.add_argument("--atol", type=float, default=None, help="exit 1 if the max |logit diff| exceeds this")
    args = parser.parse_args(argv)
    dst = args.dst or args.src
    try:
        fmt = weight_format(args)
        if args.dst is None and fmt is None:
            raise ValueError("give DST, or --quantize to check SRC loaded quantized")
        ref = llama4_jax.load(args.src, dtype=args.dtype)
        prompts = _verify_prompts(args, args.src, ref[0].text.vocab_size)
        cand = llama4_jax.load(dst, dtype=args.dtype, quantize=fmt)
        report = verify(ref, cand, prompts, max_new_tokens=args.max_new_tokens)
    except (ck.CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = quant.params_format(cand[1])
    print(f"{dst}{', quantized as ' + ck.describe_format(fmt) + ',' if fmt else ''} against {args.src} "
          f"({args.dtype}):")
    print(format_verify(report, args.max_new_tokens))
    return 1 if args.atol is not None and report["max_abs_diff"] > args.atol else 0

