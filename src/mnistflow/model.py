"""The LightningModule: a classifier over 28x28 grey images, with its recipe as hyperparameters.

Reads top to bottom: the networks, then the module that trains one of them. No device
code: the Trainer places the module and the batches.
"""

from __future__ import annotations

import torch
import pytorch_lightning as pl
from torch import nn
from torch.nn import functional as F


class ExamplesCNN(nn.Module):
    """The PyTorch examples MNIST network: conv32-conv64-maxpool-dropout-fc128-dropout-fc10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


class MLP(nn.Module):
    """A small perceptron, 784-256-10: the fast baseline."""

    def __init__(self, num_classes: int = 10, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


NETWORKS = {"cnn": ExamplesCNN, "mlp": MLP}


class MNISTClassifier(pl.LightningModule):
    def __init__(
        self,
        model: str = "cnn",
        optimizer: str = "adamw",
        lr: float = 0.003,
        weight_decay: float = 0.0,
        schedule: str = "onecycle",
        num_classes: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = NETWORKS[model](num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(y))
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
