"""LoRA adapters trained on a frozen Llama wrapped by Elixir (ElixirTrainer with a PEFT model).

    python examples/peft_lora.py
    torchrun --nproc-per-node 2 examples/peft_lora.py

The frozen base lives in chunks without masters, optimizer states or gradients (the planner packs it apart
and charges it its shard only); the adapters train as under plain PEFT. The result is an adapter folder
(adapter_config.json, adapter_model.safetensors) that `PeftModel.from_pretrained(base, folder)` loads.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from peft import LoraConfig, get_peft_model

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


def main(steps: int = 100, out: str = "runs/lora", hardware=None) -> ElixirTrainer:
    config = transformers.LlamaConfig(  # in practice: AutoModelForCausalLM.from_pretrained(name)
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    base = transformers.LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj"]))
    model.print_trainable_parameters()
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3, max_grad_norm=1.0,
        logging_steps=max(1, steps // 10), save_steps=steps, report_to=[], use_cpu=not torch.cuda.is_available(),
    )
    trainer = ElixirTrainer(model=model, args=args, train_dataset=ByteWindows(), hardware=hardware)
    trainer.train()
    trainer.save_model(f"{out}/adapter")  # every rank calls it: the adapter's values are gathered from the chunks
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/lora")
    main(**vars(parser.parse_args()))
