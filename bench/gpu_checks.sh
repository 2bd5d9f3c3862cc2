#!/usr/bin/env bash
# GPU checks on one CUDA machine, in order of importance, each under a time limit, logs in
# $OUT (default bench/out/gpu):
#   1. the tests marked gpu: chunked == full-bag gradients, e2e training, extraction (bf16 +
#      channels_last on CUDA against float32 on CPU);
#   2. configs/e2e-gpu-smoke.yaml end to end: synth -> tile -> e2e train -> predict -> heatmap,
#      then once more: every stage must find its outputs current (training resumes from the
#      CUDA checkpoint and stops at once);
#   3. bench/e2e_memory.py at full size (224 px, full-width encoder, bf16): GPU memory of one
#      training step against the bag size, ours vs the naive full-bag graph;
#   4. bench/extract.py on the GPU: full extraction vs the encoder alone.
#     bash bench/gpu_checks.sh                         # all four; PY=python3 by default
#     STEPS=gpu_tests,e2e_gpu_smoke bash bench/gpu_checks.sh   # some of them
set -u -o pipefail
OUT=${OUT:-bench/out/gpu}
PY=${PY:-python3}
STEPS=${STEPS:-gpu_tests,e2e_gpu_smoke,e2e_gpu_smoke_rerun,e2e_memory_cuda,extract_cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "cpus: $(nproc)"
} 2>&1 | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  grep -v $'\r' "$OUT/$name.txt" | tail -n 25
}
step gpu_tests 80 $PY -m pytest -q -m gpu -p no:cacheprovider tests/train/test_chunked.py \
  tests/train/test_e2e.py tests/features/test_extract.py
step e2e_gpu_smoke 260 $PY -m wsi_mil run --config configs/e2e-gpu-smoke.yaml
step e2e_gpu_smoke_rerun 90 $PY -m wsi_mil run --config configs/e2e-gpu-smoke.yaml
step e2e_memory_cuda 200 $PY bench/e2e_memory.py --device cuda --patch-px 224 --width 64 \
  --chunk-size 512 --sizes 1000,10000,100000 --naive-max 10000 --repeats 1
step extract_cuda 50 $PY bench/extract.py --device cuda --n 8192 --batch-size 256 --workers 8 --compression zstd
