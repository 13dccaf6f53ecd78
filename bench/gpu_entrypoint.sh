#!/usr/bin/env bash
# On a lent GPU machine: the workflow's own entry points on a real CUDA device.
#   python -m mnistflow.train: 1 process on 1 GPU, and DDP as 2 local node processes
#   (which share the one GPU: gloo), then python -m mnistflow.evaluate on the GPU.
# Data: .gpudata/raw/*.gz (bench/gpu_data.py), carried with the run and prepared here as the
# prepare rule does. Results: $OUT.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
[ -f .gpudata/test.npz ] || python3 -c "from mnistflow.data import prepare; prepare('.gpudata/raw', '.gpudata')" || exit 1
OUT=${OUT:-/tmp/gpu-entrypoint}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt"
base='{"name":"g","model":"cnn","optimizer":"adamw","lr":0.003,"weight_decay":0.0001,"schedule":"onecycle","batch_size":512,"epochs":2,"seed":42,"precision":"bf16-mixed","accelerator":"gpu"'
for geom in "1 1" "2 1"; do
  set -- $geom; name="gpu_n$1_d$2"
  python3 -m mnistflow.train --run "$name" --params "$base,\"nodes\":$1,\"devices\":$2}" \
    --train-data .gpudata/train.npz --out "/tmp/$name" --val-size 500 --threads 4 > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/summary.txt"
  cp "/tmp/$name/train.json" "$OUT/$name.train.json" 2>/dev/null
  python3 -m mnistflow.evaluate --model "/tmp/$name/model.ckpt" --test-data .gpudata/test.npz \
    --train-log "/tmp/$name/metrics.csv" --out "/tmp/$name/eval" >> "$OUT/$name.log" 2>&1
  echo "$name evaluate exit $?" | tee -a "$OUT/summary.txt"
  cp "/tmp/$name/eval/metrics.json" "$OUT/$name.metrics.json" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.train.json")):
    r = json.loads(f.read_text()); m = json.loads((out / f.name.replace(".train.json", ".metrics.json")).read_text())
    print(f.name, r["accelerator"], r["strategy"], "world", r["world_size"], r["hosts"], "samples/s", r["samples_per_s"], "test acc", round(m["accuracy"], 4))
PY
