#!/usr/bin/env bash
# One-GPU check (under 8 minutes): the demo pipeline on CUDA with AMP, then the figures docs/benchmarks.md quotes.
#   bash benchmarks/gpu.sh [OUT [WORK]]   (OUT defaults to benchmarks/results/gpu, WORK to OUT/work)
# Writes to OUT only small files: device.txt (the card), demo_report.json (quick demo on CUDA: data, teacher,
# extraction, students, evaluation), profile_fp32.json and profile_amp.json (teacher and students, inference ms at
# 1000x1500, the paper's Caltech input), batch_fp32.json and batch_amp.json (ms per image at batch 1, 8 and 32) and
# throughput.json (extraction and student training images/s). The run
# folders go to WORK. Every step runs even when one before it fails; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
WORK=${2:-$OUT/work}
mkdir -p "$OUT" "$WORK"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME TIMEOUT_S CMD...: run, time and record it; a failure is noted, not fatal
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit} s)"
    local t0=$SECONDS
    if timeout "$limit" "$@"; then echo "=== $name: ok in $((SECONDS - t0)) s"
    else echo "=== $name: FAILED (rc $?) after $((SECONDS - t0)) s"; failed+=("$name"); fi
}
DEV=${GPU_DEVICE:-cuda}  # GPU_DEVICE=cpu runs the same steps on the CPU (a dry run of this script; no AMP step)
step device 60 "$PY" -c '
import sys, torch
dev = torch.device(sys.argv[2])
assert dev.type != "cuda" or torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
line = f"{name} | torch {torch.__version__} | CUDA {torch.version.cuda}"
print(line)
open(sys.argv[1], "w").write(line + "\n")' "$OUT/device.txt" "$DEV"
# 1. the whole pipeline on CUDA (the trainers and the extractor use AMP there)
step demo 200 "$PY" cli.py demo --quick --device "$DEV" --out "$WORK/demo"
[ -f "$WORK/demo/report.json" ] && cp "$WORK/demo/report.json" "$OUT/demo_report.json"
# 2. inference latency of the teacher (w = 1) against the students at 1000x1500, fp32 and fp16 autocast
step profile-fp32 120 "$PY" benchmarks/profile_family.py --device "$DEV" --sizes "${GPU_PROFILE_SIZE:-1000x1500}" \
    --big-repeats 30 --out "$OUT/profile_fp32.json"
[ "$DEV" = cpu ] || step profile-amp 120 "$PY" benchmarks/profile_family.py --device cuda --amp --sizes 1000x1500 --big-repeats 30 \
    --out "$OUT/profile_amp.json"
# 3. per-image cost against batch size (1, 8, 32) at 1000x1500, fp32 and fp16 autocast: where the FLOPs show
step batch-fp32 90 "$PY" benchmarks/batch_latency.py --device "$DEV" --size "${GPU_PROFILE_SIZE:-1000x1500}" \
    --batches "${GPU_BATCHES:-1,8,32}" --out "$OUT/batch_fp32.json"
[ "$DEV" = cpu ] || step batch-amp 90 "$PY" benchmarks/batch_latency.py --device cuda --amp --batches 1,8,32 \
    --out "$OUT/batch_amp.json"
# 4. extraction and student training images/s through the real pipeline code
step throughput 180 "$PY" benchmarks/gpu_throughput.py --device "$DEV" --size "${GPU_SIZE:-512}" \
    --images "${GPU_IMAGES:-96}" --iters "${GPU_ITERS:-40}" \
    --work "$WORK/throughput" --out "$OUT/throughput.json"
if [ ${#failed[@]} -gt 0 ]; then echo "failed steps: ${failed[*]}"; exit 1; fi
echo "all steps passed; figures under $OUT"
