"""Elixir as a Lightning strategy: `Trainer(strategy="elixir")` and `Fabric(strategy="elixir")`.

Importing this module registers the name "elixir" with Lightning's two strategy registries (Lightning finds
third-party strategies no other way). `ElixirStrategy` serves `lightning.Trainer`, `ElixirFabricStrategy`
`lightning.Fabric`; pass an instance to choose the plan (`plan="auto"`, an `elixir.Plan`, a plan file, or a
function `(module, optimizer) -> Plan`, see `PlanOption`).

What each Lightning mechanism becomes:
- model and optimizer setup: `elixir.wrap` of the module and the one optimizer `configure_optimizers` returns
  (Fabric: `fabric.setup(model, optimizer)`); the lr schedulers move onto the optimizer wrap returns;
- precision: the compute dtype (`_PRECISIONS` in _common.py), with fp32 masters; "-mixed" keeps autocast
  around the step, "-true" casts the inputs, as Lightning's own plugins do; nothing converts the module
  (the chunks hold the compute dtype, the masters fp32) and no GradScaler runs: fp16 losses are scaled with
  the Elixir optimizer's dynamic loss scale;
- backward: the loss scaled as above, then the LightningModule's `backward` hook (Fabric: `loss.backward()`);
- gradient clipping by norm: `ElixirOptimizer.clip_grad_norm_` (the global norm over every rank's shards);
- gradient accumulation: Lightning's own (several backward passes before a step add into the shards);
- checkpoints: `elixir.save`/`elixir.load` of the folder Lightning names (`ckpt_path=` resumes on any number
  of devices: Elixir reshards). Lightning's own part of the checkpoint (loops, callbacks, lr schedulers,
  hyper-parameters, a Fabric state's other entries) is written inside the same Elixir checkpoint, so both
  are replaced together or not at all, and read back by Lightning's loader with its `weights_only` choice;
- processes: Lightning's launcher (or torchrun, SLURM), one per device, gloo on CPUs and NCCL on GPUs, as
  for DDP; Elixir's chunks are sharded over all of them and reduce the gradients, so nothing wraps the
  model in DistributedDataParallel.

[Note: the step module]
Elixir treats the module it wraps as the root of a step: its forward hooks start and end the gathering of
chunks for parameters used outside their own module. A LightningModule's steps are not its forward, and
commonly call its forward (`self(x)`) themselves, so the LightningModule cannot be that root. `_StepModule`
is: it shares the LightningModule's own dicts of parameters, buffers and children, so every parameter has
its LightningModule name (plans, checkpoints and exports use those names), and its forward runs one step
method by name. The LightningModule itself is not inside it, so its own forward is an ordinary submodule
call within the step.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

import elixir
from elixir.integrations._common import (
    PlanOption,
    check_plan_option,
    compute_dtype_of,
    pack_state,
    rebind_scheduler,
    resolve_plan,
    unpack_state,
)
from elixir.optim import ElixirOptimizer

__all__ = ["ElixirFabricStrategy", "ElixirStrategy"]

_WRAPPED_ATTR = "_elixir_step_module"  # on a LightningModule: (its _StepModule, the ElixirOptimizer)
_PACKED = "lightning"  # the key of Lightning's own state in the Elixir checkpoint's extra


class _StepModule(torch.nn.Module):
    """A LightningModule's parameters and steps as the root module Elixir wraps (see [Note: the step module])."""

    def __init__(self, module: pl.LightningModule) -> None:
        super().__init__()
        object.__setattr__(self, "lightning_module", module)  # not a child: it would own its own children twice
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[name] = module.__dict__[name]

    def forward(self, step: str, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        module = self.lightning_module
        # elixir.plan profiles a step on the meta device: logging its meta loss would break the logs
        with _no_logging(module) if _on_meta((args, kwargs)) else nullcontext():
            return getattr(module, step)(*args, **(kwargs or {}))

    def train(self, mode: bool = True) -> _StepModule:
        super().train(mode)
        self.lightning_module.training = mode  # the children are shared; the LightningModule's own flag is not
        return self


def _on_meta(value) -> bool:
    if torch.is_tensor(value):
        return value.device.type == "meta"
    if isinstance(value, Mapping):
        return any(_on_meta(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_on_meta(v) for v in value)
    return False


@contextmanager
def _no_logging(module: pl.LightningModule):
    module.log, module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)
    try:
        yield
    finally:
        del module.log, module.log_dict


def _step_loss(output) -> torch.Tensor:
    """The loss of a training step's output, as Lightning reads it (the profile backpropagates it)."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    if not torch.is_tensor(output):
        raise ValueError("plan='auto' profiles one training_step, which must return the loss (a tensor or a dict "
                         "with 'loss'); pass an elixir.Plan or a plan function instead")
    return output


def _unwrap(optimizer):
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer holds the optimizer it wraps


def _check_elixir_folder(path) -> None:
    if not os.path.isdir(path):
        raise ValueError(
            f"{path} is not an Elixir checkpoint folder: the Elixir strategies save a folder per checkpoint "
            "(elixir.save); a checkpoint of another strategy cannot restore sharded chunks"
        )


class _ElixirPrecisionMixin:
    """Lightning's precision plugin for the step (autocast, input casts) minus what Elixir does instead: no
    module conversion, no GradScaler, the loss scaled by the Elixir optimizer's scale."""

    def _init_elixir(self, inner) -> None:
        self.inner = inner if inner is not None else FabricPrecision()
        self.precision = self.inner.precision
        self.compute_dtype = compute_dtype_of(self.precision)
        self.optimizer: ElixirOptimizer | None = None  # set once wrap made it

    def scale_loss(self, tensor: torch.Tensor) -> torch.Tensor:
        scale = self.optimizer.loss_scale if self.optimizer is not None else 1.0
        return tensor * scale if scale != 1.0 else tensor

    def convert_module(self, module):
        return module  # the chunks cast it: the masters must come from the full-precision values

    def tensor_init_context(self):
        return nullcontext()

    def module_init_context(self):
        return nullcontext()

    def forward_context(self):
        return self.inner.forward_context()

    def convert_input(self, data):
        return self.inner.convert_input(data)

    def convert_output(self, data):
        return self.inner.convert_output(data)

    def unscale_gradients(self, optimizer) -> None:
        pass  # the Elixir optimizer unscales the shards in clip_grad_norm_ and step

    def state_dict(self) -> dict:
        return {}  # the loss scale is in the Elixir checkpoint


class _ElixirPrecision(_ElixirPrecisionMixin, Precision):
    def __init__(self, inner: Precision | None = None) -> None:
        super().__init__()
        self._init_elixir(inner)

    def pre_backward(self, tensor, module):
        return super().pre_backward(self.scale_loss(tensor), module)  # hooks see the scaled loss, as under AMP

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        # The closure (training_step and backward) runs before step(), not inside it, as Lightning's AMP plugin
        # does: on_before_optimizer_step and clipping come between.
        closure()
        self._after_closure(model, optimizer)
        return optimizer.step(**kwargs)  # after a step that returned None (no backward) it updates nothing

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        _unwrap(optimizer).clip_grad_norm_(float(clip_val))

    def clip_grad_by_value(self, optimizer, clip_val) -> None:
        raise ValueError(
            "gradient_clip_algorithm='value' is not supported with Elixir: it clips the global gradient norm "
            "(the updates run during backward speculating on it); use gradient_clip_algorithm='norm'"
        )


class _ElixirFabricPrecision(_ElixirPrecisionMixin, FabricPrecision):
    def __init__(self, inner: FabricPrecision | None = None) -> None:
        super().__init__()
        self._init_elixir(inner)


class ElixirStrategy(DDPStrategy):
    """Train a LightningModule with Elixir under `lightning.Trainer`: `Trainer(strategy="elixir")`, or
    `Trainer(strategy=ElixirStrategy(plan=...))`.

    `plan`: see `PlanOption`. With "auto", the planner runs `training_step` once more, on `example_batch`
    (default: the first batch of the train dataloader, drawn with the random states restored afterwards) moved
    to the meta device, where tensors have no values: its `self.log` calls are dropped, and other side effects
    happen once more (a step that needs values, `.item()` to decide something, needs a Plan instead).
    `disk`: the scratch folder of chunks whose optimizer lives on disk. `hardware`: an `elixir.hardware.Hardware`
    for "auto" (default: this machine, measured once and cached).

    Processes start as for DDP, through Lightning's script launcher (or torchrun/SLURM); the spawn and fork
    launchers return the trained weights to the main process as one full state dict per rank, which a sharded
    model does not keep, so they are not offered. The LightningModule's `configure_optimizers` returns one
    optimizer (schedulers as usual).
    """

    def __init__(
        self,
        plan: PlanOption = "auto",
        *,
        example_batch: Any = None,
        disk: str | None = None,
        hardware=None,
        accelerator=None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        check_plan_option(plan)
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method="popen",
        )
        self._plan = plan
        self._example_batch = example_batch
        self._disk = disk
        self._hardware = hardware

    @property
    def precision_plugin(self) -> _ElixirPrecision:
        if self._precision_plugin is None:
            self._precision_plugin = _ElixirPrecision()
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # Lightning sets the plugin it chose for the precision flag; Elixir keeps its step-side behaviour
        self._precision_plugin = None if plugin is None or isinstance(plugin, _ElixirPrecision) else \
            _ElixirPrecision(plugin)

    # --- setup -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        wrapped = module.__dict__.get(_WRAPPED_ATTR)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if len(self.optimizers) != 1:
                raise ValueError(
                    f"configure_optimizers returned {len(self.optimizers)} optimizers; Elixir trains one optimizer "
                    "over all chunks: return one (with one param group per setting)"
                )
            user_optimizer = _unwrap(self.optimizers[0])
            if wrapped is None:
                if self._layer_sync is not None:  # Trainer(sync_batchnorm=True), applied as DDP applies it
                    self._layer_sync.apply(module)
                wrapped = self._wrap(trainer, module, user_optimizer)
            step_module, optimizer = wrapped  # a LightningModule fitted before keeps its chunks and optimizer
            for config in self.lr_scheduler_configs:
                rebind_scheduler(config.scheduler, user_optimizer, optimizer)
            self.optimizers = [optimizer]
            self.model = step_module
        elif wrapped is not None:
            self.model = wrapped[0]
        else:
            module.to(self.root_device)  # evaluation of a module never fitted here: nothing to shard it for
        if wrapped is not None:
            self.precision_plugin.optimizer = wrapped[1]
        self.setup_precision_plugin()

    def _wrap(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: torch.optim.Optimizer):
        step_module = _StepModule(module)
        plan = resolve_plan(self._plan, module, optimizer)
        example = self._step_batch(trainer) if plan == "auto" else None
        step_module, elixir_optimizer = elixir.wrap(
            step_module, optimizer, plan=plan, compute_dtype=self.precision_plugin.compute_dtype,
            device=self.root_device, example_batch=example, loss_fn=_step_loss, hardware=self._hardware,
            disk=self._disk,
        )
        wrapped = (step_module, elixir_optimizer)
        module.__dict__[_WRAPPED_ATTR] = wrapped
        _full_values_in_state_dict(module, step_module)
        return wrapped

    def _step_batch(self, trainer: pl.Trainer) -> dict:
        """The example of one training step that plan="auto" profiles: training_step's arguments."""
        batch = self._example_batch
        if batch is None:
            try:
                # the dataloader Lightning will train on (its DeepSpeed strategy reads it here too)
                loader = trainer.fit_loop._data_source.dataloader()
                with _random_states_kept():  # drawing a batch must not change the run's shuffling
                    batch = next(iter(loader))
            except Exception as e:
                raise ValueError(
                    "plan='auto' profiles training_step on one batch, and none could be drawn from the train "
                    f"dataloader ({type(e).__name__}: {e}); pass ElixirStrategy(example_batch=...) or a plan"
                ) from e
        batch = self.batch_to_device(batch)
        takes_index = "batch_idx" in inspect.signature(self.lightning_module.training_step).parameters
        return {"step": "training_step", "args": (batch, 0) if takes_index else (batch,), "kwargs": {}}

    def model_to_device(self) -> None:
        pass  # elixir.wrap puts every chunk where the plan says

    def _step(self, name: str, context, args, kwargs):
        with context:
            if isinstance(self.model, _StepModule):
                return self.model(name, args, kwargs)
            return getattr(self.lightning_module, name)(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        return self._step("training_step", self.precision_plugin.train_step_context(), args, kwargs)

    def validation_step(self, *args, **kwargs):
        return self._step("validation_step", self.precision_plugin.val_step_context(), args, kwargs)

    def test_step(self, *args, **kwargs):
        return self._step("test_step", self.precision_plugin.test_step_context(), args, kwargs)

    def predict_step(self, *args, **kwargs):
        return self._step("predict_step", self.precision_plugin.predict_step_context(), args, kwargs)

    # --- checkpoints -------------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # elixir.load fills the chunks that setup made

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # elixir.load restores it, resharded

    def lightning_module_state_dict(self) -> dict:
        return {}  # the weights are in the Elixir checkpoint, each rank's shards in its own file

    def optimizer_state(self, optimizer) -> dict:
        return {}

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("Trainer.save_checkpoint(storage_options=...) is not supported by the Elixir strategy: "
                            "elixir.save writes the checkpoint folder itself")
        filepath = self.broadcast(str(filepath))  # one folder for every rank
        step_module, optimizer = self._wrapped("save a checkpoint")
        own = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        elixir.save(step_module, optimizer, filepath, extra={_PACKED: pack_state(own)})

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint_path = self.broadcast(str(checkpoint_path))
        _check_elixir_folder(checkpoint_path)
        step_module, optimizer = self._wrapped("load a checkpoint")
        extra = elixir.load(step_module, optimizer, checkpoint_path)
        checkpoint = unpack_state(extra[_PACKED], lambda f: pl_load(f, weights_only=weights_only))
        return {**checkpoint, "state_dict": {}}

    def load_model_state_dict(self, checkpoint: Mapping, strict: bool = True) -> None:
        pass  # load_checkpoint filled the chunks

    def load_optimizer_state_dict(self, checkpoint: Mapping) -> None:
        pass

    def _wrapped(self, what: str):
        wrapped = self.lightning_module.__dict__.get(_WRAPPED_ATTR)
        if wrapped is None:
            raise ValueError(
                f"cannot {what}: the Elixir strategy shards a LightningModule when it fits it, and this one was not "
                "fitted here; run trainer.fit first (ckpt_path= resumes), or evaluate weights exported with "
                "`elixir export` loaded into the module before the Trainer"
            )
        return wrapped

    def teardown(self) -> None:
        # Not DDP's: it would move the optimizer states and the module to the CPU, and the chunks' parameters are
        # views of memory Elixir owns. The module stays sharded, ready for trainer.test or another fit.
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        if "elixir" not in strategy_registry:
            strategy_registry.register("elixir", cls, description="Elixir: chunks placed by a plan (plan='auto')")


class ElixirFabricStrategy(FabricDDPStrategy):
    """Train with Elixir under `lightning.Fabric`: `Fabric(strategy="elixir")`, or
    `Fabric(strategy=ElixirFabricStrategy(plan=...))`.

    `fabric.setup(model, optimizer)` (one optimizer) wraps both with Elixir; with plan="auto" the plan is
    searched at the model's first forward, on its batch, as `elixir.wrap` does (that forward must be a
    training one). `fabric.backward`, `fabric.clip_gradients(max_norm=...)`, `optimizer.step()`,
    `fabric.save` and `fabric.load` work as with DDP; `fabric.save(path, state)` writes a folder (elixir.save)
    and `fabric.load(path, state)` restores it on any number of devices. `fabric.no_backward_sync` has no
    effect: gradients are reduced into their shards by every backward. Options as for `ElixirStrategy`.
    """

    def __init__(
        self,
        plan: PlanOption = "auto",
        *,
        disk: str | None = None,
        hardware=None,
        accelerator=None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision: FabricPrecision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        check_plan_option(plan)
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision, process_group_backend=process_group_backend,
            timeout=timeout, start_method="popen",
        )
        self._backward_sync_control = None
        self._plan = plan
        self._disk = disk
        self._hardware = hardware
        self._wrapped: tuple[torch.nn.Module, ElixirOptimizer] | None = None

    @property
    def precision(self) -> _ElixirFabricPrecision:
        if self._precision is None:
            self._precision = _ElixirFabricPrecision()
        return self._precision

    @precision.setter
    def precision(self, precision: FabricPrecision | None) -> None:
        self._precision = None if precision is None or isinstance(precision, _ElixirFabricPrecision) else \
            _ElixirFabricPrecision(precision)

    def module_to_device(self, module: torch.nn.Module) -> None:
        pass  # elixir.wrap puts every chunk where the plan says; setup_module moves a module it does not wrap

    def setup_module_and_optimizers(self, module, optimizers, scheduler=None):
        if len(optimizers) != 1:
            raise ValueError(f"fabric.setup got {len(optimizers)} optimizers; Elixir trains one optimizer over all "
                             "chunks: pass one (with one param group per setting)")
        if self._wrapped is not None:
            raise ValueError("this ElixirFabricStrategy already set up a model; set up one model with its optimizer")
        plan = resolve_plan(self._plan, module, optimizers[0])
        model, optimizer = elixir.wrap(
            module, optimizers[0], plan=plan, compute_dtype=self.precision.compute_dtype, device=self.root_device,
            hardware=self._hardware, disk=self._disk,
        )
        rebind_scheduler(scheduler, optimizers[0], optimizer)
        self._wrapped = (model, optimizer)
        self.precision.optimizer = optimizer
        return model, [optimizer], scheduler

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module.to(self.root_device)  # a module set up without an optimizer is not trained: Elixir has no part
        return module

    def setup_optimizer(self, optimizer):
        raise ValueError(self._err_msg_joint_setup_required())

    def backward(self, tensor: torch.Tensor, module, *args, **kwargs) -> None:
        super().backward(self.precision.scale_loss(tensor), module, *args, **kwargs)

    def clip_gradients_norm(self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True):
        norm = _unwrap(optimizer).clip_grad_norm_(float(max_norm), norm_type)
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"The total norm of order {float(norm_type)} for gradients is non-finite, so it cannot "
                               "be clipped. To disable this error, set `error_if_nonfinite=False`")
        return norm

    def clip_gradients_value(self, module, optimizer, clip_val) -> None:
        raise ValueError("clipping gradients by value is not supported with Elixir: it clips the global gradient "
                         "norm (the updates run during backward speculating on it); use max_norm=")

    # --- checkpoints -------------------------------------------------------------------------------

    def _split_state(self, state: Mapping, what: str) -> tuple[str, str]:
        """The keys of the Elixir model and optimizer in a `fabric.save`/`fabric.load` state."""
        if self._wrapped is None:
            raise ValueError(f"cannot {what}: set up the model and optimizer with fabric.setup first")
        model, optimizer = self._wrapped
        model_key = next((k for k, v in state.items() if v is model), None)
        optim_key = next((k for k, v in state.items() if v is optimizer), None)
        if model_key is None or optim_key is None:
            raise ValueError(
                f"cannot {what}: the state must hold the model and the optimizer fabric.setup returned (as "
                "{'model': model, 'optimizer': optimizer, ...}); Elixir saves and restores them together"
            )
        return model_key, optim_key

    def save_checkpoint(self, path, state: dict, storage_options: Any = None, filter: dict | None = None) -> None:
        if storage_options is not None:
            raise TypeError("fabric.save(storage_options=...) is not supported by the Elixir strategy: elixir.save "
                            "writes the checkpoint folder itself")
        model_key, optim_key = self._split_state(state, "save a checkpoint")
        if filter and (model_key in filter or optim_key in filter):
            raise ValueError("fabric.save(filter=...) of the model or optimizer is not supported by the Elixir "
                             "strategy: elixir.save writes every chunk; filter the other entries only")
        path = self.broadcast(str(path))
        rest = {k: v for k, v in state.items() if k not in (model_key, optim_key)}
        own = self._convert_stateful_objects_in_state(rest, filter=filter or {})
        own["__elixir_keys__"] = [model_key, optim_key]
        elixir.save(*self._wrapped, path, extra={_PACKED: pack_state(own)})

    def load_checkpoint(self, path, state=None, strict: bool = True, weights_only: bool | None = None) -> dict:
        if not isinstance(state, Mapping) or not state:
            raise ValueError("fabric.load of an Elixir checkpoint restores into the objects that fabric.setup "
                             "returned: pass state={'model': model, 'optimizer': optimizer, ...}")
        model_key, optim_key = self._split_state(state, "load a checkpoint")
        path = self.broadcast(str(path))
        _check_elixir_folder(path)
        extra = elixir.load(*self._wrapped, path)
        checkpoint = unpack_state(extra[_PACKED], lambda f: pl_load(f, weights_only=weights_only))
        saved_keys = checkpoint.pop("__elixir_keys__")
        if strict:
            missing = [k for k in state if k not in checkpoint and k not in saved_keys]
            if missing:
                raise KeyError(f"The requested state contains a key '{missing[0]}' that does not exist in the loaded "
                               "checkpoint. To disable strict loading, set `strict=False`.")
        for name, obj in list(state.items()):
            if name in (model_key, optim_key) or name not in checkpoint:
                continue
            if isinstance(obj, _Stateful):
                obj.load_state_dict(checkpoint.pop(name))
            else:
                state[name] = checkpoint.pop(name)
        return checkpoint

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        if "elixir" not in strategy_registry:
            strategy_registry.register("elixir", cls, description="Elixir: chunks placed by a plan (plan='auto')")


def _full_values_in_state_dict(module: pl.LightningModule, step_module: _StepModule) -> None:
    """`module.state_dict()` and `load_state_dict` behave as on the module Elixir wrapped (see [Note: the step
    module]): the state dict of on-demand chunks holds their gathered values (every rank must ask for it), and
    loading into them is refused. Modules whose chunks are all resident hold their values already."""
    if elixir.runtime_of(step_module).cache is None:
        return

    def full_values(mod, state_dict, prefix, local_metadata):
        values = step_module.state_dict()  # Elixir's own hook gathers them, chunk by chunk
        for name, value in values.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = value

    def refuse(mod, state_dict, prefix, *args):
        step_module.load_state_dict(state_dict, strict=False)  # Elixir's own refusal, with its reason

    module.register_state_dict_post_hook(full_values)
    module.register_load_state_dict_pre_hook(refuse)


@contextmanager
def _random_states_kept():
    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


ElixirStrategy.register_strategies(StrategyRegistry)
ElixirFabricStrategy.register_strategies(STRATEGY_REGISTRY)
