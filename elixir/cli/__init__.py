"""The `elixir` command: one subcommand per job (train, plan, bench, export).

Each subcommand lives in its own module (or package) with two functions: `add_arguments(parser)`
declares its flags and `run(args, parser) -> int` does the job, reporting bad flag values through
`parser.error` (one line naming the value and the fix, exit status 2) before anything is built. A
subcommand whose defaults may come from files (`train --config`, `train --resume`) also has
`layer_defaults(args, parser) -> bool`; the command line is then parsed again over them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from elixir.cli import bench, export, plan, train

_SUBCOMMANDS = {
    "train": (train, "train a model (default: the small GPT on the embedded corpus)"),
    "plan": (plan, "profile a model on the meta device and search the fastest plan that fits a machine"),
    "bench": (bench, "Elixir side by side with PyTorch, FSDP2 and DeepSpeed ZeRO-3 on this machine"),
    "export": (export, "write a checkpoint's weights as one safetensors file or a Hugging Face folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elixir",
        description="Train LLMs with model data in chunks placed over device memory, host memory and ranks.",
    )
    from elixir import __version__

    parser.add_argument("--version", action="version", version=f"elixir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p, _layer=getattr(module, "layer_defaults", None))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments of an `elixir` command line, with the defaults its subcommand layers from files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._layer is not None:
        try:
            layered = args._layer(args, args._parser)
        except ValueError as e:
            args._parser.error(str(e))
        if layered:
            args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `elixir` console script and of `python -m elixir`; returns the exit status."""
    args = parse_args(argv)
    return args._run(args, args._parser)
