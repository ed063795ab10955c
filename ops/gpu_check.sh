#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with one:
#   bash ops/gpu_check.sh
# builds the op (C++ and CUDA, strict), runs every GPU-marked test (op, mixed precision, SyncBN,
# GPU inference, GPU training) and the host emulation of the CUDA kernels, runs compute-sanitizer
# memcheck on small cases of every CUDA dtype, profiles the kernels with torch.profiler, runs the
# op benchmark, and a short GPU training through pipeline.run (resnet18, synthetic data, bf16,
# 1 worker, 100 iterations) with the compiled op and with the reference: images/s, peak GPU
# memory, MFU. Everything lands in benchmarks/results/<date>_<gpu>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export CCNET_OPS_STRICT=1 PYTHONUNBUFFERED=1

gpu=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())")
out="benchmarks/results/$(date +%Y-%m-%d)_$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-')"
mkdir -p "$out"
echo "GPU: $gpu -> $out"

{ date -u; nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; } \
  2>&1 | tee "$out/device.txt"
$PY -m ops.build --cuda 2>&1 | tee "$out/build.txt"
{ $PY -m pytest -q -rs -m gpu tests/; $PY -m pytest -q tests/test_cuda_emulation.py; } 2>&1 | tee "$out/tests.txt"

small="$PY -m ops.bench --device cuda --shape small --dtype float32 --dtype float16 --dtype bfloat16 --repeat 1 --warmup 0"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 $small 2>&1 | tail -n 20 | tee "$out/memcheck.txt"
else
  echo "compute-sanitizer not found: memcheck not run" | tee "$out/memcheck.txt"
fi

$PY - <<'PY' 2>&1 | tee "$out/profile.txt"
import torch
import ops
from torch.profiler import ProfilerActivity, profile

for dtype in (torch.float32, torch.bfloat16):
    q, k = (0.3 * torch.randn(2, 64, 97, 97, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(2, 512, 97, 97, device="cuda", dtype=dtype, requires_grad=True)
    for _ in range(3):
        ops.criss_cross_attention(q, k, v).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ops.criss_cross_attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
    print(f"== {dtype}, (2, 64/512, 97, 97), forward + backward")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
PY

$PY -m ops.bench --device cuda --out "$out/bench.md"
$PY -m ops.bench --device cpu --out "$out/bench_cpu.md"

# A short GPU training, compiled op against the reference (pipeline.bench: a temporary run
# directory and MLflow database, nothing written to the user's).
$PY -m pipeline.bench --compare-reference --out "$out/training.md" \
  model.backbone=resnet18 scaling.use_gpu=true scaling.num_workers=1 scaling.cpus_per_worker=4 \
  train.amp=bf16 train.iterations=100 train.log_every=20 train.val_every=100 train.batch_size=8 \
  train.crop=256 data.synthetic_size=256 data.synthetic_train=128 data.synthetic_val=8 2>&1 | tee "$out/training.txt"
echo "results in $out"
