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


class FastCNN(nn.Module):
    """The default: conv16-BN-pool, conv32-BN-pool, fc10.

    Pooling after each convolution keeps the second one on 14x14 maps, so a sample costs
    ~6 MFLOP forward and backward against the examples CNN's ~72: ~7x its samples/s on a
    2-core CPU with channels-last (below; 4.5x without). Batch norm lets it train at lr
    0.02 where the examples CNN takes 0.003. On MNIST it reaches 99% test accuracy in 2
    epochs (bench/results/time_to_accuracy.md).
    Under DDP each process normalises over its own share of the batch (no SyncBatchNorm):
    with 64 images a process, the 2-process run scores as the single one (99.1%).

    Its convolution weights are channels-last, so every activation is too: on a CPU max
    pooling over NCHW maps took 30% of a training step, and channels-last trains 1.5x and
    predicts 3x the samples/s (bench/results/throughput.md). A one-channel input is
    channels-last already, and a checkpoint loads into either layout.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 16), nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, num_classes)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: the batch norm that follows has its own.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MLP(nn.Module):
    """A small perceptron, 784-256-10: the fast baseline."""

    def __init__(self, num_classes: int = 10, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


NETWORKS = {"fast_cnn": FastCNN, "cnn": ExamplesCNN, "mlp": MLP}
