"""Resuming a run: which checkpoint to resume from, and what each attempt leaves behind.

Checkpoints are written atomically and stamped with what they were trained on; one that
cannot be loaded with weights_only=True, or was trained for other settings or data, is set
aside rather than resumed. Lightning's CSV logger deletes an existing log on resume, so the
earlier attempts' logs are kept and merged; each attempt is recorded in attempts.jsonl.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("mnistflow.train")


def atomic_checkpoint_io():
    """Lightning's checkpoint writer, made atomic: a crash or a full disk mid-write leaves
    the previous checkpoint in place, never a truncated one under its name."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    from .atomic import atomic_path

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)

    return AtomicCheckpointIO()


def record_attempt(log_dir: Path, started, resumed_from, outcome: str) -> list[dict]:
    """Append this attempt to <out>/logs/attempts.jsonl (kept across retries, unlike the rule's
    log, which Snakemake deletes before each attempt); return every attempt so far."""
    entry = {
        "started": started.isoformat(timespec="seconds"),
        "ended": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "outcome": outcome,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
    }
    path = log_dir / "attempts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The key under which every checkpoint records what it was trained on (run_identity).
CHECKPOINT_KEY = "mnistflow_run"


def run_identity(run: dict, args) -> dict:
    """What a checkpoint must have been trained on for this run to resume from it."""
    from .data import md5sum

    return {"settings": run, "val_size": args.val_size, "train_limit": args.train_limit,
            "train_data_md5": md5sum(args.train_data)}


def stamp_checkpoints(identity: dict):
    import pytorch_lightning as pl

    class StampCheckpoints(pl.Callback):
        """Records the run's identity in every checkpoint, for usable_checkpoint to compare."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint[CHECKPOINT_KEY] = identity

    return StampCheckpoints()


def usable_checkpoint(last: Path, identity: dict, log_dir: Path) -> Path | None:
    """`last` if this run can resume from it, else None: training starts at epoch 0.

    A checkpoint that cannot be loaded with weights_only=True (truncated, not a checkpoint,
    or one that would run pickled code) is "corrupt"; one written for other settings or
    data (e.g. before a change of lr or epochs) is "foreign". Either is set aside, with the
    logs of its attempts, as `<name>.<corrupt|foreign>-<time>`, with a warning.
    """
    if not last.exists():
        return None
    import torch

    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None  # set aside meanwhile by the first process
    except Exception as err:  # noqa: BLE001 - whatever fails to load is not resumed from
        # torch's reason, without its boilerplate (which suggests loading with weights_only=False)
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        first = (lines or [""])[0][:200]
        reason, why = "corrupt", f"cannot be loaded with weights_only=True ({type(err).__name__}: {first})"
    else:
        if not isinstance(checkpoint, dict) or not {"state_dict", "epoch", "global_step"} <= set(checkpoint):
            reason, why = "corrupt", "is not a Lightning checkpoint"
        elif checkpoint.get(CHECKPOINT_KEY) != identity:
            reason, why = "foreign", f"was written for other settings or data ({_differences(checkpoint.get(CHECKPOINT_KEY), identity)})"
        else:
            return last
    if not is_first_process():
        log.warning("%s %s; training starts from epoch 0 (the first process sets it aside)", last, why)
        return None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    while any(p.with_name(f"{p.name}.{reason}-{stamp}").exists() for p in (last, log_dir)):
        stamp += "x"  # never replace an earlier set-aside
    for path in (last, log_dir):
        if path.exists():
            os.replace(path, path.with_name(f"{path.name}.{reason}-{stamp}"))
    log.warning("%s %s; set aside as %s.%s-%s (with its logs), training starts from epoch 0",
                last, why, last.name, reason, stamp)
    return None


def _differences(recorded, identity: dict) -> str:
    if not isinstance(recorded, dict):
        return "it records no run settings"

    def flat(d):
        return {**{k: v for k, v in d.items() if k != "settings"},
                **{f"settings.{k}": v for k, v in (d.get("settings") or {}).items()}}

    old, new = flat(recorded), flat(identity)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def is_first_process(env=os.environ) -> bool:
    """Global rank 0, known before the Trainer has set up its processes."""
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return env["SLURM_PROCID"] == "0"
    return env.get("NODE_RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


def keep_earlier_log(log_dir: Path) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv; keep it as metrics.<n>.csv."""
    current = log_dir / "metrics.csv"
    if current.exists():
        n = len(list(log_dir.glob("metrics.*.csv")))
        os.replace(current, log_dir / f"metrics.{n}.csv")


def log_order(path: Path) -> int:
    # metrics.0.csv, metrics.1.csv, ... (earlier attempts), then metrics.csv (this one)
    middle = path.name[len("metrics."):-len(".csv")]
    return int(middle) if middle.isdigit() else 1 << 30


def merge_logs(paths) -> str:
    """One CSV log across resumed attempts. Rows an attempt logged after its last checkpoint
    were trained again by the next attempt: keep only the later attempt's rows for those steps."""
    import csv
    import io

    parts = []
    for path in paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            parts.append((reader.fieldnames or [], list(reader)))
    fields: list[str] = []
    rows: list[dict] = []
    for i, (names, part) in enumerate(parts):
        fields += [n for n in names if n not in fields]
        later = [r for _, p in parts[i + 1 :] for r in p]
        cutoff = min((int(r["step"]) for r in later if r.get("step")), default=None)
        rows += [r for r in part if cutoff is None or int(r.get("step") or 0) < cutoff]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
