#!/usr/bin/env bash
# The GPU check of issue 14, for one lent GPU machine and at most 8 minutes: installs the carried wheels (that machine
# reaches no package index), runs every CUDA path of nnscreener once on real code (cuda_paths.py: bf16 autocast,
# torch.compile through nnUNet_compile, pinned-memory loading, predict, a 1-process NCCL group), then the GPU speed
# table of bench_speed.py at the default preset, and writes benchmarks/results/speed_gpu.json (with the device name and
# the path checks under "cuda_paths"); the JSON files and logs are also copied into $OUT when it is set.
#
#   python benchmarks/speed/download_wheels.py      # here, once: benchmarks/speed/wheels (~40 MiB, gitignored)
#   bash benchmarks/speed/gpu_check.sh              # on the lent machine; the device call carries benchmarks/speed/wheels
#   # dry run here, same scripts with small settings, in a Python without nnU-Net and wheels made for it:
#   WHEELS=/tmp/w311 PYTHON=/path/to/venv/bin/python bash benchmarks/speed/gpu_check.sh --device cpu
set -uo pipefail
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; fi
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/nnscreener_gpu_check}
WHEELS=${WHEELS:-benchmarks/speed/wheels}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$WORK"
cd "$REPO" || exit 1
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
export PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export nnUNet_extTrainer="$REPO/nnscreener/trainers"  # what nnscreener's .pth file sets in an installed environment

if [ "$DEVICE" = cuda ]; then
    RESULT=benchmarks/results/speed_gpu.json
    SPEED=(--preset default --steps 10 --network_time)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
else  # the dry run must not overwrite the GPU results
    RESULT=$WORK/speed_gpu_dryrun.json
    SPEED=(--preset tiny --steps 1 --max_batch 2 --step_size 1 --ct_shape 60 128 128)
fi
PATHS_JSON=$WORK/cuda_paths.json

# 1. the packages the machine lacks, from the carried wheels, without their dependencies (download_wheels.py says why)
if ! "$PY" -c "import nnunetv2, SimpleITK, acvl_utils" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 1
fi
"$PY" -c "import nnscreener.inference.predict, nnscreener.run.pretrain, nnunetv2.inference.predict_from_raw_data" || exit 1
echo "packages ready after $(( $(date +%s) - start )) s"

# 2. every CUDA path on a tiny phantom world, compile last; each check is a row of cuda_paths.json, written as it ends
timeout $(( $(left) < 200 ? $(left) : 200 )) "$PY" benchmarks/speed/cuda_paths.py --device "$DEVICE" \
    --work "$WORK/paths" --out "$PATHS_JSON" 2>&1 | tee "$WORK/cuda_paths.log"

# 3. the speed table at the default preset, eager (compile was checked above; its minutes would not fit the budget);
#    it rewrites its JSON after each part, so a run cut short by the timeout keeps what it measured
limit=$(( $(left) - 15 )); if [ "$limit" -lt 60 ]; then limit=60; fi
nnUNet_compile=false timeout "$limit" "$PY" benchmarks/speed/bench_speed.py --device "$DEVICE" \
    --realct none "${SPEED[@]}" --work "$WORK/speed" --out "$RESULT" 2>&1 | tee "$WORK/bench_speed.log"

"$PY" - "$RESULT" "$PATHS_JSON" <<'EOF'
import json, os, sys
result, paths = sys.argv[1:]
speed = json.load(open(result)) if os.path.isfile(result) else {'error': 'bench_speed.py wrote nothing'}
speed['cuda_paths'] = json.load(open(paths)) if os.path.isfile(paths) else {'error': 'cuda_paths.py wrote nothing'}
json.dump(speed, open(result, 'w'), indent=2)
for name, row in speed['cuda_paths'].items():
    if isinstance(row, dict):
        print(f"cuda path {name}: {row.get('ok')}")
EOF
echo "gpu_check: $(( $(date +%s) - start )) s, results in $RESULT"
if [ -n "${OUT:-}" ]; then cp "$RESULT" "$WORK"/*.log "$OUT"/; fi
