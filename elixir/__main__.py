"""`python -m elixir ...` runs the `elixir` command (as torchrun's `-m elixir` needs)."""

from elixir.cli import console

if __name__ == "__main__":
    console()
