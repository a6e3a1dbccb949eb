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
    """The `elixir` command line, run in this process; returns the exit status (see `console`)."""
    args = parse_args(argv)
    return args._run(args, args._parser)


# [Note: leaving a process that had a process group]
# A rank whose run is over (its group destroyed, its files written and closed) now and then aborted under load in
# the interpreter's teardown, after Python's own: "terminate called without an active exception", a native thread
# object of the distributed stack destroyed while joinable in a static destructor. The run had succeeded, but
# torchrun saw exit status -6 and reported the job failed. The `elixir` command therefore leaves such a process
# as the test harness's ranks do (tests/dist.py): Python's exit handlers run (atexit: loggers, trackers, the disk
# tier's scratch file), the standard streams are flushed, and `os._exit` ends the process with the run's status
# without the native teardown. A process that joined no group leaves as usual.
def console() -> None:
    """Entry point of the `elixir` console script and of `python -m elixir`: `main`, then leave (see the Note)."""
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    leave(status)


def leave(status) -> None:
    """End this process with `status` as the `elixir` command does (see the Note): scripts whose ranks joined a
    process group through `elixir.init_distributed` (bench/soak.py) leave the same way."""
    from elixir import comm

    if not comm.joined_group or not (status is None or isinstance(status, int)):
        raise SystemExit(status)
    import atexit
    import os
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
