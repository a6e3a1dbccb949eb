"""ElixirTrainer, the Hugging Face Trainer under Elixir (elixir/integrations/hf.py), with and without PEFT/LoRA.

Each run fine-tunes a tiny Llama (bias-free; see test_distributed.py for eps and lr) for four optimizer steps of
two accumulated micro-batches, with gradient clipping, a linear lr schedule and a checkpoint every two steps,
and is compared with the plain Trainer's run of the same arguments (on two ranks: its DDP). One rank runs in
this process; two ranks run once under torchrun (`torchrun --nproc-per-node 2 tests/test_integration_hf.py
OUT`), doing every two-rank case in one launch. Checkpoints cross over: each rank count resumes the other's
checkpoint-2 through `resume_from_checkpoint` and must continue as the uninterrupted run does. The samples
are taken in order, and a micro-batch holds 4 of them on one rank or 2 on each of two, so a step sees the
same samples on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import elixir  # noqa: E402
from elixir.integrations.hf import ElixirTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import assert_close_rel, batches, small_chunk_mib, tiny_hf  # noqa: E402

REL = 1e-5  # the parity tests' tolerance in fp32
STEPS, SAVE_EVERY, ACCUMULATE, GLOBAL_MICRO_BATCH = 4, 2, 2, 4
SAMPLES = STEPS * ACCUMULATE * GLOBAL_MICRO_BATCH


class Tokens(torch.utils.data.Dataset):
    def __init__(self, samples: int = SAMPLES, seed: int = 1) -> None:
        self.ids = torch.cat(batches(samples // 4, batch=4, seq=16, seed=seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_hf("llama")


def build_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = build_llama()
    torch.manual_seed(1)  # lora_B starts at zero: give it values, so that the adapter's first step is not trivial
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model


def arguments(out: str, ranks: int) -> tf.TrainingArguments:
    return tf.TrainingArguments(
        output_dir=out, per_device_train_batch_size=GLOBAL_MICRO_BATCH // ranks, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, learning_rate=1e-3, adam_epsilon=1e-6, lr_scheduler_type="linear", max_grad_norm=0.5,
        logging_steps=1, save_steps=SAVE_EVERY, train_sampling_strategy="sequential", use_cpu=True, seed=0,
        report_to=[], disable_tqdm=True, save_total_limit=None, eval_strategy="steps", eval_steps=SAVE_EVERY,
        per_device_eval_batch_size=GLOBAL_MICRO_BATCH // ranks, load_best_model_at_end=True,
    )


def host_plan(model, optimizer, dtype=torch.float32) -> elixir.Plan:
    return elixir.Plan.uniform(model, chunk_mib=small_chunk_mib(model), resident=False, cache_blocks=2,
                               param_home="host", optim_home="host", optimizer=optimizer, compute_dtype=dtype)


def train(trainer_class, build, out: str, ranks: int, resume: str | None = None) -> dict[str, list[float]]:
    """What the Trainer logs (means over ranks) at the steps this run made: training and evaluation losses,
    and the evaluation loss of the model it ends with (the best checkpoint's: load_best_model_at_end)."""
    kw = {"plan": host_plan} if trainer_class is ElixirTrainer else {}
    trainer = trainer_class(model=build(), args=arguments(out, ranks), train_dataset=Tokens(),
                            eval_dataset=Tokens(8, seed=2), **kw)
    first = int(resume.rsplit("-", 1)[1]) if resume else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
        logged = [h for h in trainer.state.log_history if h["step"] > first]
        final = trainer.evaluate()["eval_loss"]
    return {"loss": [h["loss"] for h in logged if "loss" in h],
            "eval": [h["eval_loss"] for h in logged if "eval_loss" in h], "final": [final]}


def two_rank_job(out: str) -> None:
    """Every two-rank case, in one torchrun launch."""
    results = {
        "plain": train(tf.Trainer, build_llama, f"{out}/plain-2", 2),
        "elixir": train(ElixirTrainer, build_llama, f"{out}/elixir-2", 2),
        "resumed": train(ElixirTrainer, build_llama, f"{out}/resumed-2", 2, resume=f"{out}/elixir-1/checkpoint-2"),
        "peft_plain": train(tf.Trainer, build_lora, f"{out}/peft-plain-2", 2),
        "peft_elixir": train(ElixirTrainer, build_lora, f"{out}/peft-elixir-2", 2),
        "peft_resumed": train(ElixirTrainer, build_lora, f"{out}/peft-resumed-2", 2,
                              resume=f"{out}/peft-elixir-1/checkpoint-2"),
    }
    if int(os.environ["RANK"]) == 0:
        with open(f"{out}/two_ranks.json", "w") as f:
            json.dump(results, f)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf"))
    one = {
        "plain": train(tf.Trainer, build_llama, f"{out}/plain-1", 1),
        "elixir": train(ElixirTrainer, build_llama, f"{out}/elixir-1", 1),
        "peft_plain": train(tf.Trainer, build_lora, f"{out}/peft-plain-1", 1),
        "peft_elixir": train(ElixirTrainer, build_lora, f"{out}/peft-elixir-1", 1),
    }
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), os.path.abspath(__file__), out],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    with open(f"{out}/two_ranks.json") as f:
        two = json.load(f)
    one["resumed"] = train(ElixirTrainer, build_llama, f"{out}/resumed-1", 1, resume=f"{out}/elixir-2/checkpoint-2")
    one["peft_resumed"] = train(ElixirTrainer, build_lora, f"{out}/peft-resumed-1", 1,
                                resume=f"{out}/peft-elixir-2/checkpoint-2")
    return out, one, two


@pytest.mark.parametrize("model", ["full", "peft"])
def test_losses_match_the_plain_trainer_on_one_and_two_ranks(runs, model):
    _, one, two = runs
    key = "" if model == "full" else "peft_"
    for got in (one, two):
        assert len(got[f"{key}elixir"]["loss"]) == STEPS
        assert len(got[f"{key}elixir"]["eval"]) == STEPS // SAVE_EVERY
        for what in ("loss", "eval", "final"):  # training, evaluation, and the best model reloaded at the end
            assert_close_rel(got[f"{key}elixir"][what], got[f"{key}plain"][what], REL)


@pytest.mark.parametrize("model", ["full", "peft"])
def test_resume_from_checkpoint_on_the_other_rank_count(runs, model):
    _, one, two = runs
    key = "" if model == "full" else "peft_"
    later = slice(SAVE_EVERY, None)
    for got in (one, two):  # one rank resumed two's checkpoint-2, two ranks resumed one's
        assert len(got[f"{key}resumed"]["loss"]) == STEPS - SAVE_EVERY
        assert_close_rel(got[f"{key}resumed"]["loss"], got[f"{key}plain"]["loss"][later], REL)
        assert_close_rel(got[f"{key}resumed"]["eval"], got[f"{key}plain"]["eval"][1:], REL)
        assert_close_rel(got[f"{key}resumed"]["final"], got[f"{key}plain"]["final"], REL)


def test_save_model_writes_a_folder_from_pretrained_loads(runs):
    out, _, _ = runs
    final = f"{out}/elixir-1/checkpoint-{STEPS}"
    assert os.path.isfile(f"{final}/config.json") and os.path.isdir(f"{final}/{'elixir'}")
    loaded = tf.AutoModelForCausalLM.from_pretrained(final)
    # the plain Trainer's final weights, as it saved them
    reference = tf.AutoModelForCausalLM.from_pretrained(f"{out}/plain-1/checkpoint-{STEPS}")
    want = reference.state_dict()
    for name, got in loaded.state_dict().items():
        assert_close_rel(got, want[name], REL)


def test_peft_checkpoint_holds_the_adapter_only(runs):
    from peft import PeftModel

    out, _, _ = runs
    final = f"{out}/peft-elixir-1/checkpoint-{STEPS}"
    assert os.path.isfile(f"{final}/adapter_config.json") and os.path.isfile(f"{final}/adapter_model.safetensors")
    assert not os.path.exists(f"{final}/model.safetensors")
    reference = f"{out}/peft-plain-1/checkpoint-{STEPS}"
    got = PeftModel.from_pretrained(build_llama(), final).state_dict()
    want = PeftModel.from_pretrained(build_llama(), reference).state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert_close_rel(got[name], want[name], REL)


@pytest.mark.slow
def test_fp16_losses_are_scaled_by_the_elixir_optimizer(tmp_path):
    """fp16: the loss Accelerate backpropagates is multiplied by Elixir's loss scale and the shards are unscaled
    before SGD (whose step, unlike Adam's, is proportional to the gradient) moves the weights as fp32 would."""
    args = dict(per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.5, use_cpu=True,
                report_to=[], disable_tqdm=True, save_strategy="no", train_sampling_strategy="sequential")
    start = {n: p.detach().clone() for n, p in build_llama().named_parameters()}
    plain = tf.Trainer(model=build_llama(), args=tf.TrainingArguments(str(tmp_path / "plain"), **args),
                       train_dataset=Tokens())
    fp16 = ElixirTrainer(model=build_llama(), args=tf.TrainingArguments(str(tmp_path / "fp16"), fp16=True, **args),
                         train_dataset=Tokens(), plan=lambda m, o: host_plan(m, o, torch.float16))
    for trainer in (plain, fp16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    assert fp16.elixir_optimizer.loss_scale == 2.0**16 and elixir.step_stats(fp16.model)["skipped_steps"] == 0
    got, want = elixir.full_state_dict(fp16.model), dict(plain.model.named_parameters())
    for name, value in got.items():  # the update, to fp16's rounding of the forward and backward
        assert_close_rel(value - start[name], want[name].detach() - start[name], 2e-2)


@pytest.mark.parametrize("setting, match", [
    (dict(torch_compile=True), "torch_compile=True"),
    (dict(bf16_full_eval=True), "bf16_full_eval=True"),
    (dict(auto_find_batch_size=True), "auto_find_batch_size=True"),
])
def test_arguments_elixir_cannot_honour_are_errors(tmp_path, setting, match):
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **setting)
    with pytest.raises(ValueError, match=match):
        ElixirTrainer(model=build_llama(), args=args, train_dataset=Tokens())


def test_an_optimizer_elixir_cannot_run_names_the_alternative(tmp_path):
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], optim="adafactor", max_steps=1)
    trainer = ElixirTrainer(model=build_llama(), args=args, train_dataset=Tokens())
    with pytest.raises(ValueError, match="use torch.optim.AdamW"):
        trainer.train()


def test_resuming_a_checkpoint_without_its_elixir_part_is_an_error(runs, tmp_path):
    out, _, _ = runs
    with pytest.raises(ValueError, match="holds no Elixir checkpoint"):
        train(ElixirTrainer, build_llama, str(tmp_path), 1, resume=f"{out}/plain-1/checkpoint-{SAVE_EVERY}")


@pytest.mark.parametrize("name", ["hf_trainer", "peft_lora"])
def test_examples_run(name, tmp_path):
    import importlib.util

    from elixir.hardware import Hardware

    pytest.importorskip("peft")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = example.main(steps=2, out=str(tmp_path), hardware=Hardware.preset("CPU"))
    assert trainer.state.global_step == 2
    saved = "final/model.safetensors" if name == "hf_trainer" else "adapter/adapter_model.safetensors"
    assert os.path.isfile(tmp_path / saved)


if __name__ == "__main__":
    two_rank_job(sys.argv[1])
