"""Reference models elixir trains and tests against; plain modules with no distributed code."""

from elixir.models.checkpointing import apply_checkpointing
from elixir.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput", "apply_checkpointing"]
