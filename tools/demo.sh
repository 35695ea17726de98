#!/usr/bin/env bash
# The embedded demo (`make demo`): generate the toy shapes dataset if missing,
# train the toy AIK ResNet-18 Faster R-CNN on it on CPU with tools/train.py,
# test the final checkpoint with tools/test.py and print the COCO bbox mAP
# from MMDetection's CocoMetric. Logs and checkpoints go to WORK_DIR.
#   bash tools/demo.sh [WORK_DIR]        (default work_dirs/demo)
# PYTHON (default .venv/bin/python) and CONFIG can be overridden.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/demo/faster-rcnn_r18-aik_fpn_toy-coco.py}
WORK_DIR=${1:-work_dirs/demo}
DATA=data/toy_coco
START=$SECONDS
# One intra-op thread: on a 2-core machine that runs anything else, two
# OpenMP threads spin against it and train 10x slower; alone, one thread is
# only about 25% slower than two.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PYTHON" tools/misc/make_toy_coco.py "$DATA"
echo "[demo] training $CONFIG on CPU, logs in $WORK_DIR"
"$PYTHON" tools/train.py "$CONFIG" --work-dir "$WORK_DIR"
CHECKPOINT="$(cat "$WORK_DIR/last_checkpoint")"
echo "[demo] testing $CHECKPOINT"
"$PYTHON" tools/test.py "$CONFIG" "$CHECKPOINT" --work-dir "$WORK_DIR"

# tools/test.py saves the metrics in the newest WORK_DIR/<timestamp>/.
"$PYTHON" - "$WORK_DIR" "$((SECONDS - START))" <<'PY'
import glob
import json
import os
import sys

work_dir, seconds = sys.argv[1], int(sys.argv[2])
runs = sorted(glob.glob(os.path.join(work_dir, '*', '*.json')),
              key=os.path.getmtime)
metrics = json.load(open(runs[-1]))
print(f'[demo] COCO bbox mAP on the toy val split: '
      f'{metrics["coco/bbox_mAP"]:.3f} '
      f'(mAP@0.5 {metrics["coco/bbox_mAP_50"]:.3f}, '
      f'mAP@0.75 {metrics["coco/bbox_mAP_75"]:.3f}); '
      f'{seconds // 60} min {seconds % 60} s in all; logs in {work_dir}')
PY
