"""A small Llama trained by the Hugging Face Trainer with Elixir (ElixirTrainer), on the text every Python ships.

    python examples/hf_trainer.py                                 # one process
    torchrun --nproc-per-node 2 examples/hf_trainer.py            # two ranks, the chunks sharded over both
    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 400 --resume   # continue the last checkpoint

The model is built from a config (no download); to fine-tune published weights, pass
`AutoModelForCausalLM.from_pretrained(...)` instead. `TrainingArguments` mean what they mean with the plain
Trainer; `plan=` takes "auto" (default), an elixir.Plan, a plan file or a function (model, optimizer) -> Plan.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from elixir.data import load_corpus
from elixir.integrations.hf import ElixirTrainer


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of `seq_len` bytes of the embedded corpus, as token ids."""

    def __init__(self, seq_len: int = 64) -> None:
        data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
        self.windows = data[: len(data) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def tiny_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def main(steps: int = 200, out: str = "runs/hf", resume: bool = False, bf16: bool = False,
         hardware=None) -> ElixirTrainer:
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=steps // 10, max_grad_norm=1.0, bf16=bf16,
        logging_steps=max(1, steps // 10), save_steps=max(1, steps // 2), report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = ElixirTrainer(model=tiny_llama(), args=args, train_dataset=ByteWindows(), hardware=hardware)
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(f"{out}/final")  # config.json and model.safetensors: from_pretrained loads it
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/hf")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--bf16", action="store_true")
    main(**vars(parser.parse_args()))
