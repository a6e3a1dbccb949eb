"""Activation checkpointing of every k-th transformer block, for the reference GPT and Hugging Face models.

A checkpointed block keeps only its input for backward and runs its forward again there: less activation
memory for more compute. Checkpointing every block saves the most memory at one extra forward of the blocks
(8 x params x tokens instead of 6 x); every k-th block saves about 1/k of that for 1/k of the extra forward.
Blocks 0, k, 2k, ... are checkpointed, as Hugging Face's `every_n_layers` does.

The blocks are found as:
- Hugging Face decoder layers: `transformers.modeling_layers.GradientCheckpointingLayer` instances, whose
  `gradient_checkpointing` flag decides per layer and whose `_gradient_checkpointing_func` does the
  recomputation. Both are set here directly rather than through the model's enable method, whose name and
  arguments change between transformers releases.
- otherwise a `ModuleList` named `h` on the model (the reference GPT): the chosen blocks get an instance
  `forward` that runs the class's forward under `torch.utils.checkpoint.checkpoint`. Module hooks stay outside
  the checkpoint (they run once, in forward), and parameter names do not change, so plans and checkpoints made
  without checkpointing still apply.
Recomputation is non-reentrant in both cases (`use_reentrant=False`): it works with elixir's saved-tensor hooks
and does not need inputs that require grad.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_checkpointing", "checkpointed_blocks", "checkpointing", "transformer_blocks"]

_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)


def _hf_layer_class() -> type | None:
    # A model built from transformers has imported its layer class already; importing transformers here
    # for any other model would cost seconds and find nothing.
    module = sys.modules.get("transformers.modeling_layers")
    return getattr(module, "GradientCheckpointingLayer", None)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks in forward order: Hugging Face decoder layers, else the GPT's `h`;
    empty when neither is found."""
    layer_class = _hf_layer_class()
    if layer_class is not None:
        layers = [m for m in model.modules() if isinstance(m, layer_class)]
        if layers:
            return layers
    h = getattr(model, "h", None)
    return list(h) if isinstance(h, nn.ModuleList) else []


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward
    if block.training and torch.is_grad_enabled():
        return _CHECKPOINT(functools.partial(forward, block), *args, **kwargs)
    return forward(block, *args, **kwargs)


def _is_checkpointed_here(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def apply_checkpointing(model: nn.Module, every: int) -> None:
    """Checkpoint the activations of every `every`-th transformer block of `model` (blocks 0, every,
    2 * every, ...); `every=1` checkpoints every block, `every=0` turns checkpointing off. Replaces whatever
    checkpointing the model had; takes effect in training mode with grad enabled.

    Raises ValueError when `every` is negative, or positive for a model in which no blocks are found."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"every={every!r} must be an int: 0 (no checkpointing) or k >= 1 (every k-th block)")
    blocks = transformer_blocks(model)
    if not blocks:
        if every:
            raise ValueError(
                f"apply_checkpointing(every={every}): no transformer blocks found in {type(model).__name__} "
                "(neither transformers GradientCheckpointingLayer modules nor a ModuleList `h`); "
                "use every=0, or checkpoint the model's blocks yourself"
            )
        return
    layer_class = _hf_layer_class()
    if layer_class is not None and isinstance(blocks[0], layer_class):
        for module in model.modules():
            # other modules that carry the flag (the decoder stack of some models) follow the layers, as
            # transformers' own switch does
            if hasattr(module, "gradient_checkpointing") and not isinstance(module, layer_class):
                module.gradient_checkpointing = bool(every)
                module._gradient_checkpointing_func = _CHECKPOINT
        for index, layer in enumerate(blocks):
            layer.gradient_checkpointing = bool(every) and index % every == 0
            layer._gradient_checkpointing_func = _CHECKPOINT
        return
    # the reference GPT: its own switch checkpoints every block, so it is off and the blocks decide
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = False
    for index, block in enumerate(blocks):
        if every and index % every == 0:
            block.forward = functools.partial(_checkpointed_forward, block)
        elif _is_checkpointed_here(block):
            del block.forward


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks whose activations are checkpointed now (by this module or by the model's
    own switch)."""
    blocks = transformer_blocks(model)
    layer_class = _hf_layer_class()
    if blocks and layer_class is not None and isinstance(blocks[0], layer_class):
        return [i for i, b in enumerate(blocks) if b.gradient_checkpointing]
    if getattr(model, "gradient_checkpointing", False):
        return list(range(len(blocks)))
    return [i for i, b in enumerate(blocks) if _is_checkpointed_here(b)]


@contextlib.contextmanager
def checkpointing(model: nn.Module, every: int) -> Iterator[nn.Module]:
    """`apply_checkpointing(model, every)` for the duration of a `with` block (profiling a candidate), then
    the model's checkpointing as it was before."""
    saved = [(m, m.__dict__.get("forward"), getattr(m, "gradient_checkpointing", _MISSING),
              m.__dict__.get("_gradient_checkpointing_func", _MISSING)) for m in model.modules()]
    try:
        apply_checkpointing(model, every)
        yield model
    finally:
        for module, forward, flag, func in saved:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
            if flag is not _MISSING:
                module.gradient_checkpointing = flag
            if func is _MISSING:
                module.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                module._gradient_checkpointing_func = func


_MISSING = object()
