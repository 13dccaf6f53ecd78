"""Item 1: training throughput (samples/s after warm-up), side by side in one process.

Same model (the examples CNN), same batch size, same data (Fashion-MNIST's 55,000 training
images left after the workflow's 5,000 validation hold-out), same optimizer and schedule
(the default recipe: AdamW + one-cycle), same threads:

* tutorial: torchvision's dataset with per-sample ToTensor/Normalize through a DataLoader,
  in a hand-written loop (the PyTorch examples' way);
* bare: a hand-written loop over in-memory, pre-normalised tensors (the bare-metal reference);
* ours: this project's training step as the workflow runs it: MNISTDataModule,
  MNISTClassifier and a Trainer with train.py's settings (CSV logger, checkpoint callback,
  the throughput callback, the default log_every_n_steps).

The three are interleaved, `--repeats` times; the best of each is compared (medians kept too). Then bare-loop
variants (threads, batch size, channels-last, torch.compile, oneDNN off) push the numbers.
Last, ours against the bare loop on the workflow's default network (fast_cnn), where a
step is ~12x cheaper and Lightning's per-step cost weighs more.

    PYTHONPATH=src .venv/bin/python bench/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

FLOP_PER_SAMPLE = 72e6  # forward + backward of the examples CNN (see README)


def recipe_optimizer(model, steps, lr=0.003, wd=0.0001):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    return opt, sched


def timed_loop(batches, step, warmup, measured, batch_size):
    """Run warmup + measured steps; the clock runs from the end of step `warmup` to the end of the last."""
    t0 = None
    for i, (x, y) in enumerate(batches):
        step(x, y)
        if i + 1 == warmup:
            t0 = time.perf_counter()
        if i + 1 == warmup + measured:
            break
    return measured * batch_size / (time.perf_counter() - t0)


def cycle(loader):
    while True:
        yield from loader


def shuffled_batches(x, y, batch_size):
    """In-memory batches, a fresh permutation each epoch, for ever (the bare loop's data path)."""
    while True:
        perm = torch.randperm(len(y))
        for s in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[s : s + batch_size]
            yield x[idx], y[idx]


def tutorial(root, batch_size, warmup, measured, seed=42):
    """The examples' data path: torchvision dataset, per-sample ToTensor + Normalize, DataLoader."""
    from torchvision import datasets, transforms

    from mnistflow.networks import ExamplesCNN

    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    cls = datasets.FashionMNIST if "fashion" in str(root) else datasets.MNIST
    ds = cls(root, train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    model = ExamplesCNN().train()
    opt, sched = recipe_optimizer(model, warmup + measured + 1)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()

    return timed_loop(cycle(loader), step, warmup, measured, batch_size)


def in_memory(train_npz, val_size=5000, seed=42):
    """The same training split as the data module: normalised once, validation held out."""
    from mnistflow.data import load_split
    from mnistflow.datamodule import normalise

    images, labels = load_split(train_npz)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    x = normalise(images)
    train = order[val_size:]
    return x[train].contiguous(), labels[train].contiguous()


def bare(x, y, batch_size, warmup, measured, seed=42, channels_last=False, compile_=False, bf16=False):
    """A hand-written loop over in-memory tensors: one fancy index per batch."""
    from mnistflow.networks import ExamplesCNN

    torch.manual_seed(seed)
    model = ExamplesCNN().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt, sched = recipe_optimizer(model, warmup + measured + 1)
    fwd = torch.compile(model) if compile_ else model

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(fwd(xb), yb)
        loss.backward()
        opt.step()
        sched.step()

    t_compile = None
    if compile_:
        t0 = time.perf_counter()
        xb, yb = next(shuffled_batches(x, y, batch_size))
        step(xb, yb)
        t_compile = time.perf_counter() - t0
    sps = timed_loop(shuffled_batches(x, y, batch_size), step, warmup, measured, batch_size)
    return (sps, t_compile) if compile_ else sps


def ours(train_npz, batch_size, warmup, measured, threads, seed=42, val_size=5000, channels_last=False, extra_callbacks=(),
         network="cnn"):
    """The workflow's training step: train.py's Trainer, our data module and model, our defaults.

    Built as mnistflow.train.train() builds it, with its callbacks (that function also
    writes the run's files, so it cannot be called for a timed slice of steps); the only
    additions are `max_steps` (stop after the measured steps) and a timing callback.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from mnistflow.config import RECIPE, RUNTIME
    from mnistflow.datamodule import MNISTDataModule
    from mnistflow.geometry import Geometry
    from mnistflow.model import MNISTClassifier
    from mnistflow.callbacks import NoProfiler, ResumeState, SaveAndStop, Throughput
    from mnistflow.signals import StopSignals

    # The comparison's network and the bare loop's lr (recipe_optimizer), not the default recipe's.
    run = {**RECIPE, "model": network, "lr": 0.003, "batch_size": batch_size, "seed": seed}
    geometry = Geometry.from_run(run)
    torch.set_num_threads(threads)
    pl.seed_everything(run["seed"], workers=True, verbose=False)
    data = MNISTDataModule(train_npz, batch_size=run["batch_size"] // geometry.world_size, val_size=val_size, seed=run["seed"])
    model = MNISTClassifier(model=run["model"], optimizer=run["optimizer"], lr=run["lr"],
                            weight_decay=run["weight_decay"], schedule=run["schedule"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()
            elif trainer.global_step == warmup + measured and hasattr(self, "t0"):
                self.s = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        trainer = pl.Trainer(
            **geometry.trainer_kwargs(),
            max_epochs=run["epochs"],
            max_steps=warmup + measured,
            precision=run["precision"],
            default_root_dir=out,
            logger=CSVLogger(save_dir=out, name="logs", version=""),
            callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
                       Throughput(),
                       # train.py's: it checks for a stop signal and the checkpoint interval at every batch end
                       SaveAndStop(StopSignals(()), out / "checkpoints" / "last.ckpt", 600, 10),
                       ResumeState({}, 1), clock, *extra_callbacks],
            profiler=NoProfiler(),
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=False,
            log_every_n_steps=RUNTIME["log_every_n_steps"],
        )
        trainer.fit(model, datamodule=data)
    return measured * batch_size / clock.s if hasattr(clock, "s") else None


def lockstep(train_npz, tv_root, x, y, batch_size, warmup, measured, threads, seed=42, network="cnn"):
    """All three paths in one loop, one step each in turn: ours (the Lightning step), then a
    tutorial step and a bare step run from ours' batch-end callback. Each step is timed on
    its own; the median step time of each path gives its samples/s. Load from other jobs
    hits the three alike, so the ratios hold on a busy machine.
    """
    import pytorch_lightning as pl

    from torchvision import datasets, transforms

    from mnistflow.networks import NETWORKS

    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    cls = datasets.FashionMNIST if "fashion" in str(tv_root) else datasets.MNIST
    tut_batches = cycle(torch.utils.data.DataLoader(cls(tv_root, train=True, transform=transform), batch_size=batch_size, shuffle=True))
    total = warmup + measured + 1
    models = {}
    for name in ("tutorial", "bare"):
        torch.manual_seed(seed)
        m = NETWORKS[network]().train()
        models[name] = (m, *recipe_optimizer(m, total))

    source = {"tutorial": tut_batches, "bare": shuffled_batches(x, y, batch_size)}
    times = {"ours": [], "tutorial": [], "bare": []}

    def step(name):
        model, opt, sched = models[name]
        xb, yb = next(source[name])
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()

    class Lockstep(pl.Callback):
        mark = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self.mark is not None:
                times["ours"].append(now - self.mark)
            for name in ("tutorial", "bare"):
                t = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t)
            self.mark = time.perf_counter()

    ours(train_npz, batch_size, 0, warmup + measured, threads, seed=seed, extra_callbacks=[Lockstep()], network=network)
    sps = {k: batch_size / statistics.median(v[warmup:]) for k, v in times.items()}
    return sps, {k: len(v[warmup:]) for k, v in times.items()}


def stepper(x, y, batch_size, seed=42, channels_last=False, compile_=False, threads=None, mkldnn=True, total=10_000):
    """One training step of the bare loop per call, with its own model, optimizer and batches."""
    from mnistflow.networks import ExamplesCNN

    torch.manual_seed(seed)
    model = ExamplesCNN().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt, sched = recipe_optimizer(model, total)
    fwd = torch.compile(model) if compile_ else model
    state = {"perm": torch.randperm(len(y)), "at": 0}

    def step():
        if state["at"] + batch_size > len(y):
            state["perm"], state["at"] = torch.randperm(len(y)), 0
        idx = state["perm"][state["at"] : state["at"] + batch_size]
        state["at"] += batch_size
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.backends.mkldnn.flags(enabled=mkldnn):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(fwd(x[idx]), y[idx])
                loss.backward()
                opt.step()
                sched.step()
        finally:
            if threads:
                torch.set_num_threads(old)

    return step


def alternate_variants(x, y, bs, threads, warmup, steps, train_npz):
    """Each variant against a fresh reference, one step each in turn; median step times."""
    specs = [
        ("batch=32", {}, 32),
        ("batch=64", {}, 64),
        ("batch=256", {}, 256),
        ("batch=512", {}, 512),
        ("channels_last", dict(channels_last=True), bs),
        ("oneDNN off (slow_conv2d + GEMM)", dict(mkldnn=False), bs),
        ("torch.compile (inductor)", dict(compile_=True), bs),
    ]
    out = []
    for name, kw, b in specs:
        ref = stepper(x, y, bs)
        var = stepper(x, y, b, **kw)
        t0 = time.perf_counter()
        var()
        first = time.perf_counter() - t0
        n = max(10, steps * bs // b)
        tr, tv = [], []
        for i in range(warmup + max(n, steps)):
            t = time.perf_counter(); ref(); dt_ref = time.perf_counter() - t
            t = time.perf_counter(); var(); dt_var = time.perf_counter() - t
            if i >= warmup:
                tr.append(dt_ref)
                tv.append(dt_var)
        r = bs / statistics.median(tr)
        v = b / statistics.median(tv)
        rec = {"variant": name, "batch": b, "samples_per_s": round(v, 1), "reference": round(r, 1), "over_reference": round(v / r, 3)}
        if kw.get("compile_"):
            rec["compile_s"] = round(first, 1)
        out.append(rec)
        print(rec, flush=True)
    # Thread count: switching OpenMP's pool size every step would cost more than it measures,
    # so 1 thread runs in blocks, alternating with 2-thread blocks, best of 2 each.
    ref_b, one_b = [], []
    for _ in range(2):
        ref_b.append(bare(x, y, bs, warmup, steps))
        one_b.append(_with_threads(1, lambda: bare(x, y, bs, warmup, steps)))
    rec = {"variant": "threads=1 (blocks, best of 2)", "batch": bs, "samples_per_s": round(max(one_b), 1),
           "reference": round(max(ref_b), 1), "over_reference": round(max(one_b) / max(ref_b), 3)}
    out.append(rec)
    print(rec, flush=True)
    # The same change inside ours: our module converted to channels-last from outside (see README).
    ls_ref = lockstep_ours_pair(train_npz, bs, warmup, steps, threads)
    out.append(ls_ref)
    print(ls_ref, flush=True)
    return out


def lockstep_ours_pair(train_npz, bs, warmup, steps, threads):
    """ours with channels-last weights vs ours as is: two Trainers cannot interleave, so best of 2 blocks each, alternating."""
    a, b = [], []
    for _ in range(2):
        a.append(ours(train_npz, bs, warmup, steps, threads))
        b.append(ours(train_npz, bs, warmup, steps, threads, channels_last=True))
    return {"variant": "ours + channels_last (blocks, best of 2)", "batch": bs, "samples_per_s": round(max(b), 1),
            "reference": round(max(a), 1), "over_reference": round(max(b) / max(a), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion")
    p.add_argument("--batch-size", type=int, default=128, help="the default recipe's batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--samples", type=int, default=9600, help="samples per measurement, after warm-up")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument("--quick", action="store_true", help="fewer samples and repeats (a smoke test)")
    p.add_argument("--no-variants", action="store_true", help="only the three-way comparison")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.samples, args.warmup = 1, 1280, 3
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    import pytorch_lightning  # noqa: F401  (its import sets what plain_cuda_check undoes)

    from mnistflow.train import keep_freed_memory, plain_cuda_check

    # The entry point's process settings, for all three paths alike.
    keep_freed_memory()
    plain_cuda_check()
    root = common.dataset(args.dataset)
    tv_root = root / "torchvision"
    torch.set_num_threads(args.threads)
    bs = args.batch_size
    steps = max(10, args.samples // bs)
    x, y = in_memory(root / "train.npz")
    load_start = common.load_time()

    ls_steps = max(20, args.samples * 2 // bs)
    ls, ls_n = lockstep(root / "train.npz", tv_root, x, y, bs, args.warmup, ls_steps, args.threads)
    print("lockstep: " + ", ".join(f"{k} {v:,.0f}" for k, v in ls.items()), flush=True)
    runs = {"tutorial": [], "bare": [], "ours": []}
    for r in range(args.repeats):
        runs["tutorial"].append(tutorial(tv_root, bs, args.warmup, steps))
        runs["bare"].append(bare(x, y, bs, args.warmup, steps))
        runs["ours"].append(ours(root / "train.npz", bs, args.warmup, steps, args.threads))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()), flush=True)
    # Best of the interleaved repeats: other jobs on a shared machine only ever slow a slot down,
    # so the fastest repeat of each path is the least disturbed estimate; medians are kept too.
    med = {k: max(v) for k, v in runs.items()}
    medians = {k: statistics.median(v) for k, v in runs.items()}
    record = {
        "method": "lockstep: one step of each path in turn inside one Lightning fit, median step time (robust to other load); "
                  "blocks: each path for a block of steps, interleaved repeats, best block",
        "lockstep_samples_per_s": {k: round(v, 1) for k, v in ls.items()},
        "lockstep_steps": ls_n,
        "dataset": common.DATASETS[args.dataset],
        "batch_size": bs, "threads": args.threads, "warmup_steps": args.warmup, "measured_steps": steps,
        "repeats": args.repeats,
        "samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "samples_per_s_median": {k: round(v, 1) for k, v in medians.items()},
        "ours_over_bare_median": round(medians["ours"] / medians["bare"], 3),
        "ours_over_tutorial_median": round(medians["ours"] / medians["tutorial"], 3),
        "samples_per_s_each_repeat": {k: [round(s, 1) for s in v] for k, v in runs.items()},
        "ours_over_tutorial": round(ls["ours"] / ls["tutorial"], 3),
        "ours_over_bare": round(ls["ours"] / ls["bare"], 3),
        "ours_over_tutorial_blocks": round(med["ours"] / med["tutorial"], 3),
        "ours_over_bare_blocks": round(med["ours"] / med["bare"], 3),
        "ours_over_bare_each_repeat": [round(o / b, 3) for o, b in zip(runs["ours"], runs["bare"])],
        "bare_over_tutorial": round(med["bare"] / med["tutorial"], 3),
        "ceiling_note": "72 MFLOP/sample fwd+bwd; fraction of a 170 GFLOP/s 2-thread fp32 GEMM peak",
        "loadavg_start": load_start,
    }
    rows = [[k, ls[k], ls[k] / ls["bare"], ls[k] * FLOP_PER_SAMPLE / 1e9, med[k], medians[k]] for k in ("tutorial", "bare", "ours")]
    md = common.table(["path", "samples/s (lockstep)", "/ bare", "GFLOP/s", "samples/s (blocks, best)", "(blocks, median)"], rows)
    md += (f"\n\nours / tutorial = **{record['ours_over_tutorial']}**, ours / bare = **{record['ours_over_bare']}** "
           f"(lockstep: batch {bs}, {args.threads} threads, {ls_n['ours']} steps of each after {args.warmup} warm-up). "
           f"Blocks of {steps} steps, {args.repeats} interleaved repeats: best ours/tutorial {record['ours_over_tutorial_blocks']}, "
           f"ours/bare {record['ours_over_bare_blocks']}; medians {record['ours_over_tutorial_median']}, {record['ours_over_bare_median']}.")

    if not args.no_variants:
        variants = alternate_variants(x, y, bs, args.threads, args.warmup, max(30, args.samples // bs), root / "train.npz")
        record["variants"] = variants
        md += ("\n\nWhat each setting gives (the bare loop; every variant runs in lockstep with the reference, "
               "one step each in turn, median step time; torch.compile's compile time apart):\n\n")
        md += common.table(["variant", "samples/s", "reference (batch %d, %d threads) samples/s" % (bs, args.threads), "ratio", "compile s (first step)"],
                           [[v["variant"], v["samples_per_s"], v["reference"], v["over_reference"], v.get("compile_s")] for v in variants])

    fast, _ = lockstep(root / "train.npz", tv_root, x, y, bs, args.warmup, ls_steps, args.threads, network="fast_cnn")
    print("lockstep, fast_cnn: " + ", ".join(f"{k} {v:,.0f}" for k, v in fast.items()), flush=True)
    record["fast_cnn_lockstep_samples_per_s"] = {k: round(v, 1) for k, v in fast.items()}
    record["fast_cnn_ours_over_bare"] = round(fast["ours"] / fast["bare"], 3)
    record["fast_cnn_ours_over_tutorial_data_path"] = round(fast["ours"] / fast["tutorial"], 3)
    md += ("\n\nThe default network (fast_cnn), the same lockstep (the tutorial's data path feeding fast_cnn):\n\n"
           + common.table(["path", "samples/s (lockstep)", "/ bare"], [[k, fast[k], fast[k] / fast["bare"]] for k in ("tutorial", "bare", "ours")])
           + f"\n\nfast_cnn: ours / bare = **{record['fast_cnn_ours_over_bare']}**; "
             f"{fast['ours'] / ls['ours']:.2f}x the samples/s of ours with the examples CNN.")
    common.save("throughput", record, md)


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _no_mkldnn(fn):
    with torch.backends.mkldnn.flags(enabled=False):
        return fn()


if __name__ == "__main__":
    main()
