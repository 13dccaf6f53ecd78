"""A LightningDataModule over whole splits held in memory as tensors.

The tutorial path decodes every sample through PIL and `ToTensor` in a DataLoader; here a
split is one array file, normalised once, and a batch is one indexing operation. On a GPU
the splits are held on the device, so a batch is indexed there and nothing is copied from
host memory each step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import RECIPE
from .data import load_split, normalise

class TensorSplit(Dataset):
    """(x, y) pairs over in-memory tensors; a batch is fetched by one fancy index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        # DataLoader hands the whole batch's indices here when this method exists.
        if self.x.is_cuda:
            # From pinned memory, without blocking: a copy from pageable memory would make the
            # host wait for every step queued on the GPU before it, at every batch.
            idx = torch.as_tensor(indices).pin_memory().to(self.x.device, non_blocking=True)
        else:
            idx = torch.as_tensor(indices, device=self.x.device)
        return self.x[idx], self.y[idx]

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device))


def _batch_as_is(batch):
    return batch


class ResumableLoader(DataLoader):
    """A DataLoader that a mid-epoch checkpoint resumes at the next batch.

    Lightning keeps a loader's state_dict in its checkpoints and gives it back on resume. The
    state is the epoch and how many of its batches were handed out; the first pass after a
    resume from the middle of that epoch skips them, so no batch is repeated or left out:
    the sampler draws the same order again, from (seed, epoch). Skipping an in-memory batch
    is one indexing operation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._handed_out = 0
        self._skip: dict | None = None

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._skip["batches"] if self._skip and self._skip["epoch"] == epoch else 0
        self._skip = None
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        self._handed_out = skip
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": self._handed_out}

    def load_state_dict(self, state: dict) -> None:
        # At an epoch's end every batch was handed out: the next epoch starts afresh.
        self._skip = dict(state) if 0 < state["batches"] < len(self) else None


class MNISTDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_path: str | Path,
        test_path: str | Path | None = None,
        batch_size: int = RECIPE["batch_size"],
        val_size: int = 5000,  # the schema's dataset.val_size (tests/test_config.py)
        train_limit: int = 0,
        seed: int = RECIPE["seed"],
        eval_batch_size: int = 100,  # see mnistflow.evaluate.EVAL_BATCH
    ):
        super().__init__()
        self.train_path, self.test_path = train_path, test_path
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_limit = train_limit
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None):
        if stage in ("fit", "validate", None) and self.train_set is None:
            images, labels = load_split(self.train_path)
            if self.train_limit:
                images, labels = images[: self.train_limit], labels[: self.train_limit]
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val_size = min(self.val_size, len(labels) - 1)
            x = normalise(images)
            val, train = order[:val_size], order[val_size:]
            self.train_set = TensorSplit(x[train], labels[train])
            self.val_set = TensorSplit(x[val], labels[val]) if val_size else None
        if stage in ("test", "predict", None) and self.test_set is None:
            images, labels = load_split(self.test_path)
            self.test_set = TensorSplit(normalise(images), labels)
        # The whole of MNIST's training split is 172 MB as float32: on a GPU it stays there.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        for name in ("train_set", "val_set", "test_set"):
            split = getattr(self, name)
            if split is not None and split.x.device != device:
                setattr(self, name, split.to(device))

    def _loader(self, split, batch_size, sampler=None, loader=DataLoader):
        # A generator of the loader's own: otherwise each iterator draws its seed from torch's
        # global one, which dropout uses, and a resumed run would draw differently.
        return loader(split, batch_size=batch_size, sampler=sampler, collate_fn=_batch_as_is, num_workers=0,
                      generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self):
        # Each epoch's order comes from (seed, epoch), which Lightning sets on the sampler, so a
        # run resumed after epoch k draws epoch k+1's order, not epoch 0's again. Under DDP the
        # same sampler gives each process its share (Lightning keeps a DistributedSampler).
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = DistributedSampler(self.train_set, num_replicas=replicas, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler, loader=ResumableLoader)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size) if self.val_set else []

    def test_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size)
