"""The networks' shapes, the module's recipe, the in-memory data module."""

import pytest
import torch

from mnistflow.data import load_split
from mnistflow.data import normalise
from mnistflow.datamodule import MNISTDataModule, TensorSplit
from mnistflow.model import MNISTClassifier
from mnistflow.networks import MLP, ExamplesCNN, FastCNN
from tests.automatic_optimization import AutomaticOptimization


@pytest.mark.parametrize("net", [FastCNN, ExamplesCNN, MLP])
def test_logits_shape(net):
    assert net()(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_examples_cnn_layers():
    sizes = [tuple(p.shape) for p in ExamplesCNN().parameters()]
    assert sizes == [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 9216), (128,), (10, 128), (10,)]


def test_fast_cnn_layers_and_default():
    sizes = [tuple(p.shape) for p in FastCNN().parameters()]
    # conv weights without bias (batch norm has its own), then BN scale and shift
    assert sizes == [(16, 1, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (10, 1568), (10,)]
    assert isinstance(MNISTClassifier().net, FastCNN)


def test_fast_cnn_runs_channels_last_and_loads_either_layout():
    net = FastCNN()
    second_conv = net.features[4].weight
    assert second_conv.is_contiguous(memory_format=torch.channels_last) and not second_conv.is_contiguous()
    pooled = net.features(torch.randn(4, 1, 28, 28))
    assert pooled.is_contiguous(memory_format=torch.channels_last) and not pooled.is_contiguous()
    # A state dict in the default layout (an earlier checkpoint) loads and gives the same logits.
    nchw = {k: v.contiguous() for k, v in net.state_dict().items()}
    other = FastCNN().eval()
    other.load_state_dict(nchw)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(other(x), net.eval()(x), atol=1e-5)
    assert other.features[4].weight.is_contiguous(memory_format=torch.channels_last)


def test_evaluation_uses_batch_norm_running_statistics(tmp_path):
    """A prediction must not depend on which images share its batch: the loaded network is in
    eval mode, so batch norm uses the statistics training accumulated."""
    from mnistflow.evaluate import load_model, predict

    module = MNISTClassifier(model="fast_cnn")
    with torch.no_grad():
        for _ in range(3):  # train-mode passes move the running statistics off their defaults
            module.net(torch.randn(32, 1, 28, 28) * 2 + 1)
    path = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    model = load_model(path)
    assert not model.training
    assert torch.allclose(predict(model, images, batch_size=50), predict(model, images, batch_size=7), atol=1e-5)
    assert torch.allclose(predict(model, images[:1]), predict(model, images)[:1], atol=1e-5)


def test_hyperparameters_saved():
    module = MNISTClassifier(model="mlp", optimizer="sgd", lr=0.1)
    assert module.hparams.model == "mlp" and module.hparams.lr == 0.1
    assert isinstance(module.net, MLP)


def test_normalise():
    x = normalise(torch.full((2, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor((1 - 0.1307) / 0.3081))


def test_batch_is_one_index():
    split = TensorSplit(torch.arange(10).float().view(10, 1), torch.arange(10))
    x, y = split.__getitems__([3, 1, 4])
    assert y.tolist() == [3, 1, 4] and x.shape == (3, 1)


def test_datamodule_splits_and_batches(tmp_path, mirror):
    from mnistflow.data import prepare

    prepare(mirror.directory, tmp_path / "train.npz", tmp_path / "test.npz")
    dm = MNISTDataModule(tmp_path / "train.npz", tmp_path / "test.npz", batch_size=64, val_size=500, train_limit=4000, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 3500 and len(dm.val_set) == 500
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and y.dtype == torch.int64
    dm.setup("test")
    assert len(dm.test_set) == 2000
    # the same seed holds out the same validation images
    dm2 = MNISTDataModule(tmp_path / "train.npz", batch_size=64, val_size=500, train_limit=4000, seed=1)
    dm2.setup("fit")
    assert torch.equal(dm.val_set.y, dm2.val_set.y)


def test_splits_are_held_on_the_trainers_device(tmp_path, mirror):
    """On a GPU the splits live on the device and a batch is indexed there, with no copy from
    host memory each step. No GPU here: the meta device stands in for one (shapes only)."""
    from types import SimpleNamespace

    from mnistflow.data import prepare

    prepare(mirror.directory, tmp_path / "train.npz", tmp_path / "test.npz")
    device = torch.device("meta")
    dm = MNISTDataModule(tmp_path / "train.npz", tmp_path / "test.npz", batch_size=64, val_size=500, train_limit=4000, seed=1)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device), world_size=1, global_rank=0)
    dm.setup("fit")
    dm.setup("test")
    assert {split.x.device for split in (dm.train_set, dm.val_set, dm.test_set)} == {device}
    assert {split.y.device for split in (dm.train_set, dm.val_set, dm.test_set)} == {device}
    x, y = next(iter(dm.train_dataloader()))
    assert x.device == device and x.shape == (64, 1, 28, 28) and y.device == device
    x, _ = next(iter(dm.val_dataloader()))
    assert x.device == device


def test_training_step_reads_no_value_back_and_trains_as_the_mean_loss():
    """The step asks no tensor for its value (on a GPU each such read, like the NaN check
    MeanMetric makes by default, would make the host wait for the device every step); its
    gradients are F.cross_entropy's mean's, bit for bit; and the epoch's mean over uneven
    batches is the mean over samples, not over batches."""
    from types import SimpleNamespace

    from torch.nn import functional as F
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    module = MNISTClassifier(model="mlp")
    module._trainer = SimpleNamespace(log_every_n_steps=0, is_last_batch=False, global_step=0)
    batches = [(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))) for n in (64, 64, 17)]
    losses = []
    for x, y in batches:
        torch.manual_seed(1)  # the same dropout masks in both passes
        module.zero_grad()
        with Reads() as reads:  # the step's own part; the optimizer's step after it is torch's
            loss = module.batch_loss((x, y))
        loss.backward()
        assert not {"__bool__", "item", "tolist", "any", "all", "isnan", "nonzero"} & set(reads.names), reads.names
        ours = [p.grad.clone() for p in module.parameters()]
        torch.manual_seed(1)
        module.zero_grad()
        F.cross_entropy(module(x), y).backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(ours, module.parameters()))
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(F.cross_entropy(module(x), y, reduction="none"))
    by_sample = torch.cat(losses).mean()
    by_batch = torch.stack([each.mean() for each in losses]).mean()
    assert torch.allclose(module.train_loss_mean.compute(), by_sample) and not torch.allclose(by_sample, by_batch)


@pytest.mark.parametrize("optimizer,schedule,precision", [("adamw", "onecycle", "32-true"), ("adadelta", "step", "32-true"),
                                                         ("sgd", "none", "32-true"), ("adamw", "onecycle", "bf16-mixed")])
def test_the_training_step_trains_what_automatic_optimization_trains(tmp_path, mirror, optimizer, schedule, precision):
    """Bit for bit: the weights, the optimizer's state, the learning rate, the step count and
    every logged figure, over two epochs with each schedule, and under mixed precision."""
    import pytorch_lightning as pl

    from mnistflow.data import prepare

    prepare(mirror.directory, tmp_path / "train.npz", tmp_path / "test.npz")

    def fit(module_class):
        pl.seed_everything(3, verbose=False)
        module = module_class(model="mlp", optimizer=optimizer, lr=0.05, schedule=schedule)
        data = MNISTDataModule(tmp_path / "train.npz", batch_size=64, val_size=200, train_limit=1000, seed=3)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, precision=precision, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=4)
        trainer.fit(module, datamodule=data)
        return module, trainer

    (ours, ours_trainer), (reference, reference_trainer) = fit(MNISTClassifier), fit(AutomaticOptimization)
    assert ours_trainer.global_step == reference_trainer.global_step == 2 * 13
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values(), strict=True))
    states = [trainer.optimizers[0].state_dict() for trainer in (ours_trainer, reference_trainer)]
    assert states[0]["param_groups"] == states[1]["param_groups"]
    assert all(torch.equal(a[key], b[key]) for a, b in zip(states[0]["state"].values(), states[1]["state"].values(), strict=True)
               for key in a)
    metrics = [{k: float(v) for k, v in trainer.callback_metrics.items()} for trainer in (ours_trainer, reference_trainer)]
    assert set(metrics[0]) == {"train_loss_step", "train_loss_epoch", "val_loss", "val_acc"} and metrics[0] == metrics[1]
