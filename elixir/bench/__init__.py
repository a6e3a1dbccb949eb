"""Side-by-side training benchmarks: Elixir against plain PyTorch, FSDP2 and DeepSpeed ZeRO-3.

The pieces that `elixir bench`, bench/bench_dist.py and the GPU benchmark under bench/gpu/ share, written
once so that every system trains the same model on the same batch with the same optimizer, and is timed
and measured the same way (docs/architecture.md, "How we measure"):

- models.py, `build_model` and `make_batch`: a GPT preset (elixir.models) or a public family preset (OPT,
  GPT-2, Llama dimensions; elixir.models.families), dropout off, from one seed; random token ids.
- systems.py, `build_pytorch` and `build_elixir`, and peers.py, `build_fsdp2` and `build_deepspeed`: a
  `System` (model, optimizer and one training step) from a deep copy of one base model, all with
  `torch.optim.AdamW(fused=True)` and the same hyper-parameters; no gradient clipping anywhere
  (DeepSpeed's default 1.0 is switched off). FSDP2 and DeepSpeed are imported only when built.
- runs.py, `compare`: warm-up steps, then repetitions in which every system runs its steps in turn (the
  order rotating), with a barrier and the slowest rank's time; per system the memory it keeps after being
  built plus the most it adds during a repetition, by a `MemoryMeter` (meters.py).
- report.py, `summarize` and `format_table`: medians, TFLOPS (6 x params x tokens / time, per rank), and
  ratios to Elixir computed within each repetition, then the median.

Importing this package imports no peer library and changes no process-wide setting.
"""

from elixir.bench.meters import MemoryMeter, meters_for
from elixir.bench.models import (
    BENCH_MODELS,
    blocks_of,
    build_model,
    gpt_config,
    make_batch,
    model_limits,
    model_names,
    no_dropout,
    num_params,
)
from elixir.bench.peers import DEEPSPEED_MISSING, build_deepspeed, build_fsdp2, deepspeed_available
from elixir.bench.report import format_table, losses_over_ranks, reference_of, summarize
from elixir.bench.runs import (
    Progress,
    all_ok,
    barrier,
    build_all,
    compare,
    max_over_ranks,
    single_process_group,
    sync,
)
from elixir.bench.systems import (
    BETAS,
    DEFAULT_SYSTEMS,
    DTYPES,
    EPS,
    LR,
    NO_OFFLOAD,
    OFFLOAD,
    SYSTEMS,
    TORCH_LINEAR,
    WEIGHT_DECAY,
    System,
    adamw,
    build_elixir,
    build_pytorch,
    optimizer_on_host,
    plain_step,
    warm_process,
)

__all__ = [
    "BENCH_MODELS", "BETAS", "DEEPSPEED_MISSING", "DEFAULT_SYSTEMS", "DTYPES", "EPS", "LR", "NO_OFFLOAD", "OFFLOAD",
    "SYSTEMS", "TORCH_LINEAR", "WEIGHT_DECAY", "MemoryMeter", "Progress", "System", "adamw", "all_ok", "barrier",
    "blocks_of", "build_all", "build_deepspeed", "build_elixir", "build_fsdp2", "build_model", "build_pytorch",
    "compare", "deepspeed_available", "format_table", "gpt_config", "losses_over_ranks", "make_batch",
    "max_over_ranks", "meters_for", "model_limits", "model_names", "no_dropout", "num_params", "optimizer_on_host",
    "plain_step", "reference_of", "single_process_group", "summarize", "sync", "warm_process",
]
