"""The default recipe as a competent user writes it by hand: bench/default_recipe.py's reference.

    python bench/handwritten_default.py --train-data train.npz --out model.pt [--val-size 5000] [--threads 2]

The same network (mnistflow.networks.FastCNN), optimiser (AdamW, weight decay 1e-4), one-cycle
schedule peaking at 0.02, batch 128, 2 epochs, the same held-out validation split scored after
each epoch, over the whole split in memory: one normalisation up front, a fresh permutation
each epoch, batches by indexing. No DataLoader, no per-sample transforms, no logging
framework. Prints one JSON line: the training seconds (each epoch from its first to its last
batch, validation excluded, as the workflow's train.json counts them) and samples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.nn import functional as F

from mnistflow.networks import FastCNN

MEAN, STD = 0.1307, 0.3081


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)

    with np.load(args.train_data) as split:
        images, labels = torch.from_numpy(split["images"]), torch.from_numpy(split["labels"]).long()
    if args.train_limit:
        images, labels = images[: args.train_limit], labels[: args.train_limit]
    x = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
    val, train = order[: args.val_size], order[args.val_size:]
    x_train, y_train, x_val, y_val = x[train], labels[train], x[val], labels[val]

    model = FastCNN()
    batch = 128
    steps = args.epochs * -(-len(y_train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=steps)
    train_s, samples = 0.0, 0
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_train))
        for i in range(0, len(y_train), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            samples += len(idx)
        train_s += time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(x_val[i : i + 1000]).argmax(1) == y_val[i : i + 1000]).sum()) for i in range(0, len(y_val), 1000))
        print(f"epoch {epoch + 1}: val_acc {correct / len(y_val):.4f}", flush=True)
    torch.save(model.state_dict(), args.out)
    print(json.dumps({"train_s": train_s, "samples": samples, "samples_per_s": samples / train_s}))


if __name__ == "__main__":
    main()
