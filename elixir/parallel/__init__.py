"""Parallel patterns: data parallel (the default) and expert parallel, and the Mixture-of-Experts layer.

See [Note: parallel patterns] in elixir/parallel/patterns.py. The memory system, the plan and the
checkpoints see only the groups patterns give; a new kind of parallelism is a new pattern.
"""

from elixir.parallel.adapter import expert_parallel, experts_modules
from elixir.parallel.moe import Experts, MoE, Router, routed_experts
from elixir.parallel.patterns import (
    DataParallel,
    ExpertParallel,
    Pattern,
    check_expert_parallel,
    chunk_groups,
    gather_full_values,
    group_sizes,
    pack_keys,
    patterns_of,
)

__all__ = [
    "DataParallel",
    "ExpertParallel",
    "Experts",
    "MoE",
    "Pattern",
    "Router",
    "check_expert_parallel",
    "chunk_groups",
    "expert_parallel",
    "experts_modules",
    "gather_full_values",
    "group_sizes",
    "pack_keys",
    "patterns_of",
    "routed_experts",
]
