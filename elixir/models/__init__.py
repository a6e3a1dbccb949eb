"""Reference models elixir trains and tests against; plain modules with no distributed code."""

from elixir.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput"]
