"""The networks, in plain PyTorch: evaluation loads them without importing Lightning."""

from __future__ import annotations

import torch
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
