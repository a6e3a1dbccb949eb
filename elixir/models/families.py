"""Public model families by their published dimensions, built with transformers (on meta by default).

The figures are those of each checkpoint's `config.json` on the Hugging Face hub (openai-community/gpt2*,
facebook/opt-*, meta-llama/Llama-2-*-hf, meta-llama/Meta-Llama-3-*). Building on the meta device
allocates nothing, so `elixir plan` can reason about OPT-175B on a laptop.
"""

from __future__ import annotations

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


ESSENTIAL = {"hidden_size": "hidden size", "num_hidden_layers": "layers", "num_attention_heads": "heads",
             "vocab_size": "vocabulary"}
"""The size fields a config.json must give (when its model type has them): without them transformers
takes its class defaults, the size of some other model, and a plan for that model is worthless."""
MAX_LAYERS = 4096
"""More layers than any released model has, by an order of magnitude: building that many modules (even on
the meta device) takes minutes, so a larger figure is taken for damage, not intent."""


def read_config(path: str):
    """The transformers config of a `config.json` (a file, or a folder holding one), checked first (see
    [Note: untrusted files] in elixir/validation.py): a ValueError naming the file and the field for
    anything that is not JSON, a known `model_type`, or a value of its field's type, and for a config
    whose essential size fields (hidden size, layers, heads, vocabulary: `ESSENTIAL`) are absent.
    Fields it leaves out take the config class's defaults, and a warning lists them."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from elixir.validation import Fields, read_json_file

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    doc = Fields(read_json_file(path, what="it is not a transformers config.json"), path)
    if "model_type" not in doc.data:
        raise ValueError(f"{path} has no 'model_type': it is not a transformers config.json")
    model_type = doc.get("model_type", "str")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is not one transformers {tf.__version__} knows; "
                         "check the name, or upgrade transformers")
    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    renames = dict(getattr(cls, "attribute_map", {}) or {})  # a common name -> the name this class stores it by

    def given(name: str) -> str | None:
        """The key of the file that sets field `name` (under its own or its common name), or None."""
        for key in (name, renames.get(name), *(k for k, v in renames.items() if v == name)):
            if key is not None and key in doc.data:
                return key
        return None

    missing = [f"{name} ({words})" for name, words in ESSENTIAL.items() if hasattr(defaults, name) and not given(name)]
    if missing:
        raise ValueError(
            f"{path}: essential size field(s) missing: {', '.join(missing)}; without them transformers would "
            f"take {cls.__name__}'s defaults, the size of another model. Add them to the file"
        )
    for name in ESSENTIAL:
        key = given(name)
        if key is not None:
            doc.get(key, "int", least=1, most=MAX_LAYERS if name == "num_hidden_layers" else None)
    for key, value in doc.data.items():
        default = getattr(defaults, key, None)
        if value is None or default is None:
            continue  # unset, or a field whose default is "decide later": transformers judges it
        for kind, types in (("bool", bool), ("int", int), ("number", float), ("str", str)):
            if isinstance(default, types):
                if kind == "number":
                    doc.check(value, doc.path(key), "number", finite=False)
                else:
                    doc.check(value, doc.path(key), kind)
                break
    try:
        config = tf.AutoConfig.for_model(**doc.data)
    except Exception as e:  # transformers' own checks of untrusted values; their types vary by version
        raise ValueError(f"{path}: transformers refuses this config ({_first_line(e)})") from None
    _warn_defaults(path, cls, config, given)
    return config


def _warn_defaults(path: str, cls, config, given) -> None:
    """One warning listing the model's own fields the file leaves to the class's defaults, with the values
    they took in `config` (the generic fields of every config, and token ids, decide neither sizes nor
    speed and are left out)."""
    import inspect
    import warnings

    from transformers import PretrainedConfig

    generic = set(inspect.signature(PretrainedConfig.__init__).parameters)
    fields = [n for n in inspect.signature(cls.__init__).parameters
              if n not in generic and n not in ("self", "kwargs") and not n.endswith(("_token_id", "_token_index"))]
    defaulted = [n for n in fields if not given(n)]
    if not defaulted:
        return
    def value(n: str) -> str:
        v = getattr(config, n, None)
        return f"{n}={v!r}" if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) <= 20) else n

    listed = [value(n) for n in defaulted[:12]]
    more = f" and {len(defaulted) - 12} more" if len(defaulted) > 12 else ""
    warnings.warn(f"{path}: {len(defaulted)} field(s) missing, taken from {cls.__name__}'s defaults: "
                  f"{', '.join(listed)}{more}", stacklevel=3)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines)[:200]}" if lines else type(e).__name__


def build_family(name_or_config: str, *, device: str | torch.device = "meta") -> torch.nn.Module:
    """A causal LM from a preset name or a HF `config.json` (file or folder), built on `device`; a config
    file is read through `read_config`'s checks."""
    import transformers as tf

    if os.path.exists(name_or_config):
        config = read_config(name_or_config)
        try:
            with torch.device(device):
                return tf.AutoModelForCausalLM.from_config(config)
        except Exception as e:  # a config every field of which checks can still describe no model
            raise ValueError(f"{name_or_config}: transformers cannot build a causal LM from this config "
                             f"({_first_line(e)})") from None
    config = family_config(name_or_config)
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(config)
