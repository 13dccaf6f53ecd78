"""The workflow's module as Lightning's automatic optimization trains it, as the module did
until 2026-12-06: the reference its own optimizer step must match (tests/test_model.py), and
what bench/step_overhead.py measures that step against."""

from mnistflow.model import MNISTClassifier


class AutomaticOptimization(MNISTClassifier):
    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        return self.batch_loss(batch)
