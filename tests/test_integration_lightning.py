"""Elixir under lightning.Trainer and lightning.Fabric (elixir/integrations/lightning.py).

Each run trains the bias-free tiny GPT (see test_distributed.py for why bias-free, eps and lr) for two epochs of
four steps, with gradient clipping and an lr schedule, and is compared with the same run under Lightning's own
DDP strategy: the same processes, samplers and data order, so the losses must agree to the parity tolerance.
One device runs in this process; two devices run once, as a script that Lightning's own launcher starts again
for its second rank (`python tests/test_integration_lightning.py OUT`), doing every two-device case in one
launch. Checkpoints cross over: each device count resumes the other's (Trainer through `ckpt_path=`, Fabric
through `fabric.load`), and must continue as the uninterrupted run does. The global batch is the same on both
counts (one device takes batches of 4, two take 2 each), so a step sees the same samples either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("lightning")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import elixir  # noqa: E402
from elixir.integrations.lightning import ElixirFabricStrategy, ElixirStrategy  # noqa: E402
from elixir.models import GPT, GPTConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import VOCAB, assert_close_rel, batches, small_chunk_mib  # noqa: E402

REL = 1e-5  # the parity tests' tolerance in fp32
SAMPLES, SEQ, EPOCHS, STEPS_PER_EPOCH = 16, 16, 2, 4
LR, EPS, CLIP = 1e-3, 1e-6, 0.5
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def data() -> torch.Tensor:
    return torch.cat(batches(SAMPLES // 4, batch=4, seq=SEQ))


def batch_size(devices: int) -> int:
    return SAMPLES // STEPS_PER_EPOCH // devices


def host_plan(module, optimizer, dtype=torch.float32) -> elixir.Plan:
    """Made on every rank once the ranks exist, so it is made for the run's world size."""
    return elixir.Plan.uniform(module, chunk_mib=small_chunk_mib(module), resident=False, cache_blocks=2,
                               param_home="host", optim_home="host", optimizer=optimizer, compute_dtype=dtype)


def build_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False))


class LitGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build_gpt()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss)
        if loss.device.type != "meta":  # plan="auto" profiles one step on the meta device
            self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("val_loss", loss)
        self.val_losses = getattr(self, "val_losses", []) + [loss.item()]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=LR, eps=EPS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return [opt], [{"scheduler": sched, "interval": "step"}]


def fit(strategy, devices: int, epochs: int = EPOCHS, ckpt_dir: str | None = None, ckpt_path: str | None = None,
        module: L.LightningModule | None = None, gradient_clip_val: float | None = CLIP, validate: bool = False,
        **trainer_kw) -> list[float]:
    """This rank's losses of one Trainer run; checkpoints at every epoch's end into `ckpt_dir`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = module or LitGPT()
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)] if ckpt_dir else []
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs,
                        gradient_clip_val=gradient_clip_val, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks,
                        **{**QUIET, **trainer_kw})
    loader = torch.utils.data.DataLoader(data(), batch_size=batch_size(devices))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (workers, callbacks given at resume, ...)
        trainer.fit(module, loader, loader if validate else None, ckpt_path=ckpt_path)
    return module.losses


def fabric_run(strategy, devices: int, steps: int = EPOCHS * STEPS_PER_EPOCH, save: str | None = None,
               save_at: int = STEPS_PER_EPOCH, resume: str | None = None) -> list[float]:
    """This rank's losses of one Fabric loop; `fabric.save(save)` after step `save_at`."""
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    fabric.launch()
    model = build_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    model, opt, sched = fabric.setup(model, opt, scheduler=sched)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data(), batch_size=batch_size(devices)))
    state = {"model": model, "optimizer": opt, "scheduler": sched, "step": 0}
    if resume:
        fabric.load(resume, state)
    losses = []
    while state["step"] < steps:
        for batch in loader:  # a resumed run restarts the epoch: the checkpoints are taken at epoch ends
            loss = model(input_ids=batch, labels=batch).loss
            fabric.backward(loss)
            fabric.clip_gradients(model, opt, max_norm=CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            state["step"] += 1
            if save and state["step"] == save_at:
                fabric.save(save, state)
    return losses


def global_losses(losses: list[float]) -> list[float]:
    """The loss of the global batch: the mean of the ranks' losses (their batches hold as many tokens)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return losses
    t = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def two_device_job(out: str) -> None:
    """Every two-device case, in one launch (Lightning's launcher starts rank 1 at the first fit)."""
    results = {}
    results["trainer_ddp"] = fit("ddp", 2)
    results["trainer_elixir"] = fit(ElixirStrategy(plan=host_plan), 2, ckpt_dir=f"{out}/trainer-2")
    results["trainer_resumed"] = fit(ElixirStrategy(plan=host_plan), 2, ckpt_path=f"{out}/trainer-1/{LAST_EPOCH_1}")
    results["fabric_ddp"] = fabric_run("ddp", 2)
    results["fabric_elixir"] = fabric_run(ElixirFabricStrategy(plan=host_plan), 2, save=f"{out}/fabric-2")
    results["fabric_resumed"] = fabric_run(ElixirFabricStrategy(plan=host_plan), 2, resume=f"{out}/fabric-1")
    everything = {k: {"ranks": None, "global": global_losses(v)} for k, v in results.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    for k in results:
        everything[k]["ranks"] = [g[k] for g in gathered]
    if dist.get_rank() == 0:
        with open(f"{out}/two_devices.json", "w") as f:
            json.dump(everything, f)
    dist.barrier()


LAST_EPOCH_1 = f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"  # the checkpoint at the end of the first epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One device here, two in one launched job, then one device again from the two-device checkpoints."""
    out = str(tmp_path_factory.mktemp("lightning"))
    env = dict(os.environ)
    try:
        one = {
            "trainer_ddp": fit("ddp", 1),
            "trainer_elixir": fit(ElixirStrategy(plan=host_plan), 1, ckpt_dir=f"{out}/trainer-1"),
            "fabric_ddp": fabric_run("ddp", 1),
            "fabric_elixir": fabric_run(ElixirFabricStrategy(plan=host_plan), 1, save=f"{out}/fabric-1"),
        }
        # The job gets this process's environment from before Lightning set its rank variables in it.
        job_env = {**env, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join(sys.path)}
        job = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=job_env, capture_output=True,
                             text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
        with open(f"{out}/two_devices.json") as f:
            two = json.load(f)
        one["trainer_resumed"] = fit(ElixirStrategy(plan=host_plan), 1,
                                     ckpt_path=f"{out}/trainer-2/{LAST_EPOCH_1}")
        one["fabric_resumed"] = fabric_run(ElixirFabricStrategy(plan=host_plan), 1, resume=f"{out}/fabric-2")
    finally:  # Lightning leaves its process group and rank variables behind: later tests must not see them
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    return one, two


@pytest.mark.parametrize("api", ["trainer", "fabric"])
def test_losses_match_ddp_on_one_and_two_devices(runs, api):
    one, two = runs
    assert_close_rel(one[f"{api}_elixir"], one[f"{api}_ddp"], REL)
    assert len(one[f"{api}_elixir"]) == EPOCHS * STEPS_PER_EPOCH
    for rank in range(2):  # each rank's own half batch
        assert_close_rel(two[f"{api}_elixir"]["ranks"][rank], two[f"{api}_ddp"]["ranks"][rank], REL)


@pytest.mark.parametrize("api", ["trainer", "fabric"])
def test_a_checkpoint_resumes_on_the_other_device_count(runs, api):
    one, two = runs
    later = slice(STEPS_PER_EPOCH, None)
    # saved on one device after the first epoch, resumed on two: as the two-device run goes on
    assert len(two[f"{api}_resumed"]["global"]) == STEPS_PER_EPOCH
    assert_close_rel(two[f"{api}_resumed"]["global"], two[f"{api}_ddp"]["global"][later], REL)
    # saved on two, resumed on one: as the one-device run goes on
    assert_close_rel(one[f"{api}_resumed"], one[f"{api}_ddp"][later], REL)


@pytest.fixture
def clean_process():
    """Lightning leaves its process group and rank variables behind: later tests must not see them."""
    env = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_auto_plan_profiles_the_training_step(runs, clean_process):
    from elixir.hardware import Hardware

    one, _ = runs
    module = LitGPT()  # its training_step logs: the meta-device profile of it must not
    strategy = ElixirStrategy(hardware=Hardware.preset("CPU"))
    losses = fit(strategy, 1, module=module, validate=True, num_sanity_val_steps=1)
    # the batch the planner drew did not move the sampler's shuffling: the same steps as DDP's
    assert_close_rel(losses, one["trainer_ddp"], REL)
    # validation ran before training (the sanity check, on the first batch) and after each epoch
    x = data()[: batch_size(1)]
    assert_close_rel(module.val_losses[:1], [build_gpt()(input_ids=x, labels=x).loss.item()], 1e-6)
    assert len(module.val_losses) == 1 + EPOCHS * STEPS_PER_EPOCH
    step_module = strategy.model  # the wrapped module the strategy trains
    assert elixir.memory_stats(step_module)["num_chunks"] > 0
    full = elixir.full_state_dict(step_module)
    state = module.state_dict()  # the LightningModule's own names, full values
    assert state.keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(state[name].float(), value)


@pytest.mark.parametrize("given", ["plan", "plan file"])
def test_a_plan_or_a_plan_file(runs, given, tmp_path, clean_process):
    one, _ = runs
    module = LitGPT()
    plan = host_plan(module, None)  # one device: a Plan made before the run is made for it
    if given == "plan file":
        path = tmp_path / "plan.json"
        path.write_text(plan.to_json())
        plan = str(path)
    strategy = ElixirStrategy(plan=plan)
    losses = fit(strategy, 1, module=module, epochs=1)
    assert_close_rel(losses, one["trainer_ddp"][:STEPS_PER_EPOCH], REL)
    assert elixir.runtime_of(strategy.model).cache is not None  # the plan's on-demand chunks, not "auto"'s


def test_bf16_mixed_computes_in_bf16_with_fp32_masters(runs, clean_process):
    one, _ = runs
    module = LitGPT()
    bf16_plan = lambda m, o: host_plan(m, o, torch.bfloat16)  # noqa: E731
    with pytest.raises(ValueError, match="the plan computes in float32"):  # a plan in another dtype is refused
        fit(ElixirStrategy(plan=host_plan), 1, precision="bf16-mixed", epochs=1)
    strategy = ElixirStrategy(plan=bf16_plan)
    losses = fit(strategy, 1, module=module, precision="bf16-mixed", epochs=1)
    runtime = elixir.runtime_of(strategy.model)
    assert {c.dtype for c in runtime.chunks} == {torch.bfloat16}
    assert {c.master.dtype for c in runtime.chunks if c.master is not None} == {torch.float32}
    # bf16 rounds the forward: the losses are the fp32 ones to bf16's precision
    assert_close_rel(losses, one["trainer_ddp"][:STEPS_PER_EPOCH], 2e-2)


class TwoOptimizers(LitGPT):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # Lightning's own rule for several optimizers

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.model.h.parameters()), torch.optim.SGD(self.model.wte.parameters())]


@pytest.mark.parametrize("case, match", [
    (dict(precision="64-true"), "precision='64-true' is not supported"),
    (dict(gradient_clip_algorithm="value"), "gradient_clip_algorithm='value'"),
    (dict(module=TwoOptimizers(), gradient_clip_val=None), "returned 2 optimizers"),
], ids=["fp64", "clip-by-value", "two-optimizers"])
def test_what_elixir_cannot_honour_is_an_error(case, match, clean_process):
    with pytest.raises(ValueError, match=match):
        fit(ElixirStrategy(plan=host_plan), 1, epochs=1, **case)


def load_example(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["lightning_trainer", "lightning_fabric"])
def test_examples_run(name, tmp_path, clean_process):
    from elixir.hardware import Hardware

    example = load_example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(steps=3, out=str(tmp_path / "run"), hardware=Hardware.preset("CPU"))
    if name == "lightning_trainer":
        assert result.global_step == 3 and os.path.isdir(tmp_path / "run" / "last.ckpt")
    else:
        assert len(result) == 3 and os.path.isfile(tmp_path / "run" / "manifest.json")


def test_strategy_elixir_names_the_elixir_strategies():
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="elixir", **QUIET)
    assert isinstance(trainer.strategy, ElixirStrategy)
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy="elixir")
    assert isinstance(fabric.strategy, ElixirFabricStrategy)


if __name__ == "__main__":
    two_device_job(sys.argv[1])
