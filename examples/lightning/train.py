"""A small PyTorch Lightning script: an MLP fits a noisy function of 16 inputs (synthetic data, CPU, seconds).

It runs three ways:

    python train.py --max_epochs 4                            # by hand (in this folder): no supervisor
    supervisor start examples/lightning/run.toml              # protocol mode: --supervised adds the callback
    supervisor start examples/lightning/run-zero-code.toml    # zero-code mode: the script as is, flags only

In protocol mode the supervisor's callback reports steps, evaluations and checkpoints and serves
checkpoint requests; the lines marked `supervisor` below are all it takes. In zero-code mode the script
keeps its own `out/last.ckpt` (a ModelCheckpoint overwritten every epoch) and resumes with `--ckpt_path`; the supervisor
reads the epoch and the loss from what it prints and snapshots the file after each epoch.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.01, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True)
        if self.hparams.sleep_s:
            time.sleep(self.hparams.sleep_s)  # stands for a bigger model
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def on_train_epoch_end(self):
        # One line per epoch: what a person reads, and what the zero-code mode reads (epoch, loss, val_loss).
        m = self.trainer.callback_metrics
        print(f"epoch {self.current_epoch}: loss={float(m['train_loss_epoch']):.5f} "
              f"val_loss={float(m.get('val_loss', float('nan'))):.5f}", flush=True)  # fmt: skip

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.tanh(x[:, :8].sum(1, keepdim=True) / 3) + 0.05 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt_path", default=None, help="resume from this Lightning checkpoint")
    p.add_argument("--out", default="out", help="folder of out/last.ckpt (zero-code mode)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--sleep_s", type=float, default=0.0, help="sleep per step (a slower model)")
    p.add_argument("--supervised", action="store_true", help="protocol mode: report to the supervisor")
    args = p.parse_args()

    callbacks: list[pl.Callback] = []
    if args.supervised:
        from supervisor.integrations.lightning import SupervisorCallback  # supervisor

        sup_cb = SupervisorCallback()  # supervisor: steps, evals, checkpoints, requests
        sup_cb.seed_everything()  # supervisor: SUPERVISOR_SEED, a new one after each fault
        callbacks.append(sup_cb)  # supervisor
        limits = sup_cb.trainer_limits()  # supervisor: max_epochs = the run's epochs
        ckpt_path = sup_cb.ckpt_path()  # supervisor: the checkpoint to resume from, None on a fresh start
        checkpointing = False  # supervisor: the callback saves the checkpoints
    else:
        pl.seed_everything(args.seed)
        # The script's own checkpoint: out/last.ckpt, overwritten at the end of every epoch.
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="last", enable_version_counter=False,
                                         save_on_train_epoch_end=True))  # fmt: skip
        limits = {"max_epochs": args.max_epochs}
        ckpt_path = args.ckpt_path
        checkpointing = True

    train = DataLoader(data(args.samples, 1), batch_size=64, shuffle=True)
    val = DataLoader(data(512, 2), batch_size=256)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, enable_checkpointing=checkpointing, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **limits,
    )  # fmt: skip
    trainer.fit(Regressor(sleep_s=args.sleep_s), train, val, ckpt_path=ckpt_path)
    print(f"done: {trainer.current_epoch} epochs, {trainer.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
