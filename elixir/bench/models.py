"""The models and batches every system of a benchmark trains: built by name from one seed, dropout off.

A GPT preset (elixir.models), a bench model (`BENCH_MODELS`: a GPT preset with fields overridden) or a
public family preset (OPT, GPT-2, Llama dimensions; elixir.models.families); random token ids.
"""

from __future__ import annotations

import torch

from elixir.models import GPT, GPTConfig

# Models for benchmarks, beyond the GPT presets and the families: name -> (GPT preset, overrides)
BENCH_MODELS = {
    # the 10.84M-parameter GPT of BENCHMARKS.md's many-ranks run: 6 blocks of width 384, byte vocabulary
    "gpt-10m": ("small", {"n_layer": 6, "n_embd": 384, "n_head": 6}),
}


def model_names() -> tuple[str, ...]:
    from elixir.models.families import family_names

    return (*BENCH_MODELS, *GPTConfig.preset_names(), *family_names())


def gpt_config(name: str, **overrides) -> GPTConfig | None:
    """The GPTConfig of a GPT preset or bench model (with fields overridden); None for a family name."""
    if name in BENCH_MODELS:
        preset, fixed = BENCH_MODELS[name]
        return GPTConfig.preset(preset, **{**fixed, **overrides})
    if name in GPTConfig.preset_names():
        return GPTConfig.preset(name, **overrides)
    return None


def model_limits(name: str, **overrides) -> tuple[int, int]:
    """(longest sequence, vocabulary size) of a model name, without building it; ValueError naming the
    known models for an unknown one."""
    cfg = gpt_config(name, **overrides)
    if cfg is not None:
        return cfg.block_size, cfg.vocab_size
    if overrides:
        raise ValueError(f"{', '.join(overrides)} override the GPT presets only, not {name!r}")
    from elixir.models.families import family_config

    try:
        hf = family_config(name)
    except ValueError:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(model_names())}") from None
    longest = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None) or 2048
    return int(longest), int(hf.vocab_size)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch off every dropout (nn.Dropout modules and the float `*dropout`/`layerdrop` attributes of
    Hugging Face modules): random masks would make the systems' losses differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in attr or attr == "layerdrop"):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for attr, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in attr or attr == "layerdrop"):
                setattr(config, attr, 0.0)
    return model


def build_model(name: str, *, device: torch.device | str = "cpu", seed: int = 0, config=None,
                **overrides) -> torch.nn.Module:
    """A model by name (see model_names) built on `device` from `seed`, in training mode, no dropout.
    `config`: a transformers config to build instead of a name (the GPU benchmark's shrunk families)."""
    torch.manual_seed(seed)
    if config is not None:
        import transformers

        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        cfg = gpt_config(name, **overrides)
        if cfg is not None:
            with torch.device(device):
                model = GPT(cfg)
        else:
            from elixir.models.families import build_family

            model = build_family(name, device=device)
    return no_dropout(model).train()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def make_batch(batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 1) -> torch.Tensor:
    """Random token ids (the same on every rank for the same seed), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters (GPT.h, OPT's decoder.layers,
    Llama's layers, GPT-2's transformer.h)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks for fully_shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
