"""Write a checkpoint's weights as one safetensors file or a Hugging Face folder.

`elixir export CKPT --out model.safetensors` writes one consolidated file with the model's own
parameter names; `--out FOLDER` (any path not ending in .safetensors) writes a folder that
transformers' `from_pretrained` loads when the checkpoint is of a Hugging Face model (its
config.json is kept in the checkpoint). No model is built and no process group started: tensors
are assembled from the rank files one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys

from elixir.checkpoint.manifest import MANIFEST
from elixir.hardware import parse_bytes
from elixir.plan import DTYPE_FLAGS

DTYPES = tuple(DTYPE_FLAGS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder (written by elixir.save or train --out)")
    p.add_argument("--out", metavar="PATH", required=True, help="a .safetensors file, or a folder")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype of the written weights (default: fp32)")
    p.add_argument(
        "--max-shard-size", metavar="BYTES", default="5GiB",
        help="largest file of a folder export, e.g. 2GiB (default: 5GiB)",
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from elixir.checkpoint import export_checkpoint
    from elixir.checkpoint.weights import check_output

    ckpt = args.checkpoint
    if not os.path.isfile(os.path.join(ckpt, MANIFEST)) and os.path.isfile(os.path.join(ckpt, "last", MANIFEST)):
        ckpt = os.path.join(ckpt, "last")
    try:
        max_shard = parse_bytes(args.max_shard_size)
    except ValueError as e:
        parser.error(f"--max-shard-size: {e}")
    if max_shard <= 0:
        parser.error(f"--max-shard-size {args.max_shard_size} must be above 0")
    try:
        check_output(args.out, 0)  # the flag's own check, before the checkpoint is read; sizes come next
    except ValueError as e:
        parser.error(f"--out {e}")
    try:
        written = export_checkpoint(ckpt, args.out, dtype=args.dtype, max_shard_bytes=max_shard)
    except ValueError as e:  # a damaged checkpoint (CheckpointError), or an output without the room for it
        parser.error(str(e))
    except OSError as e:  # the write itself failed (a disk that filled meanwhile): it names the output path
        print(f"elixir export: {e}", file=sys.stderr)
        return 1
    total = sum(os.path.getsize(f) for f in written)
    print(f"wrote {len(written)} file(s), {total / 2**20:.1f} MiB, to {args.out}")
    return 0
