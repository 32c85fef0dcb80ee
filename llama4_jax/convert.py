"""`llama4-jax convert SRC DST`: Hugging Face safetensors <-> our converted (orbax) format.

    llama4-jax convert /ckpt/Llama-4-Scout-17B-16E-Instruct /ckpt/scout-jax --dtype bfloat16
    llama4-jax convert /ckpt/scout-jax /ckpt/scout-hf --to-hf

HF -> orbax streams one tensor at a time (host memory about one tensor) and keeps the
source's dtype unless `--dtype` says otherwise (FP8 checkpoints are dequantized to the
dtype their config names); the tokenizer, chat template, processor and generation
config files come along, so a converted directory serves `llama4-jax generate`.
`--to-hf` writes sharded safetensors, an index and config.json that transformers loads.
The result is written into a temporary sibling of DST and renamed at the end, so an
interrupted conversion never leaves a half-written DST; an existing DST is refused unless `--overwrite`, and a DST that is,
contains or lies inside SRC (symlinks resolved) is always refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import checkpoint as ck
from .checkpoint.base import _DTYPES
from .config import ConfigError


def add_arguments(parser: argparse.ArgumentParser, *, to_hf: bool | None = None) -> None:
    """The options of `llama4-jax convert`; `to_hf` fixes the direction (the scripts in
    `convert/`) instead of offering `--to-hf`."""
    parser.add_argument("src", help="Hugging Face checkpoint directory (or a converted one with --to-hf)")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    if to_hf is None:
        parser.add_argument("--to-hf", action="store_true",
                            help="export a converted directory back to HF safetensors")
    else:
        parser.set_defaults(to_hf=to_hf)
    parser.add_argument("--dtype", default=None, choices=list(_DTYPES),
                        help="parameter dtype (default: the source's: config.json's dtype for HF -> orbax, "
                        "the stored dtype for --to-hf)")
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


def run(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    progress = not args.no_progress
    problem = check_paths(src, dst, overwrite=args.overwrite)
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
        else:
            ck.atomic_dir(dst, overwrite=args.overwrite, write=lambda out: ck.convert_hf_to_orbax(
                src, out, dtype=args.dtype, progress=progress))
    except (ck.CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    dt = time.perf_counter() - t0
    print(f"wrote {dst}: {size / 2**20:.1f} MiB in {dt:.1f} s ({size / 2**20 / max(dt, 1e-9):.1f} MiB/s)")
    return 0


def main(argv=None, *, to_hf: bool | None = None, prog: str | None = None, description: str | None = None) -> int:
    """Parse `argv` and convert: the entry point of the scripts in `convert/`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, to_hf=to_hf)
    return run(parser.parse_args(argv))

