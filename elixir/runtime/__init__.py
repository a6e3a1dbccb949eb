"""The runtime: wrap() a model and optimizer; parameter interception; gradient reduction."""

from elixir.runtime.state import CacheTooSmallError, Runtime
from elixir.runtime.wrap import full_state_dict, memory_stats, plan_of, runtime_of, step_stats, wrap

__all__ = ["CacheTooSmallError", "Runtime", "full_state_dict", "memory_stats", "plan_of", "runtime_of", "step_stats",
           "wrap"]
