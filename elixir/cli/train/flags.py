"""The flags of `elixir train`, and config files whose keys are those flags.

[Note: where a flag's value comes from]
Highest first: the command line; `--config FILE` (YAML, TOML or JSON; its keys are the long flag names,
`seq_len` and `seq-len` alike); the resolved config saved in the checkpoint that `--resume` names (so a
resumed run needs no other flag); the flag's default. A config file's values go through the same
parsers and choices as the command line's (the schema is the parser itself), and an unknown key is an
error that names the closest flag. The resolved config (every flag, defaults filled in) is written to
`--out` as train_config.json and into every checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os

from elixir.data import FORMATS, PACKINGS
from elixir.models import GPTConfig
from elixir.plan import DTYPE_FLAGS, HOMES

DTYPES = tuple(DTYPE_FLAGS)
PARAM_HOMES = tuple(h for h in HOMES if h != "disk")  # parameter shards live on the device or the host
SHARD_OVER = ("auto", "world", "node")
SCHEDULES = ("cosine", "linear", "constant")
REPORTERS = ("tensorboard", "wandb")
MIN_CHUNK_MIB = 32.0
"""Default chunk size of a uniform plan when the largest parameter fits in it (the library's default)."""
DEFAULT_SEQ_LEN = 128
PLAN_FLAGS = ("chunk_mib", "cache_blocks", "resident", "param_home", "optim_home", "prefetch_depth")
"""Flags that make a uniform plan by hand instead of the planner's."""
NOT_SAVED = ("config", "resume", "command")
"""Flags that are not part of a run's resolved config (they say how this invocation started)."""
CONFIG_FILE = "train_config.json"
"""The resolved config, in `--out`."""


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; use {flag} N with N >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; use {flag} N with N >= {minimum}")
        return value

    return parse


def _float_in(flag: str, low: float, high: float = math.inf, *, low_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; use {flag} X") from None
        ok = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
        if not ok:
            where = f"{'above' if low_open else 'at least'} {low:g}"
            where += f" and at most {high:g}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text} must be finite and {where}; use {flag} X")
        return value

    return parse


def _positive_float(flag: str):
    return _float_in(flag, 0.0)


def _reporters(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in (*REPORTERS, "none")]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r} is not one of {', '.join(REPORTERS)}; use e.g. --report-to tensorboard"
        )
    return tuple(n for n in names if n != "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `elixir train`."""
    presets = GPTConfig.preset_names()
    p.add_argument(
        "--config", metavar="FILE", default=None,
        help="a YAML, TOML or JSON file of flags (keys are the long flag names, seq_len or seq-len); the command "
        "line overrides it",
    )
    job = p.add_argument_group("job")
    job.add_argument(
        "--model", default="small", metavar="NAME_OR_PATH",
        help=f"a GPT preset ({', '.join(presets)}; default: small, ~3.3M parameters, byte tokens), or a Hugging Face "
        "folder (config.json, safetensors weights, tokenizer) to fine-tune: built on the meta device and loaded "
        "chunk by chunk with elixir.load_pretrained",
    )
    job.add_argument(
        "--tokenizer", metavar="PATH", default=None,
        help="a folder with a Hugging Face tokenizer (default: the --model folder's own)",
    )
    job.add_argument(
        "--byte-tokens", action="store_true",
        help="feed a Hugging Face model raw UTF-8 bytes as token ids 0-255 instead of its tokenizer's ids",
    )
    job.add_argument(
        "--steps", type=_int_at_least(1, "--steps"), metavar="N", default=400, help="optimizer steps (default: 400)"
    )
    job.add_argument(
        "--batch-size", type=_int_at_least(1, "--batch-size"), metavar="N", default=None,
        help="sequences per micro-batch, over all ranks (default: 8, or the --plan file's micro-batch x ranks)",
    )
    job.add_argument(
        "--seq-len", type=_int_at_least(2, "--seq-len"), metavar="N", default=None,
        help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN}, at most the model's maximum)",
    )
    job.add_argument(
        "--grad-accum", type=_int_at_least(1, "--grad-accum"), metavar="N", default=None,
        help="micro-batches per optimizer step (default: 1, or the --plan file's)",
    )
    job.add_argument(
        "--dtype", default=None, choices=DTYPES,
        help="compute dtype (default: fp32 for GPT presets; bf16 for Hugging Face models where the device "
        "supports it, else fp32)",
    )
    job.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the init and the batches (default: 0)")
    job.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing: blocks recompute in backward"
    )

    data = p.add_argument_group("data")
    data.add_argument(
        "--data", metavar="PATH", default=None,
        help="a file or folder: text (.txt .md .rst .py, one document per file), .jsonl, .json arrays, .parquet, "
        ".csv, or a dataset saved with datasets.save_to_disk (default: the embedded corpus)",
    )
    data.add_argument(
        "--format", default="auto", choices=FORMATS,
        help="how rows become tokens: text (a field), chat (messages rendered with the tokenizer's chat template; "
        "only assistant tokens trained), instruction (prompt and response fields), pretokenized (input_ids, "
        "optional labels); auto tells them by their fields (default: auto)",
    )
    data.add_argument("--text-field", metavar="NAME", default="text", help="field of the text (default: text)")
    data.add_argument(
        "--messages-field", metavar="NAME", default=None, help="field of a chat's messages (default: messages, "
        "or conversations in ShareGPT's layout)",
    )
    data.add_argument(
        "--prompt-field", metavar="NAME", default=None,
        help="field of an instruction's prompt (default: prompt, instruction or question)",
    )
    data.add_argument(
        "--response-field", metavar="NAME", default=None,
        help="field of an instruction's response (default: response, completion, output or answer)",
    )
    data.add_argument(
        "--train-on-prompt", action="store_true",
        help="train on every token of chats and instructions, not only the assistant's (default: prompts masked)",
    )
    data.add_argument(
        "--packing", default="pack", choices=PACKINGS,
        help="pack: documents back to back in full rows, position ids restarting per document; pad: one "
        "document per row, padded, with an attention mask (default: pack)",
    )
    data.add_argument(
        "--val-fraction", type=_float_in("--val-fraction", 0.0, 0.5), metavar="X", default=0.05,
        help="fraction of the data held out for validation (default: 0.05)",
    )
    data.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="where tokenized data is cached, so that a second run starts at once (default: "
        "$ELIXIR_CACHE_DIR/tokens, else ~/.cache/elixir/tokens)",
    )

    opt = p.add_argument_group("optimizer (AdamW)")
    opt.add_argument(
        "--lr", type=_positive_float("--lr"), metavar="X", default=None,
        help="peak learning rate (default: 3e-3 for GPT presets, 2e-5 for Hugging Face models)",
    )
    opt.add_argument(
        "--warmup-steps", type=_int_at_least(0, "--warmup-steps"), metavar="N", default=None,
        help="steps of linear warmup (default: a tenth of --steps, at most 100; at least 1)",
    )
    opt.add_argument(
        "--schedule", default="cosine", choices=SCHEDULES,
        help="learning rate after warmup: cosine or linear decay to --min-lr-ratio, or constant (default: cosine)",
    )
    opt.add_argument(
        "--min-lr-ratio", type=_float_in("--min-lr-ratio", 0.0, 1.0, low_open=False), metavar="X", default=0.1,
        help="the learning rate at the end of a decay, as a fraction of the peak (default: 0.1)",
    )
    opt.add_argument(
        "--weight-decay", type=_float_in("--weight-decay", 0.0, low_open=False), metavar="X", default=None,
        help="decoupled weight decay of matrices and embeddings; biases and norms get none (default: 0.1 for GPT "
        "presets, 0.0 for Hugging Face models)",
    )
    opt.add_argument("--beta1", type=_float_in("--beta1", 0.0, 1.0, low_open=False), metavar="X", default=0.9,
                     help="AdamW beta1 (default: 0.9)")
    opt.add_argument(
        "--beta2", type=_float_in("--beta2", 0.0, 1.0, low_open=False), metavar="X", default=None,
        help="AdamW beta2 (default: 0.95 for GPT presets, 0.999 for Hugging Face models)",
    )
    opt.add_argument(
        "--clip", type=_float_in("--clip", 0.0, low_open=False), metavar="X", default=1.0,
        help="clip the global gradient norm to X, 0 for no clipping (default: 1.0)",
    )
    opt.add_argument(
        "--nonfinite", choices=("error", "skip"), default="error",
        help="a NaN or infinite gradient (bf16, fp32): 'error' stops, naming the step and the parameter, the model "
        "as before the step; 'skip' skips the step on every rank and counts it (default: error; fp16 has "
        "loss scaling instead)",
    )

    moe = p.add_argument_group("Mixture-of-Experts (GPT presets)")
    moe.add_argument(
        "--experts", type=_int_at_least(0, "--experts"), metavar="E", default=0,
        help="experts of every block's feed-forward layer, dropless top-k routing (default: 0, dense)",
    )
    moe.add_argument(
        "--top-k", type=_int_at_least(1, "--top-k"), metavar="K", default=2,
        help="experts per token, at most --experts (default: 2)",
    )
    moe.add_argument(
        "--ep-size", type=_int_at_least(1, "--ep-size"), metavar="N", default=1,
        help="expert parallel: each group of N ranks splits the experts, tokens travel by all-to-all; "
        "N divides --experts and the number of ranks (default: 1, every rank holds every expert)",
    )

    plan = p.add_argument_group(
        "plan (default: the planner searches the fastest plan that fits, from the first batch; the hand flags "
        "below make the same choices for every chunk instead)"
    )
    plan.add_argument(
        "--plan", metavar="auto|PLAN.json", default="auto",
        help="auto, or a plan written by `elixir plan --json` (its micro-batch, accumulation and checkpointing "
        "too) (default: auto)",
    )
    plan.add_argument(
        "--hardware", metavar="measure|NAME|FILE", default="measure",
        help="what the planner plans for: measure this machine (cached), a preset name (elixir plan --help lists "
        "them) or a Hardware JSON file (default: measure)",
    )
    plan.add_argument("--gpu-memory", metavar="BYTES", default=None,
                      help="device memory the plan may use, e.g. 20GiB (default: all of it)")
    plan.add_argument("--host-memory", metavar="BYTES", default=None,
                      help="host memory the plan may use, e.g. 64GiB (default: all of it)")
    plan.add_argument(
        "--chunk-mib", type=_positive_float("--chunk-mib"), metavar="MIB", default=None,
        help=f"hand plan: chunk (and cache block) size in MiB ({MIN_CHUNK_MIB:g}, or the largest parameter's)",
    )
    plan.add_argument(
        "--cache-blocks", type=_int_at_least(1, "--cache-blocks"), metavar="N", default=None,
        help="hand plan: device cache blocks for on-demand chunks (4)",
    )
    where = plan.add_mutually_exclusive_group()
    where.add_argument(
        "--resident", dest="resident", action="store_true", default=None,
        help="hand plan: keep every chunk gathered on the device for the whole step",
    )
    where.add_argument(
        "--on-demand", dest="resident", action="store_false",
        help="hand plan: gather chunks into the device cache only when used",
    )
    plan.add_argument(
        "--param-home", default=None, choices=PARAM_HOMES,
        help="hand plan: where each rank's parameter shard lives between uses; host needs --on-demand (device)",
    )
    plan.add_argument(
        "--optim-home", default=None, choices=HOMES,
        help="hand plan: where fp32 masters and optimizer states live and update; disk needs --disk (device)",
    )
    plan.add_argument(
        "--disk", metavar="DIR", default=None,
        help="scratch folder for masters and optimizer states on disk (--optim-home disk, or chosen by the planner): "
        "one preallocated file per rank, deleted at the end of the run",
    )
    plan.add_argument(
        "--shard-over", default="auto", choices=SHARD_OVER,
        help="on several nodes: shard every chunk over all ranks (world), or over the ranks of each node and "
        "replicate it across nodes (node: gathers stay inside a node, gradients cross nodes once per step); auto: "
        "the planner chooses per plan, world for a hand plan (default: auto)",
    )
    plan.add_argument(
        "--prefetch-depth", type=_int_at_least(0, "--prefetch-depth"), metavar="N", default=None,
        help="hand plan: on-demand chunks fetched ahead of use (2)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--log-every", type=_int_at_least(1, "--log-every"), metavar="N", default=20,
        help="steps between metrics (a line, a record in DIR/metrics.jsonl, the reporters) (default: 20)",
    )
    out.add_argument(
        "--eval-every", type=_int_at_least(0, "--eval-every"), metavar="N", default=100,
        help="steps between validation losses, 0 for only the final one (default: 100)",
    )
    out.add_argument(
        "--eval-batches", type=_int_at_least(1, "--eval-batches"), metavar="N", default=4,
        help="validation batches per evaluation (default: 4)",
    )
    out.add_argument(
        "--report-to", type=_reporters, metavar="NAMES", default=(),
        help="also send the metrics to tensorboard (into DIR/tensorboard) and/or wandb (WANDB_MODE=offline works "
        "without an account), comma-separated (default: none)",
    )
    out.add_argument("--quiet", action="store_true", help="print nothing")
    out.add_argument("--json", metavar="PATH", help="write the final losses and throughput as JSON (rank 0)")

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--out", metavar="DIR", default=None,
        help="save checkpoints to DIR/last (replaced atomically), every --save-every steps and at the end; the "
        "resolved config and metrics.jsonl go there too",
    )
    ckpt.add_argument(
        "--save-every", type=_int_at_least(1, "--save-every"), metavar="N", default=None,
        help="steps between checkpoints (needs --out; default: only at the end)",
    )
    ckpt.add_argument(
        "--keep-last", type=_int_at_least(1, "--keep-last"), metavar="K", default=None,
        help="also keep the last K checkpoints as DIR/step-NNNNNNN (hard links of DIR/last's files; default: "
        "only DIR/last)",
    )
    ckpt.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue from a checkpoint (--out's folder, DIR/last or DIR/step-N) with its saved config: no other "
        "flag is needed; any number of ranks and any plan; --steps is the total to reach. 'auto': from --out's "
        "last checkpoint when there is one, else from the start (the same command, relaunched after a "
        "preemption or a crash, goes on; once at --steps it exits 0 at once)",
    )

    ranks = p.add_argument_group("several ranks (launch with torchrun --nproc-per-node N)")
    ranks.add_argument(
        "--timeout", type=_positive_float("--timeout"), metavar="SECONDS", default=600.0,
        help="how long a collective waits for the other ranks before failing with a named error (default: 600)",
    )


# --- config files --------------------------------------------------------------------------------


def read_config_file(path: str) -> dict:
    """The mapping in a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file; ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} does not exist; pass a YAML, TOML or JSON file")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                values = tomllib.load(f)
        elif suffix == ".json":
            with open(path) as f:
                values = json.load(f)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(
                    f"--config {path!r}: YAML needs PyYAML (pip install 'elixir-train[data]'); or write it as TOML"
                ) from None
            with open(path) as f:
                values = yaml.safe_load(f)
        else:
            raise ValueError(f"--config {path!r}: name it .yaml, .yml, .toml or .json so its syntax is known")
    except ValueError as e:
        if str(e).startswith("--config"):
            raise
        raise ValueError(f"--config {path!r} could not be parsed: {e}") from None
    except Exception as e:  # the YAML and TOML parsers' errors carry the line: pass them on with the file
        raise ValueError(f"--config {path!r} could not be parsed: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} holds a {type(values).__name__}; it must be a mapping of flag: value")
    return values


def config_values(values: dict, parser: argparse.ArgumentParser, where: str) -> dict:
    """Flag values by destination, from a mapping keyed by long flag names, each checked and converted by
    the flag's own parser and choices (see [Note: where a flag's value comes from])."""
    actions = {}
    for a in parser._actions:  # the parser is the schema: every long flag, under both spellings
        for opt in a.option_strings:
            if opt.startswith("--"):
                actions[opt[2:]] = a
                actions[opt[2:].replace("-", "_")] = a
    out: dict = {}
    for key, value in values.items():
        a = actions.get(str(key))
        if a is None or a.dest in NOT_SAVED or a.dest == "help":
            close = difflib.get_close_matches(str(key), [k for k in actions if "_" in k or "-" not in k], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint} (keys are the long flags of elixir train --help)")
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {key} is {value!r}; it is a switch: true or false")
            out[a.dest] = a.const if value else not a.const
            continue
        if isinstance(value, (list, tuple)) and a.dest == "report_to":
            value = ",".join(map(str, value))
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"{where}: {key} is {value!r}; give one value, as on the command line ({flag} VALUE)")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            converted = a.type(text) if a.type is not None else text
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
        if a.choices is not None and converted not in a.choices:
            raise ValueError(f"{where}: {key} is {value!r}; choose one of {', '.join(map(str, a.choices))}")
        out[a.dest] = converted
    return out


def saved_config(resume: str) -> dict:
    """The resolved config saved in the checkpoint `resume` names ({} for a checkpoint without one)."""
    import torch

    from elixir.checkpoint.manifest import COMMON

    path = checkpoint_path(resume)
    if path is None:
        return {}
    try:
        common = torch.load(os.path.join(path, COMMON), weights_only=True)
    except (OSError, RuntimeError):
        return {}  # a damaged checkpoint: elixir.load names the file later
    return dict(((common or {}).get("extra") or {}).get("config") or {})


def checkpoint_path(resume: str) -> str | None:
    """The checkpoint folder of `--resume DIR`: DIR itself, DIR/last, or the `.old` copy an interrupted
    save left; None when there is none."""
    from elixir.checkpoint.manifest import MANIFEST

    for candidate in (resume, os.path.join(resume, "last")):
        for folder in (candidate, candidate + ".old"):
            if os.path.isfile(os.path.join(folder, MANIFEST)):
                return candidate
    return None


def layer_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Set `parser`'s defaults from `--config` and the `--resume` checkpoint's saved config; True when
    any was set (the command line must then be parsed again, to take precedence)."""
    from_file = config_values(read_config_file(args.config), parser, f"--config {args.config!r}") if args.config else {}
    resume = args.resume or from_file.get("resume")
    if resume == "auto":
        out = args.out or from_file.get("out")
        resume = checkpoint_path(out) if out else None
    from_checkpoint = {}
    if resume:
        saved = saved_config(resume)
        from_checkpoint = config_values(saved, parser, f"the config saved in {resume!r}") if saved else {}
    layered = {**from_checkpoint, **from_file}
    if not layered:
        return False
    parser.set_defaults(**layered)
    return True


def resolved_config(args: argparse.Namespace) -> dict:
    """Every flag's value after check_args filled in the defaults, by long flag name (a config file that
    reproduces the run)."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith("_") or key in NOT_SAVED:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
