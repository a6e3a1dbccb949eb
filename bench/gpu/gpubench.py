"""What the stages of bench/gpu/run.sh share: their flags, the device, the models (shrunk for --dry-run), JSON.

Every stage is a script run from the repository root (PYTHONPATH=. so that `elixir` imports without being
installed), writes its results to $OUT/<stage>.json as soon as it has them, and stops starting new
repetitions once its time box (--budget-s) is nearly spent, so that run.sh's hard timeout only ever cuts
a stage that hangs. With --dry-run a stage runs the same code on the CPU with tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from elixir import benchmark as B

GiB = 2**30
STARTED = time.perf_counter()


def parser(description: str, budget_s: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: the same code paths, in seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-out", help="folder for JSON results")
    p.add_argument("--budget-s", type=float, default=budget_s,
                   help=f"time box of the stage: no repetition starts after 80%% of it (default: {budget_s:g})")
    return p


def device_for(args) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run bench/gpu/run.sh --dry-run to try the stages on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def deadline(args) -> float:
    return STARTED + 0.8 * args.budget_s


def log(*a) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s]", *a, flush=True)


def shrunk_family_config(name: str, width: int = 64, layers: int = 2):
    """A family preset's transformers config with its sizes shrunk to a toy (same architecture and code)."""
    from elixir.models.families import family_config

    cfg = family_config(name)
    for attr, value in (("hidden_size", width), ("num_hidden_layers", layers), ("num_attention_heads", 4),
                        ("ffn_dim", 4 * width), ("word_embed_proj_dim", width), ("intermediate_size", 2 * width),
                        ("num_key_value_heads", 4), ("vocab_size", 512), ("max_position_embeddings", 128)):
        if hasattr(cfg, attr):
            setattr(cfg, attr, value)
    return cfg


def family_model(name: str, device, *, dry_run: bool, seed: int = 0, width: int = 64,
                 layers: int = 2) -> torch.nn.Module:
    """A family preset at its published size, or shrunk (to `width` and `layers`) for the dry run; dropout
    off, training mode."""
    if dry_run:
        return B.build_model(name, device=device, seed=seed, config=shrunk_family_config(name, width, layers))
    return B.build_model(name, device=device, seed=seed)


def vocab_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(cfg.vocab_size)


def machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
           "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def write_json(args, stage: str, data: dict) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stage}.json")
    data = {"stage": stage, "dry_run": args.dry_run, "date_utc": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "elapsed_s": time.perf_counter() - STARTED, **data}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def error_text(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]
