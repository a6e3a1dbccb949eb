"""The runtime: wrap() a model and optimizer; parameter interception; gradient reduction."""

from elixir.runtime.state import CacheTooSmallError, Runtime
from elixir.runtime.wrap import memory_stats, runtime_of, wrap

__all__ = ["CacheTooSmallError", "Runtime", "memory_stats", "runtime_of", "wrap"]
