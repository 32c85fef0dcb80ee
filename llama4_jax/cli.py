"""The `llama4-jax` command.

Each subcommand lives next to the code it drives and exposes two functions,
`add_arguments(parser)` and `run(args) -> int`; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "generate": ("llama4_jax.generate_cli", "batched offline inference: JSONL prompts in, JSONL completions out"),
    "convert": ("llama4_jax.convert", "convert a Hugging Face checkpoint to orbax (or back with --to-hf)"),
    "train": ("llama4_jax.trainer", "train or fine-tune on JSONL text or prompt/completion pairs (optax AdamW)"),
    "plan": ("llama4_jax.plan", "per-device memory plan for a config on a mesh"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama4-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
