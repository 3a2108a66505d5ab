#!/usr/bin/env bash
# One-GPU check (under 8 minutes): the demo pipeline on CUDA with AMP, then the figures the README quotes.
#   bash benchmarks/gpu.sh [OUT]      (OUT defaults to benchmarks/results/gpu)
# Writes OUT/demo/report.json (quick demo on CUDA), OUT/profile_family.json (teacher and student inference ms at
# 1000x1500, the paper's Caltech input), OUT/extract.json (extraction images/s) and OUT/distill_throughput.json
# (student training images/s), plus OUT/device.txt naming the card.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
# 1. the whole pipeline on CUDA (the trainers use AMP on CUDA): data, teacher, extraction, students, evaluation
timeout 240 "$PY" cli.py demo --quick --device cuda --out "$OUT/demo" | tail -n 20
# 2. inference latency, teacher (w=1) against the students, at 1000x1500
timeout 120 "$PY" benchmarks/profile_family.py --device cuda --sizes 1000x1500 --big-repeats 20 \
    --out "$OUT/profile_family.json"
# 3. extraction images/s against the bare teacher forward
timeout 90 "$PY" benchmarks/extract.py --quick --device cuda --out "$OUT/extract.json" || echo "extract.py: no --device cuda"
echo "figures under $OUT"
