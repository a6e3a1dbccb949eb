"""Public model families by their published dimensions, built with transformers (on meta by default).

The figures are those of each checkpoint's `config.json` on the Hugging Face hub (openai-community/gpt2*,
facebook/opt-*, meta-llama/Llama-2-*-hf, meta-llama/Meta-Llama-3-*). Building on the meta device
allocates nothing, so `elixir plan` can reason about OPT-175B on a laptop.
"""

from __future__ import annotations

import json
import os

import torch

_GPT2 = {  # n_embd, n_layer, n_head
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
_OPT = {  # hidden, layers, heads, ffn, word_embed_proj_dim
    "opt-125m": (768, 12, 12, 3072, 768),
    "opt-350m": (1024, 24, 16, 4096, 512),
    "opt-1.3b": (2048, 24, 32, 8192, 2048),
    "opt-2.7b": (2560, 32, 32, 10240, 2560),
    "opt-6.7b": (4096, 32, 32, 16384, 4096),
    "opt-13b": (5120, 40, 40, 20480, 5120),
    "opt-30b": (7168, 48, 56, 28672, 7168),
    "opt-66b": (9216, 64, 72, 36864, 9216),
    "opt-175b": (12288, 96, 96, 49152, 12288),
}
_LLAMA = {  # hidden, layers, heads, kv heads, intermediate, vocab, max positions, rope theta
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama-2-70b": (8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama-3-70b": (8192, 80, 64, 8, 28672, 128256, 8192, 500000.0),
}


def family_names() -> tuple[str, ...]:
    return (*_GPT2, *_OPT, *_LLAMA)


def family_config(name: str):
    """The transformers config of a preset; ValueError listing the presets for an unknown name."""
    import transformers as tf

    key = name.lower()
    if key in _GPT2:
        d, n_layer, n_head = _GPT2[key]
        return tf.GPT2Config(n_embd=d, n_layer=n_layer, n_head=n_head, vocab_size=50257, n_positions=1024)
    if key in _OPT:
        d, n_layer, n_head, ffn, proj = _OPT[key]
        return tf.OPTConfig(
            hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=n_head, ffn_dim=ffn,
            word_embed_proj_dim=proj, vocab_size=50272, max_position_embeddings=2048,
            do_layer_norm_before=key != "opt-350m",
        )
    if key in _LLAMA:
        d, n_layer, n_head, kv, inter, vocab, max_pos, theta = _LLAMA[key]
        return tf.LlamaConfig(
            hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=kv,
            intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max_pos, rope_theta=theta,
        )
    raise ValueError(f"unknown model {name!r}; the presets are: {', '.join(family_names())} (or a config.json path)")


def build_family(name_or_config: str, *, device: str | torch.device = "meta") -> torch.nn.Module:
    """A causal LM from a preset name or a HF `config.json` (file or folder), built on `device`."""
    import transformers as tf

    if os.path.exists(name_or_config):
        path = name_or_config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            raw = json.load(f)
        if "model_type" not in raw:
            raise ValueError(f"{path} has no 'model_type': it is not a transformers config.json")
        config = tf.AutoConfig.for_model(**raw)
    else:
        config = family_config(name_or_config)
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(config)
