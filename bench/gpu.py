"""The GPU benchmark: one prepared script for one short run on a lent GPU machine.

    python3 bench/gpu.py --data .gpudata --out "$OUT"        # on the GPU machine
    PYTHONPATH=src .venv/bin/python bench/gpu.py --data .gpudata --out /tmp/gpu --cpu --tiny   # a dry rehearsal here

The machine has no internet: the data travels with it (`.gpudata/raw/*.gz`, the full MNIST
from npm, which `bench/gpu_data.py` stages; here they become `train.npz`/`test.npz`, in a temporary folder, through
`mnistflow.data.prepare`, as the workflow's prepare rule makes them). Sections,
each written to `<out>/gpu.json` as soon as it ends, each skipped when the time budget is spent:

a. throughput of the examples CNN with the whole dataset on the GPU, bf16 autocast: a plain
   loop, and our LightningModule with our data module as the workflow runs them (the data
   module holds the splits on the device); and how often our step makes the host wait for
   the GPU (torch's sync debug mode), and from where;
b. time to 98% / 99% test accuracy, plain loop, data on the GPU, bf16, several recipes;
c. `python -m mnistflow.train` on the GPU: 1 process (nodes=1, devices=1, accelerator gpu),
   then DDP with 2 node processes sharing the one GPU through the local launcher
   (nodes=2, devices=1); train.json shows the accelerator; test accuracy of each model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

T_START = time.perf_counter()
RESULT: dict = {}


def elapsed():
    return time.perf_counter() - T_START


def save(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    RESULT["elapsed_s"] = round(elapsed(), 1)
    (out / "gpu.json").write_text(json.dumps(RESULT, indent=2) + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(path, device):
    from mnistflow.data import load_split
    from mnistflow.datamodule import normalise

    images, labels = load_split(path)
    return normalise(images).to(device), labels.to(device)


# ---- a. throughput ------------------------------------------------------------------------

def plain_throughput(x, y, device, batch, steps, warmup, bf16=True, channels_last=False):
    from mnistflow.networks import ExamplesCNN

    torch.manual_seed(0)
    model = ExamplesCNN().to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=1e-4)
    n = len(y)

    def step():
        idx = torch.randint(0, n, (batch,), device=device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def fit_as_the_workflow(train_npz, device, batch, max_steps, out: Path, callback) -> None:
    """Our MNISTClassifier and MNISTDataModule under a Trainer configured as train.py does
    (CSV logger, last.ckpt, NoProfiler), bf16-mixed, with `callback` added."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from mnistflow.callbacks import NoProfiler
    from mnistflow.config import RUNTIME
    from mnistflow.datamodule import MNISTDataModule
    from mnistflow.model import MNISTClassifier

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, num_nodes=1, strategy="auto",
        max_epochs=1, max_steps=max_steps, precision="bf16-mixed", default_root_dir=out,
        logger=CSVLogger(save_dir=out, name="logs", version=""),
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True), callback],
        profiler=NoProfiler(),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=RUNTIME["log_every_n_steps"],
        limit_val_batches=0,
    )
    trainer.fit(MNISTClassifier(), datamodule=MNISTDataModule(train_npz, batch_size=batch, val_size=500, seed=0))


def lightning_throughput(train_npz, device, batch, steps, warmup, tmp):
    """Samples/s of fit_as_the_workflow over `steps` after `warmup`."""
    import pytorch_lightning as pl

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            if trainer.global_step == warmup:
                sync(device)
                self.t0 = time.perf_counter()
            elif trainer.global_step == warmup + steps:
                sync(device)
                self.s = time.perf_counter() - self.t0

    clock = Clock()
    fit_as_the_workflow(train_npz, device, batch, warmup + steps, Path(tmp) / f"pl_{batch}", clock)
    return batch * steps / clock.s


def lightning_syncs(train_npz, device, batch, steps, warmup, tmp) -> dict:
    """How often our training step makes the host wait for the GPU: a short fit_as_the_workflow
    under torch's sync debug mode, which warns at each synchronizing call; the warnings after
    `warmup` steps, per step, and where they come from (file:line of the Python frame that
    made the call). Not timed: the mode slows each sync."""
    import collections
    import warnings

    import pytorch_lightning as pl

    from mnistflow.config import RUNTIME

    if device.type != "cuda":
        return {"batch": batch, "syncs_per_step": None, "note": "no GPU (rehearsal)"}

    class Mark(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            if trainer.global_step == warmup:
                self.start = len(caught)

    mark = Mark()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_as_the_workflow(train_npz, device, batch, warmup + steps, Path(tmp) / f"syncs_{batch}", mark)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    measured = [w for w in caught[mark.start:] if "synchroniz" in str(w.message)]
    places = collections.Counter(f"{w.filename}:{w.lineno}" for w in measured)
    return {"batch": batch, "steps": steps, "syncs": len(measured), "syncs_per_step": round(len(measured) / steps, 3),
            "log_every_n_steps": RUNTIME["log_every_n_steps"], "places": dict(places.most_common(8))}


def tiled_train(src: Path, times: int, tmp) -> Path:
    """The training split repeated `times` over, so an epoch outlasts the measured steps."""
    from mnistflow.data import load_split, write_arrays

    images, labels = load_split(src)
    path = Path(tmp) / "train_tiled.npz"
    write_arrays(path, images=images.repeat(times, 1, 1).numpy(), labels=labels.repeat(times).numpy())
    return path


def section_throughput(args, device, tmp):
    x, y = load(args.splits / "train.npz", device)
    steps, warmup = (5, 2) if args.tiny else (200, 30)
    rows = []
    for batch, bf16, cl in [(128, True, False), (512, True, False), (1024, True, False), (4096, True, False), (1024, False, False), (1024, True, True)]:
        if args.tiny and batch > 512:
            continue
        sps = plain_throughput(x, y, device, batch, steps, warmup, bf16=bf16, channels_last=cl)
        rows.append({"path": "plain loop, data on device", "batch": batch, "precision": "bf16" if bf16 else "fp32/tf32",
                     "channels_last": cl, "samples_per_s": round(sps, 1)})
        print(rows[-1], flush=True)
    RESULT["throughput"] = rows
    lsteps, lwarm = (5, 2) if args.tiny else (100, 20)
    tiled = tiled_train(args.splits / "train.npz", 2 if args.tiny else -(-(lsteps + lwarm) * 1024 // len(y)) + 1, tmp)
    for batch in (128, 512, 1024):
        try:
            sps = lightning_throughput(tiled, device, batch, lsteps, lwarm, tmp)
            rows.append({"path": "ours (Lightning, our data module: the split on the device)",
                         "batch": batch, "precision": "bf16-mixed", "samples_per_s": round(sps, 1)})
        except Exception as err:  # record and go on
            rows.append({"path": "ours", "batch": batch, "error": repr(err)[-500:]})
        print(rows[-1], flush=True)
    try:  # Lightning reads the logged loss back every log_every_n_steps (50) steps: 0.02 a step
        RESULT["syncs"] = lightning_syncs(tiled, device, 512, lsteps, lwarm, tmp)
    except Exception as err:
        RESULT["syncs"] = {"error": repr(err)[-500:]}
    print(RESULT["syncs"], flush=True)
    plain = {r["batch"]: r["samples_per_s"] for r in rows if r["path"].startswith("plain") and r["precision"] == "bf16" and not r.get("channels_last")}
    for r in rows:
        if r["path"].startswith("ours") and "samples_per_s" in r and r["batch"] in plain:
            r["over_plain"] = round(r["samples_per_s"] / plain[r["batch"]], 3)


# ---- b. time to accuracy ------------------------------------------------------------------

def accuracy(model, xt, yt, device):
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        correct = sum(int((model(xt[i:i + 2000]).argmax(1) == yt[i:i + 2000]).sum()) for i in range(0, len(yt), 2000))
    model.train()
    return correct / len(yt)


def tta_run(x, y, xt, yt, device, optimizer, lr, schedule, batch, epochs, bf16=True, seed=0):
    from mnistflow.networks import ExamplesCNN

    sync(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = ExamplesCNN().to(device).train()
    if optimizer == "adadelta":
        opt = torch.optim.Adadelta(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(y)
    per_epoch = n // batch
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=per_epoch * epochs) if schedule == "onecycle"
             else torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7))
    curve = []
    for epoch in range(epochs):
        perm = torch.randperm(n, device=device)
        for s in range(per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if schedule == "onecycle":
                sched.step()
        if schedule != "onecycle":
            sched.step()
        acc = accuracy(model, xt, yt, device)
        sync(device)
        curve.append((epoch + 1, round(time.perf_counter() - t0, 3), round(acc, 4)))
    first = {t: next((c[1] for c in curve if c[2] >= t), None) for t in (0.98, 0.99)}
    return {"optimizer": optimizer, "lr": lr, "schedule": schedule, "batch": batch, "epochs": epochs,
            "precision": "bf16" if bf16 else "fp32/tf32", "curve": curve, "best_acc": max(c[2] for c in curve),
            "final_acc": curve[-1][2], "s_to_98": first[0.98], "s_to_99": first[0.99], "total_s": curve[-1][1]}


def section_tta(args, device, deadline):
    x, y = load(args.splits / "train.npz", device)
    xt, yt = load(args.splits / "test.npz", device)
    if args.tiny:
        x, y = x[:1024], y[:1024]
    grid = [("adadelta", 1.0, "step", 64, 5, False)]  # the tutorial's recipe (fp32; its main.py runs 14 epochs)
    for batch, lr, epochs in ((128, 0.003, (1, 2, 3)), (256, 0.006, (1, 2, 3)), (512, 0.01, (1, 2, 3, 5))):
        for n in epochs:
            grid.append(("adamw", lr, "onecycle", batch, n, True))
    for seed in (1, 2):
        grid.append(("adamw", 0.006, "onecycle", 256, 2, True, seed))
    if args.tiny:
        grid = [g[:4] + (2,) + g[5:] for g in grid[:4]]
    runs = RESULT.setdefault("time_to_accuracy", {"data": RESULT["data"] + ", on the device", "runs": []})["runs"]
    tta_run(x, y, xt, yt, device, "adamw", 0.003, "onecycle", 128, 1)  # warm-up (cuDNN autotune, allocator)
    for g in grid:
        if elapsed() > deadline:
            runs.append({"skipped": str(g), "reason": "time budget"})
            continue
        r = tta_run(x, y, xt, yt, device, *g[:6], seed=g[6] if len(g) > 6 else 0)
        if len(g) > 6:
            r["seed"] = g[6]
        runs.append(r)
        print({k: v for k, v in r.items() if k != "curve"}, flush=True)
    done = [r for r in runs if "best_acc" in r]
    RESULT["time_to_accuracy"]["best_acc"] = max(r["best_acc"] for r in done)
    for t in ("98", "99"):
        hit = [r for r in done if r[f"s_to_{t}"] is not None]
        RESULT["time_to_accuracy"][f"fastest_to_{t}"] = (
            min(hit, key=lambda r: r[f"s_to_{t}"]) if hit else None)
    tut = done[0] if done and done[0]["optimizer"] == "adadelta" else None
    for t in ("98", "99"):
        best = RESULT["time_to_accuracy"][f"fastest_to_{t}"]
        if tut and tut[f"s_to_{t}"] and best:
            RESULT["time_to_accuracy"][f"tta{t}_speedup_over_tutorial_recipe"] = round(tut[f"s_to_{t}"] / best[f"s_to_{t}"], 2)


# ---- c. the workflow's training entry point on the GPU ------------------------------------

SITECUSTOMIZE = '''
import os
if os.environ.get("MNISTFLOW_BENCH_PG_BACKEND"):
    from pytorch_lightning.strategies import ddp as _ddp
    _backend = os.environ["MNISTFLOW_BENCH_PG_BACKEND"]
    _ddp.DDPStrategy._get_process_group_backend = lambda self: _backend
'''


def train_entry(args, device, tmp, name, nodes, precision, backend=None, timeout=150, overrides=None):
    from mnistflow.config import RECIPE
    from mnistflow.train import folder_args
    from mnistflow.evaluate import load_model, predict
    from mnistflow.data import load_split

    accel = "gpu" if device.type == "cuda" else "cpu"
    run = {**RECIPE, "accelerator": accel, "nodes": nodes, "devices": 1, "precision": precision, "name": name, **(overrides or {})}
    out = Path(tmp) / name
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MNISTFLOW_LAUNCHED", None)
    if backend:
        site = Path(tmp) / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
        env["MNISTFLOW_BENCH_PG_BACKEND"] = backend
    cmd = [sys.executable, "-m", "mnistflow.train", "--run", name, "--params", json.dumps(run),
           "--train-data", str(args.splits / "train.npz"), *folder_args(out), "--val-size", "500",
           "--threads", str(min(4, os.cpu_count() or 1))] + (["--train-limit", "1000"] if args.tiny else [])
    rec = {"run": name, "nodes": nodes, "devices": 1, "accelerator": accel, "precision": precision, "overrides": overrides or {},
           "process_group_backend": backend or "not forced (train.py: nccl; gloo when ranks share a GPU)"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rec["rc"] = p.returncode
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        rec["rc"] = "timeout"
        tail = ((err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"))[-1500:]
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    if (out / "train.json").exists():
        tj = json.loads((out / "train.json").read_text())
        rec.update({k: tj.get(k) for k in ("world_size", "strategy", "accelerator", "hosts", "train_s",
                                          "samples_per_s", "epochs", "global_step", "process_s")})
        rec["fit_s"] = tj["attempts"][-1]["fit_s"]
        images, labels = load_split(args.splits / "test.npz")
        logits = predict(load_model(out / "model.ckpt"), images)
        rec["test_acc"] = round(float((logits.argmax(1) == labels).float().mean()), 4)
    else:
        rec["log_tail"] = tail
    return rec


def section_train(args, device, tmp, deadline):
    runs = RESULT.setdefault("train_entry_point", [])
    # The fastest to 99% in section b, as config/config.yaml quotes it (gpu_h200_entry99/).
    gpu_recipe = {"model": "cnn", "batch_size": 512, "lr": 0.01, "epochs": 3}
    plan = [("gpu1_fp32", 1, "32-true", None), ("gpu1_bf16", 1, "bf16-mixed", None),
            ("gpu1_bf16_b512_e3", 1, "bf16-mixed", gpu_recipe), ("ddp2_on_1gpu", 2, "32-true", None)]
    for name, nodes, precision, overrides in plan:
        if elapsed() > deadline:
            runs.append({"run": name, "skipped": "time budget"})
            continue
        backend = "gloo" if (args.force_fallback and nodes > 1) else None
        rec = train_entry(args, device, tmp, name, nodes, precision, backend=backend, timeout=args.train_timeout,
                          overrides=overrides)
        runs.append(rec)
        print(rec, flush=True)
        if nodes > 1 and rec.get("rc") != 0 and not backend and elapsed() < deadline:
            # Two processes on one GPU: NCCL refuses a GPU shared by two ranks. Try gloo
            # (patched in for this measurement only) so the launcher's own path is still measured.
            rec2 = train_entry(args, device, tmp, name + "_gloo", nodes, precision, backend="gloo", timeout=args.train_timeout)
            runs.append(rec2)
            print(rec2, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / ".gpudata")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true", help="force the CPU (a rehearsal)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a rehearsal)")
    p.add_argument("--budget", type=float, default=270, help="seconds; later sections are skipped past it")
    p.add_argument("--train-timeout", type=float, default=120)
    p.add_argument("--force-fallback", action="store_true", help="use the gloo path directly for DDP (rehearsal)")
    p.add_argument("--sections", default="a,b,c")
    args = p.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    source = args.data / "source.txt"
    RESULT["data"] = source.read_text().strip() if source.exists() else str(args.data)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    RESULT.update({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (rehearsal)",
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
    })
    try:
        import pytorch_lightning as pl
        RESULT["pytorch_lightning"] = pl.__version__
    except ImportError:
        pass
    try:
        RESULT["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as err:
        RESULT["nvidia_smi"] = repr(err)
    save(args.out)
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        # The splits go to the run's temporary folder, not into --data: `.gpudata/` is carried to
        # the device, and with them it would grow from 11 MB to 64 MB, the whole carry limit.
        from mnistflow.data import prepare

        args.splits = Path(tmp)
        prepare(args.data / "raw", args.splits / "train.npz", args.splits / "test.npz")
        # Train-entry runs come before time-to-accuracy when the budget is tight: they cost the most per answer.
        for key, fn in (("a", lambda: section_throughput(args, device, tmp)),
                        ("c", lambda: section_train(args, device, tmp, args.budget * 0.75)),
                        ("b", lambda: section_tta(args, device, args.budget))):
            if key not in sections:
                continue
            t = time.perf_counter()
            try:
                fn()
            except Exception:
                RESULT.setdefault("errors", []).append({"section": key, "traceback": traceback.format_exc()[-3000:]})
                print(traceback.format_exc(), flush=True)
            RESULT.setdefault("section_s", {})[key] = round(time.perf_counter() - t, 1)
            save(args.out)
    print(json.dumps({k: v for k, v in RESULT.items() if k not in ("time_to_accuracy",)}, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
