"""Elixir: train large language models on a small GPU cluster.

Parameters, gradients and optimizer states live in chunks spread over device memory, host memory
and ranks, as a plan says; `wrap` turns an ordinary model and optimizer into managed ones.
"""

from elixir import parallel
from elixir.checkpoint import CheckpointError, export, load, load_pretrained, save
from elixir.comm import CollectiveError, init_distributed
from elixir.optim import ElixirOptimizer, NonFiniteError
from elixir.plan import ChunkPlan, Plan
from elixir.preempt import EXIT_PREEMPTED, Preemption
from elixir.profile import profile
from elixir.runtime import CacheTooSmallError, full_state_dict, memory_stats, plan_of, runtime_of, step_stats, wrap
from elixir.search import PlanDoesNotFitError, plan

__version__ = "0.1.0"

__all__ = [
    "CacheTooSmallError",
    "CheckpointError",
    "ChunkPlan",
    "CollectiveError",
    "ElixirOptimizer",
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "export",
    "Plan",
    "PlanDoesNotFitError",
    "Preemption",
    "full_state_dict",
    "init_distributed",
    "load",
    "load_pretrained",
    "memory_stats",
    "parallel",
    "plan",
    "plan_of",
    "profile",
    "runtime_of",
    "save",
    "step_stats",
    "wrap",
]
