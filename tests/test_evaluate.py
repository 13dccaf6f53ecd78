"""Scores from a confusion matrix, and reading Lightning's CSV log."""

import pytest
import torch

from mnistflow.evaluate import confusion_matrix, read_log, scores


def test_confusion_matrix_and_scores():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(labels, preds, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = scores(cm)
    assert s["accuracy"] == 4 / 6 and s["samples"] == 6
    assert s["per_class"][0] == {"class": 0, "support": 2, "precision": 0.5, "recall": 0.5}
    assert s["per_class"][1]["precision"] == 2 / 3 and s["per_class"][1]["recall"] == 1.0


def test_scores_agree_with_torchmetrics_on_a_fixed_prediction_set():
    """Evaluation counts with torch.bincount and divides in Python floats rather than import
    torchmetrics (1.9 s a job here, for an evaluation that takes seconds); torchmetrics, which
    Lightning brings, is the reference: the same matrix, and its float32 precision, recall and
    accuracy. A class never predicted has precision 0 in both."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy, multiclass_confusion_matrix, multiclass_precision, multiclass_recall,
    )

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=g)
    preds = torch.where(torch.rand(2000, generator=g) < 0.8, labels, torch.randint(0, 10, (2000,), generator=g))
    preds[preds == 3] = 4  # class 3 never predicted
    cm = confusion_matrix(labels, preds)
    assert torch.equal(cm, multiclass_confusion_matrix(preds, labels, num_classes=10))
    s = scores(cm)
    ours = {key: [c[key] for c in s["per_class"]] for key in ("precision", "recall")}
    theirs = {"precision": multiclass_precision(preds, labels, num_classes=10, average=None),
              "recall": multiclass_recall(preds, labels, num_classes=10, average=None)}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key].tolist(), rel=1e-6, abs=1e-7), key
    assert ours["precision"][3] == 0.0
    assert s["accuracy"] == pytest.approx(float(multiclass_accuracy(preds, labels, num_classes=10, average="micro")), rel=1e-6)


def test_read_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train_loss_step,val_acc\n0,9,1.5,\n0,19,0.9,\n0,19,,0.91\n")
    series = read_log(log)
    assert series == {"train_loss_step": [(9, 1.5), (19, 0.9)], "val_acc": [(19, 0.91)]}
