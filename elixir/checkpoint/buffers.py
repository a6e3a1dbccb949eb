"""A model's buffers in checkpoints and weights: which ones are saved, and those built on the meta device.

Buffers are not in chunks: every rank keeps them whole. `save` and `export` write the persistent ones
(those `state_dict` would hold) from rank 0; `load` and `load_pretrained` copy them back on every rank.
"""

from __future__ import annotations

import torch

from elixir.checkpoint.files import CheckpointError


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that `state_dict` would save, by name."""
    out = {}
    for mod_name, mod in model.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = b
    return out


def init_meta_buffers(model: torch.nn.Module, names: set[str]) -> None:
    """Buffers that were on the meta device and are not in the files (non-persistent ones, such as
    rotary frequencies): Hugging Face models recompute them with their own `_init_weights`."""
    init = getattr(model, "_init_weights", None)
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    if init is None:
        raise CheckpointError(
            f"buffers {sorted(names)[:3]} were built on the meta device and are not in the weights; build the "
            "model's buffers on a real device (only parameters may be on meta) or save them with the weights"
        )
    for owner in owners:
        module = model.get_submodule(owner)
        if any(True for _ in module.parameters(recurse=False)):
            raise CheckpointError(
                f"module {owner!r} has buffers built on the meta device that the weights lack, beside parameters; "
                "save the buffers with the weights"
            )
        init(module)
