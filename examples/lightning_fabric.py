"""A small GPT trained in a Lightning Fabric loop with Elixir as its strategy.

    python examples/lightning_fabric.py                   # one device
    python examples/lightning_fabric.py --devices 2       # two processes, started by Fabric's launcher

`fabric.setup(model, optimizer)` wraps both with Elixir (the plan is searched at the first forward);
`fabric.save` writes a checkpoint folder that `fabric.load` restores on any number of devices.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch

from elixir.data import load_corpus
from elixir.integrations.lightning import ElixirFabricStrategy
from elixir.models import GPT, GPTConfig


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of `seq_len` bytes of the embedded corpus, as token ids."""

    def __init__(self, seq_len: int = 64) -> None:
        data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
        self.windows = data[: len(data) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main(steps: int = 200, devices: int = 1, out: str = "runs/fabric", hardware=None) -> list[float]:
    fabric = L.Fabric(accelerator="auto", devices=devices, strategy=ElixirFabricStrategy(hardware=hardware))
    fabric.launch()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(GPTConfig.preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model, optimizer, scheduler = fabric.setup(model, optimizer, scheduler=scheduler)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(ByteWindows(), batch_size=8, shuffle=True))
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}
    if os.path.isdir(out):
        fabric.load(out, state)  # resumes where the last run stopped
    losses = []
    while state["step"] < steps:
        for batch in loader:
            loss = model(**batch).loss
            fabric.backward(loss)  # fp16: scaled by Elixir's loss scale
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["step"] += 1
            losses.append(loss.item())
            if state["step"] % 50 == 0 or state["step"] == steps:
                fabric.print(f"step {state['step']}: loss {loss.item():.3f}")
                fabric.save(out, state)
            if state["step"] == steps:
                break
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", default="runs/fabric")
    main(**vars(parser.parse_args()))
