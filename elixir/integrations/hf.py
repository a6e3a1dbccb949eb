"""Elixir under the Hugging Face `Trainer`: `ElixirTrainer` is a `Trainer` whose model and optimizer Elixir
wraps; everything else is the Trainer's own.

Why a subclass: Accelerate, which the Trainer drives, has no plugin point for a third-party engine (DeepSpeed
and FSDP are written into it and into the Trainer), and `TrainingArguments` has no engine field. The Trainer's
documented extension point is overriding its methods, and the engine needs only a few of them:
- `create_optimizer`: the Trainer's own optimizer (`args.optim`, weight-decay groups, or the one passed in
  `optimizers=`), then `elixir.wrap` of model and optimizer; the scheduler is made on the Elixir optimizer.
- `_build_accelerator_args`: mixed precision "no" for Accelerate: Elixir computes in the dtype that `bf16` /
  `fp16` name, with fp32 masters, and scales fp16 losses itself; an autocast or a GradScaler on top would
  run a second mixed precision over the same step. And no device placement: Accelerate places an optimizer
  by `load_state_dict(state_dict())`, which replaces the Elixir optimizer's state dict under the per-chunk
  updates that fill it (a checkpoint would then hold no optimizer state); the Trainer moves each batch itself.
- the wrapped model is marked as prepared for Accelerate (`_is_accelerate_prepared`, its own guard against
  wrapping a model twice), so it is not put into DistributedDataParallel: Elixir's chunks reduce the gradients
  over the ranks. `_move_model_to_device` does nothing: the plan places the chunks (a model that needs host
  offload does not fit on the device whole); `_wrap_model` moves a model evaluated before training starts.
- `_clip_grad_norm`, `_get_grad_norm`: the global norm over the shards (`ElixirOptimizer.clip_grad_norm_`).
- the step ends with the Elixir optimizer's `zero_grad` (the Trainer calls `model.zero_grad()`, which does not
  reach the optimizer's shards), in a callback run right after `optimizer.step()`.
- fp16: the loss Accelerate backpropagates is scaled by the Elixir optimizer's dynamic loss scale.
- checkpoints: `save_model` writes a normal Hugging Face folder (`elixir.export`: config.json and
  safetensors that `from_pretrained` loads; a PEFT model writes its adapter with `save_pretrained`), every rank
  taking part in the gathers; the optimizer state is an Elixir checkpoint in `<checkpoint>/elixir` (and the
  scheduler's `scheduler.pt`, the RNG files and `trainer_state.json` as the Trainer writes them), which
  `resume_from_checkpoint` restores on any number of ranks, resharded: the model weights come from it too, so no
  rank reads the whole model file. `load_best_model_at_end` restores the best checkpoint's Elixir part.

`TrainingArguments` keep their meaning (gradient accumulation, max_grad_norm, bf16/fp16, the lr scheduler,
save_steps, resume_from_checkpoint, logging, evaluation); those Elixir cannot honour are a ValueError when the
Trainer is made (`_UNSUPPORTED`). Runs under `torchrun`, one process per device, as the Trainer does with DDP.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

import elixir
from elixir.integrations._common import PlanOption, check_plan_option, rebind_scheduler, resolve_plan
from elixir.optim import ElixirOptimizer

__all__ = ["ElixirTrainer"]

ELIXIR_CHECKPOINT = "elixir"  # the Elixir checkpoint's folder inside a Trainer checkpoint
_SCHEDULER_NAME = "scheduler.pt"  # the Trainer's name for it
_TRAINING_ARGS_NAME = "training_args.bin"

# TrainingArguments Elixir cannot honour: (attribute, when it is set, why and what to do instead)
_UNSUPPORTED = (
    ("deepspeed", bool, "DeepSpeed is another engine for the same job: use one of them"),
    ("fsdp", bool, "FSDP is another engine for the same job: use one of them"),
    ("torch_compile", bool, "Elixir's parameter hooks and chunk fetches are not traced by torch.compile; leave it "
                            "off"),
    ("fp16_full_eval", bool, "it casts the model itself to fp16 for evaluation, and the model's parameters are "
                             "views of Elixir's chunks; evaluation runs in the training dtype"),
    ("bf16_full_eval", bool, "it casts the model itself to bf16 for evaluation, and the model's parameters are "
                             "views of Elixir's chunks; evaluation runs in the training dtype"),
    ("auto_find_batch_size", bool, "it rebuilds the model and optimizer after an out-of-memory error, and a model "
                                   "is wrapped once; plan the batch with elixir.plan(tokens_per_step=...)"),
    ("parallelism_config", lambda v: v is not None, "tensor, sequence or context parallelism is not Elixir's; "
                                                    "Elixir shards over data-parallel ranks"),
)


class ElixirTrainer(Trainer):
    """A `transformers.Trainer` that trains with Elixir: `ElixirTrainer(model, args, ..., plan=...)`.

    `plan`: "auto" (default: elixir.plan profiles one training step on the first batch of the train dataset, or
    the model's first forward for an iterable dataset), an `elixir.Plan`, a plan file or a function
    `(model, optimizer) -> Plan` (see elixir/integrations/_common.py). `disk`: the scratch folder of chunks whose
    optimizer lives on disk. `hardware`: an `elixir.hardware.Hardware` for "auto" (default: this machine).
    Every other argument is the Trainer's."""

    def __init__(self, *args, plan: PlanOption = "auto", disk: str | None = None, hardware=None,
                 **kwargs) -> None:
        check_plan_option(plan)
        self._elixir_plan = plan
        self._elixir_disk = disk
        self._elixir_hardware = hardware
        self._elixir: ElixirOptimizer | None = None
        self._elixir_model: torch.nn.Module | None = None
        super().__init__(*args, **kwargs)
        _check_arguments(self.args)
        self.add_callback(_ZeroGradAfterStep(self))

    def _is_wrapped(self) -> bool:
        return self._elixir is not None and self._elixir_model is self.model

    @property
    def elixir_optimizer(self) -> ElixirOptimizer:
        """The Elixir optimizer (the Trainer's `optimizer` is Accelerate's wrapper of it)."""
        if self._elixir is None:
            raise ValueError("the model is wrapped with Elixir when training starts; call train() first")
        return self._elixir

    # --- wrapping ----------------------------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        args["mixed_precision"] = "no"  # Elixir computes in the compute dtype itself
        args["device_placement"] = False  # see the module docstring: it would detach the optimizer's state
        return args

    def _move_model_to_device(self, model: torch.nn.Module, device: torch.device) -> None:
        pass  # elixir.wrap places every chunk where the plan says

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if not self._is_wrapped() and not training:
            model.to(self.args.device)  # evaluation before training: the whole model, as the Trainer would
        return super()._wrap_model(model, training, dataloader)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self._is_wrapped():
            return self.optimizer  # train() again: the model stays wrapped (model_init makes a new one)
        user_optimizer = super().create_optimizer(model)
        plan = resolve_plan(self._elixir_plan, self.model, user_optimizer)
        example = self._example_batch() if plan == "auto" else None
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        self.model, optimizer = elixir.wrap(
            self.model, user_optimizer, plan=plan, compute_dtype=dtype, device=self.args.device,
            example_batch=example, hardware=self._elixir_hardware, disk=self._elixir_disk,
        )
        self.model._is_accelerate_prepared = True  # not into DDP: the chunks reduce the gradients
        self.model_wrapped = self._elixir_model = self.model
        self._elixir = self.optimizer = optimizer
        rebind_scheduler(self.lr_scheduler, user_optimizer, optimizer)  # one passed in `optimizers=`
        return optimizer

    def _example_batch(self):
        """The first batch of the train dataset, as the train dataloader would collate it, for plan="auto" to
        profile now, when the model is wrapped: a checkpoint restored next goes into the searched plan's chunks.
        None for an iterable dataset: the plan is then searched at the first forward."""
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        with contextlib.suppress(ImportError):
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset, collate = self._remove_unused_columns(dataset, description="training"), self.data_collator
        n = min(self._train_batch_size, len(dataset))
        return self._prepare_inputs(collate([dataset[i] for i in range(n)]))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not self._is_wrapped() or self._elixir.loss_scale == 1.0:
            return super().training_step(model, inputs, num_items_in_batch)
        # fp16: the Trainer ends its step in accelerator.backward(loss); the loss it backpropagates is scaled
        backward = self.accelerator.backward
        scale = self._elixir.loss_scale
        self.accelerator.backward = lambda loss, **kw: backward(loss * scale, **kw)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del self.accelerator.backward

    def _clip_grad_norm(self, model) -> torch.Tensor:
        return self.elixir_optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # no clipping: the norm alone (a clip at infinity never acts)
            grad_norm = self.elixir_optimizer.clip_grad_norm_(float("inf"))
        return grad_norm

    # --- saving ------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A folder `from_pretrained` loads (a PEFT model: its adapter); every rank must call it, as every rank
        takes part in gathering the chunks (the Trainer's own checkpoints do)."""
        if not self._is_wrapped():
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _is_peft(self.model):
            values = elixir.full_state_dict(self.model)  # every rank: a collective gather, one chunk at a time
            if self.args.should_save:
                self.model.save_pretrained(output_dir, state_dict=values)
        else:
            elixir.export(self.model, output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        elixir.save(self.model, self.elixir_optimizer, os.path.join(output_dir, ELIXIR_CHECKPOINT))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER_NAME))

    # --- resuming ----------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not os.path.isdir(os.path.join(resume_from_checkpoint, ELIXIR_CHECKPOINT)):
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} holds no Elixir checkpoint "
                f"({ELIXIR_CHECKPOINT}/): an ElixirTrainer resumes its own checkpoints, whose optimizer state is "
                "sharded; to start from other weights, load them into the model (from_pretrained) and train"
            )
        # Nothing now: the model is wrapped later, and elixir.load then fills its chunks (weights included),
        # each rank reading only its own shards' ranges (_load_optimizer_and_scheduler).

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        elixir.load(self.model, self.elixir_optimizer, os.path.join(checkpoint, ELIXIR_CHECKPOINT))
        scheduler = os.path.join(checkpoint, _SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    def _load_best_model(self) -> None:
        best = os.path.join(self.state.best_model_checkpoint, ELIXIR_CHECKPOINT)
        if not os.path.isdir(best):
            raise ValueError(f"load_best_model_at_end: {best} is missing (save_only_model=True saves no Elixir "
                             "checkpoint); keep save_only_model off to reload the best model")
        elixir.load(self.model, self.elixir_optimizer, best)


class _ZeroGradAfterStep(TrainerCallback):
    """The Elixir optimizer's `zero_grad` after every step: it drops the shards' gradients and tells the update
    inside backward that the step is over; the Trainer's `model.zero_grad()` reaches neither."""

    def __init__(self, trainer: ElixirTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._is_wrapped():
            self.trainer._elixir.zero_grad()


def _check_arguments(args) -> None:
    for name, is_set, why in _UNSUPPORTED:
        value = getattr(args, name, None)
        if value is not None and is_set(value):
            raise ValueError(f"TrainingArguments({name}={value!r}) is not supported by ElixirTrainer: {why}")
    if getattr(args, "n_gpu", 1) > 1:
        raise ValueError(
            f"this process sees {args.n_gpu} GPUs, and the Trainer would run them with DataParallel; Elixir runs one "
            "process per device: launch with torchrun --nproc-per-node N"
        )


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
