"""Elixir inside the trainers people already use.

- `elixir.integrations.lightning`: `ElixirStrategy` for `lightning.Trainer` and `ElixirFabricStrategy` for
  `lightning.Fabric`; importing the module registers both as `strategy="elixir"`.
- `elixir.integrations.hf`: `ElixirTrainer`, a Hugging Face `Trainer` whose model and optimizer Elixir wraps
  (PEFT/LoRA models included).

Each submodule imports its framework; this package imports none, so `import elixir` never pulls them in.
"""
