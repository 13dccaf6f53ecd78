"""Resuming a run: which checkpoint to resume from, what each attempt leaves on record, and
when the resume state is retired.

A run resumes only from a checkpoint of the same unfinished training: checkpoints are
written atomically and stamped with the run's identity (run_identity: settings, data, code,
packages); one that cannot be loaded with weights_only=True, or was written for another
identity, is set aside rather than resumed. Once a run's outputs are written its resume
state is retired (retire_resume_state), so a later rerun of the job (a changed input, code
or environment record, --forcerun) trains from epoch 0 instead of "resuming" the finished
run. Lightning's CSV logger deletes an existing log on resume, so the earlier attempts'
logs are kept and merged; each attempt is on record in attempts.jsonl.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger("mnistflow.train")

# The keys under which every checkpoint records what it was trained on (run_identity), the
# attempt that wrote it, where in training it was written, and the random state training
# continues from.
CHECKPOINT_KEY = "mnistflow_run"
ATTEMPT_KEY = "mnistflow_attempt"
POSITION_KEY = "mnistflow_position"
RNG_KEY = "mnistflow_rng"
TRAINING_ENTRY = "mnistflow.train"
# Where a finished run's logs go: the next training of the run starts with none.
FINISHED_LOGS = "logs.finished"


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


def run_identity(run: dict, train_data, val_size: int, train_limit: int) -> dict:
    """What a checkpoint must have been trained on for this run to resume from it: everything
    that changes what training computes. The settings include the geometry (nodes, devices),
    which sets each process's share of the batch. Computed without importing torch."""
    from .codedigest import code_digest
    from .data import md5sum
    from .envinfo import versions_imported_by

    return {"settings": run, "val_size": val_size, "train_limit": train_limit,
            "train_data_md5": md5sum(train_data), "code_digest": code_digest(TRAINING_ENTRY),
            "packages": versions_imported_by(TRAINING_ENTRY)}


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def slurm_array_task() -> str | None:
    """`<array job>_<task>` as squeue and sacct show a job array's task; None outside an array.
    (SLURM_JOB_ID is the task's own id, which sacct -j also takes.)"""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else None


class Attempt:
    """One attempt at a run, on record in <out>/logs/attempts.jsonl from its start to its end.

    The line is written when the attempt starts, before torch is imported, and completed
    when it ends, so an attempt that is killed (SIGKILL, the OOM killer, the time limit)
    stays on record as started and never ended. The file outlives retries and requeues,
    unlike the rule's log, which Snakemake deletes before each attempt. Only the first
    process writes it.
    """

    def __init__(self, log_dir: Path, identity: dict):
        self.path = Path(log_dir) / "attempts.jsonl"
        self.entry = {
            "attempt": None,
            "id": uuid.uuid4().hex[:12],
            "started": _now(),
            "ended": None,
            "outcome": None,
            "identity": identity_digest(identity),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task": slurm_array_task(),
            "host": host_name(),
            "resumed_from": None,
        }

    @property
    def number(self) -> int | None:
        return self.entry["attempt"]

    def begin(self, **fields) -> None:
        """Put this attempt on record (again, after its logs were set aside), numbered after the others."""
        self.entry.update(fields, attempt=len(self._others()) + 1)
        self._save()

    def update(self, **fields) -> None:
        self.entry.update(fields)
        self._save()

    def end(self, outcome: str, **figures) -> None:
        self.update(ended=_now(), outcome=outcome, **figures)

    def all(self) -> list[dict]:
        return read_attempts(self.path)

    def _others(self) -> list[dict]:
        return [e for e in read_attempts(self.path) if e.get("id") != self.entry["id"]]

    def _save(self) -> None:
        from .atomic import write_text

        entries = sorted([*self._others(), self.entry], key=lambda e: e.get("attempt") or 0)
        write_text(self.path, "".join(json.dumps(e) + "\n" for e in entries))


def host_name() -> str:
    """SLURMD_NODENAME where set: the fake nodes of a test cluster share one hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def read_attempts(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def running_metrics(module) -> list:
    from torchmetrics import Metric

    return [m for m in module.modules() if isinstance(m, Metric)]


@contextlib.contextmanager
def synced_running_metrics(trainer, module):
    """While a mid-epoch checkpoint is saved under DDP: each running metric holds the sums of
    every rank (one collective each, on every rank), as rank 0 writes them; then its own again."""
    with contextlib.ExitStack() as stack:
        if trainer.world_size > 1:
            for metric in running_metrics(module):
                stack.enter_context(metric.sync_context(should_unsync=True))
        yield


def usable_checkpoint(last: Path, identity: dict, log_dir: Path) -> Path | None:
    """`last` if this run can resume from it, else None: training starts at epoch 0.

    A checkpoint that cannot be loaded with weights_only=True (truncated, not a checkpoint,
    or one that would run pickled code) is "corrupt"; one written for another identity (a
    change of lr, code, data or packages while the run was unfinished) is "foreign". Either
    is set aside, with the logs of its attempts, as `<name>.<corrupt|foreign>-<time>`, with a
    warning that names the difference. Logs left without a checkpoint by attempts of another
    identity (killed before their first epoch ended) are set aside as foreign too.
    """
    if not last.exists():
        others = {e.get("identity") for e in read_attempts(log_dir / "attempts.jsonl")} - {identity_digest(identity)}
        if others and is_first_process():
            _set_aside([log_dir], "foreign")
            log.warning("%s holds attempts of another identity (%s) and no checkpoint; set aside, training "
                        "starts from epoch 0", log_dir, ", ".join(sorted(map(str, others))))
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
            reason, why = "foreign", f"was written for other settings, data, code or packages ({_differences(checkpoint.get(CHECKPOINT_KEY), identity)})"
        else:
            return last
    if not is_first_process():
        log.warning("%s %s; training starts from epoch 0 (the first process sets it aside)", last, why)
        return None
    stamp = _set_aside([last, log_dir], reason)
    log.warning("%s %s; set aside as %s.%s-%s (with its logs), training starts from epoch 0",
                last, why, last.name, reason, stamp)
    return None


def _set_aside(paths, reason: str) -> str:
    """Rename each existing path to `<name>.<reason>-<time>`, never over an earlier one; return the stamp."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    while any(p.with_name(f"{p.name}.{reason}-{stamp}").exists() for p in paths):
        stamp += "x"
    for path in paths:
        if path.exists():
            os.replace(path, path.with_name(f"{path.name}.{reason}-{stamp}"))
    return stamp


def retire_resume_state(out: Path) -> None:
    """After a run's outputs are written: remove its last.ckpt (model.ckpt holds the same
    weights) and move its logs to logs.finished/, replacing an earlier run's. A later
    training of the run, whatever reran it, then starts from epoch 0 with fresh logs."""
    out = Path(out)
    (out / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
    finished = out / FINISHED_LOGS
    if (out / "logs").exists():
        shutil.rmtree(finished, ignore_errors=True)
        os.replace(out / "logs", finished)


def _differences(recorded, identity: dict) -> str:
    if not isinstance(recorded, dict):
        return "it records no run settings"

    def flat(d):
        out = {}
        for key, value in d.items():
            out.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
        return out

    old, new = flat(recorded), flat(identity)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def is_first_process(env=os.environ) -> bool:
    """Global rank 0, known before the Trainer has set up its processes."""
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return env["SLURM_PROCID"] == "0"
    return env.get("NODE_RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


def first_step_after(checkpoint: Path | None) -> int | None:
    """The first global step a run resumed from `checkpoint` trains (None: not resumed).

    The TensorBoard writer of a resumed attempt purges from it (purge_step): an earlier
    attempt logged those steps after the checkpoint was written, and this one trains and logs
    them again. (Its own reader's rule, which drops events once a lower step follows, misses
    the step logged at both ends: an epoch's validation, when the attempt died between
    logging it and checkpointing the epoch.) merge_logs does the same for the CSV log.
    """
    if checkpoint is None:
        return None
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


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
