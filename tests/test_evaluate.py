"""Scores from a confusion matrix, and reading Lightning's CSV log."""

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


def test_read_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train_loss_step,val_acc\n0,9,1.5,\n0,19,0.9,\n0,19,,0.91\n")
    series = read_log(log)
    assert series == {"train_loss_step": [(9, 1.5), (19, 0.9)], "val_acc": [(19, 0.91)]}
