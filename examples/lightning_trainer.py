"""A small GPT trained by Lightning's Trainer with Elixir as its strategy, on the text every Python ships.

    python examples/lightning_trainer.py                  # one device
    python examples/lightning_trainer.py --devices 2      # two processes, started by Lightning's launcher
    python examples/lightning_trainer.py --resume runs/lightning/last.ckpt --steps 400   # on any device count

`strategy="elixir"` plans the run from the first batch (elixir.plan); `ElixirStrategy(plan=...)` takes a Plan,
a plan file or a function (module, optimizer) -> Plan instead. Checkpoints are folders written by elixir.save.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from elixir.data import load_corpus
from elixir.integrations.lightning import ElixirStrategy  # importing it registers strategy="elixir"
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


class LitGPT(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = GPT(GPTConfig.preset("tiny"))

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def main(steps: int = 200, devices: int = 1, out: str = "runs/lightning", resume: str | None = None,
         hardware=None) -> L.Trainer:
    torch.manual_seed(0)  # the same initial weights on every rank
    trainer = L.Trainer(
        accelerator="auto", devices=devices, strategy=ElixirStrategy(hardware=hardware), max_steps=steps,
        gradient_clip_val=1.0, default_root_dir=out, logger=False,
        callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=max(1, steps // 2), save_last=True)],
    )
    loader = torch.utils.data.DataLoader(ByteWindows(), batch_size=8, shuffle=True)
    trainer.fit(LitGPT(), loader, ckpt_path=resume)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to continue from")
    main(**vars(parser.parse_args()))
