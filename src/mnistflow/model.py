"""The LightningModule: a classifier over 28x28 grey images, with its recipe as hyperparameters.

Reads top to bottom: the training step, validation, the optimiser and schedule; the networks
themselves are plain PyTorch in networks.py. No device code: the Trainer places the module
and the batches.
"""

from __future__ import annotations

import torch
import pytorch_lightning as pl
from torch.nn import functional as F
from torchmetrics import MeanMetric

from .config import RECIPE
from .networks import NETWORKS


class MNISTClassifier(pl.LightningModule):
    def __init__(
        self,
        model: str = RECIPE["model"],
        optimizer: str = RECIPE["optimizer"],
        lr: float = RECIPE["lr"],
        weight_decay: float = RECIPE["weight_decay"],
        schedule: str = RECIPE["schedule"],
        num_classes: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = NETWORKS[model](num_classes)
        # The epoch's mean training loss, kept in the module's state so that it travels in a
        # mid-epoch checkpoint: a resumed epoch's mean covers every batch of the epoch. Fed
        # each sample's loss, with no NaN check: the check (`nans.any()`) makes the host wait
        # for the GPU at every step, and nan_strategy="disable" drops weights
        # (torchmetrics#3434), which per-sample losses do not need. A NaN loss makes the
        # epoch's mean NaN, as it should.
        self.train_loss_mean = MeanMetric(nan_strategy="disable")
        self.train_loss_mean.persistent(True)
        # The training step steps the optimizer and the schedule itself, in the order Lightning's
        # automatic optimization would, and trains the same weights (tests/test_model.py), with
        # fewer Python calls a step (bench/README.md, "Per-step overhead").
        self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = self.batch_loss(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        for schedule in self.trainer.lr_scheduler_configs:  # at its interval, as Lightning would
            if schedule.interval == "step" or self.trainer.is_last_batch:
                schedule.scheduler.step()
        return loss

    def batch_loss(self, batch) -> torch.Tensor:
        """The batch's mean loss; the epoch's mean, and what the loggers take, updated."""
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = losses.mean()
        self.train_loss_mean.update(losses.detach())
        # self.log is costly per call (bench/README.md, "Per-step overhead"), so each value is
        # logged when the loggers take it: the step loss (this process's) every
        # log_every_n_steps steps, the epoch mean once, at the epoch's last batch (averaged
        # over processes by torchmetrics at the epoch's end; a collective every step would
        # stall DDP).
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=len(y))
        if self.trainer.is_last_batch:
            self.log("train_loss_epoch", self.train_loss_mean, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adadelta(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return opt
        if hp.schedule == "step":
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}
        total = int(self.trainer.estimated_stepping_batches)
        onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": onecycle, "interval": "step"}}

    def __setattr__(self, name, value):
        # Lightning sets the name of the hook it is in on the module before and after every
        # hook it calls, dozens of times a step. nn.Module.__setattr__ would first look the
        # name up among parameters, buffers and submodules, which it never is, at several
        # times the cost of a plain attribute (bench/README.md, "Per-step overhead").
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
