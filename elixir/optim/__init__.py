"""The sharded optimizer: the user's optimizer class, run over chunk shards where they live; its update
inside backward (overlap.py) and the undoing of an update (undo.py)."""

from elixir.optim.sharded import ELEMENTWISE, ElixirOptimizer, LossScaler, NonFiniteError, check_optimizer

__all__ = ["ELEMENTWISE", "ElixirOptimizer", "LossScaler", "NonFiniteError", "check_optimizer"]
