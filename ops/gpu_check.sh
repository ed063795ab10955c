#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with one:
#   bash ops/gpu_check.sh
# builds the op (C++ and CUDA, strict), runs every GPU-marked test (the op and its fused mode, mixed
# precision, SyncBN, GPU inference, GPU training), runs the op benchmark, runs compute-sanitizer
# (memcheck, racecheck, synccheck) on small cases of every CUDA dtype, profiles the kernels (map
# and fused) with torch.profiler and the fused ones with Nsight Compute, and measures training on
# the GPU with the compiled op and with the reference: the training step alone
# (pipeline.step_bench: resnet18 at 512 and resnet101 at 769, bf16; images/s, peak GPU memory,
# MFU) and, where Ray and MLflow are installed, a short run through pipeline.run (pipeline.bench).
# Last, the host emulation of the CUDA kernels on this machine's compiler. Each part is stamped
# with the seconds so far and bounded by a timeout, so a hung kernel fails its part and the rest
# still runs. Everything lands in benchmarks/results/<date>_<gpu>/.
# On a machine with PyTorch but without Ray and MLflow, the GPU tests that need them are listed
# as not run, with the reason, and everything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export CCNET_OPS_STRICT=1 PYTHONUNBUFFERED=1

stage() { echo "== [$(date -u +%H:%M:%S), ${SECONDS}s] $*"; }  # each part, with the seconds so far
gpu=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())")
out="benchmarks/results/$(date -u +%Y-%m-%dT%H%MZ)_$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-')"
mkdir -p "$out"
echo "GPU: $gpu -> $out"

{ date -u; nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; c++ --version | head -1; } \
  2>&1 | tee "$out/device.txt"
failed=""  # a failing part is recorded and the rest still runs; the script fails at the end
if $PY -c "import ray, mlflow" 2>/dev/null; then pipeline=1; else pipeline=0; fi
# The packages the GPU parts import besides Ray and MLflow (the model, its config, the op's build
# and its lock). A missing one is named here and fails the script, but the parts that do not need
# it run.
missing=$($PY -c "
import importlib.util
need = {'omegaconf': 'omegaconf', 'yaml': 'pyyaml', 'numpy': 'numpy', 'filelock': 'filelock', 'ninja': 'ninja'}
print(' '.join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))")
if [ -n "$missing" ]; then
  echo "MISSING Python packages: $missing (pip install -e . installs them; the tests and benchmarks that import them fail below)"
  failed="$failed missing-packages($missing)"
fi
stage "build"
# nothing below runs without the op: a failed or timed-out build ends the script here
timeout -k 30 600 $PY -m ops.build --cuda 2>&1 | tee "$out/build.txt" || { echo "FAILED: build$failed"; exit 1; }
stage "GPU tests"
(
  rc=0
  if [ $pipeline = 1 ]; then
    timeout -k 30 300 $PY -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m gpu tests/ || rc=1
  else
    echo "NOT RUN (Ray and MLflow are not installed here), the GPU tests that run the pipeline:"
    $PY -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/test_gpu_path.py -k through_the_pipeline
    timeout -k 30 300 $PY -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m gpu tests/test_ops.py tests/test_fused.py \
      tests/test_mixed_precision.py tests/test_gpu_path.py -k "not through_the_pipeline" || rc=1
  fi
  exit $rc
) 2>&1 | tee "$out/tests.txt" || failed="$failed tests"

stage "ops.bench"
timeout -k 30 240 $PY -m ops.bench --device cuda --dtype float32 --dtype bfloat16 --dtype float16 --out "$out/bench.md" || failed="$failed bench"
small="$PY -m ops.bench --device cuda --shape small --dtype float32 --dtype float16 --dtype bfloat16 --repeat 1 --warmup 0"
stage "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  timeout -k 30 300 compute-sanitizer --tool memcheck --error-exitcode 1 $small > "$out/memcheck.txt" 2>&1 || failed="$failed memcheck"
  tail -n 20 "$out/memcheck.txt"
  # the tiled layout kernels share memory between a block's threads: hazards and barrier misuse, in
  # our kernels only (kernel names holding ccnet_ops; cuBLAS's and PyTorch's run uninstrumented)
  for tool in racecheck synccheck; do
    timeout -k 30 300 compute-sanitizer --tool $tool --kernel-name kns=ccnet_ops --error-exitcode 1 $small > "$out/$tool.txt" 2>&1 \
      || failed="$failed $tool"
    tail -n 5 "$out/$tool.txt"
  done
else
  echo "compute-sanitizer not found: memcheck, racecheck and synccheck not run" | tee "$out/memcheck.txt"
fi

stage "profile"
timeout -k 30 180 $PY - <<'PY' 2>&1 | tee "$out/profile.txt" || failed="$failed profile"
import torch
import ops
from torch.profiler import ProfilerActivity, profile

for dtype in (torch.float32, torch.bfloat16):
    for fused in (False, True):
        q, k = (0.3 * torch.randn(2, 64, 97, 97, device="cuda", dtype=dtype) for _ in range(2))
        v = torch.randn(2, 512, 97, 97, device="cuda", dtype=dtype, requires_grad=True)
        for _ in range(3):
            ops.criss_cross_attention(q, k, v, fused=fused).sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ops.criss_cross_attention(q, k, v, fused=fused).sum().backward()
            torch.cuda.synchronize()
        print(f"== {dtype}, (2, 64/512, 97, 97), fused={fused}, forward + backward")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
PY

stage "ncu"
# Nsight Compute on the fused mode's kernels (the line passes and D), one forward + backward at the
# paper's shape (N = 1) in bf16 then float32: throughput against the peaks, occupancy, and what
# the roofline model leaves out (the shared-memory table: wavefronts and bank conflicts; the
# pipes' use, the XU of the exponentials included).
if command -v ncu >/dev/null; then
  timeout -k 30 300 ncu --clock-control none --kernel-name regex:"line_pass|delta" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis_Tables \
    --section ComputeWorkloadAnalysis \
    --csv --page details $PY - > "$out/ncu_fused.csv" 2> "$out/ncu_fused.txt" <<'PY' || failed="$failed ncu"
import torch
import ops

for dtype in (torch.bfloat16, torch.float32):
    q, k = (0.3 * torch.randn(1, 64, 97, 97, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(1, 512, 97, 97, device="cuda", dtype=dtype, requires_grad=True)
    ops.criss_cross_attention(q, k, v, fused=True).sum().backward()
    torch.cuda.synchronize()
PY
  tail -n 3 "$out/ncu_fused.txt"
else
  echo "ncu not found: the fused kernels' counters not taken" | tee "$out/ncu_fused.txt"
fi

stage "ops.bench, a whole Cityscapes image"
# the head on a whole 1024 x 2048 Cityscapes image: the fused mode's memory and its HBM floor
timeout -k 30 180 $PY -m ops.bench --device cuda --shape "cityscapes full" --dtype float32 --dtype bfloat16 --repeat 10 \
  --out "$out/bench_full_res.md" || failed="$failed bench_full_res"

# The training step alone, compiled op against the reference (no Ray, no MLflow).
stage "step_bench"
timeout -k 30 180 $PY -m pipeline.step_bench --device cuda --out "$out/step_resnet18.md" --steps 10 --rounds 3 \
  model.backbone=resnet18 train.amp=bf16 train.batch_size=8 train.crop=512 2>&1 | tee "$out/step_resnet18.txt" || failed="$failed step_resnet18"
timeout -k 30 180 $PY -m pipeline.step_bench --device cuda --out "$out/step_resnet101.md" --steps 5 --rounds 3 \
  model.backbone=resnet101 train.amp=bf16 train.batch_size=2 train.crop=769 2>&1 | tee "$out/step_resnet101.txt" || failed="$failed step_resnet101"

# A short GPU training, compiled op against the reference (pipeline.bench: a temporary run
# directory and MLflow database, nothing written to the user's).
if [ $pipeline = 1 ]; then
timeout -k 30 600 $PY -m pipeline.bench --compare-reference --out "$out/training.md" \
  model.backbone=resnet18 scaling.use_gpu=true scaling.num_workers=1 scaling.cpus_per_worker=4 \
  train.amp=bf16 train.iterations=100 train.log_every=20 train.val_every=100 train.batch_size=8 \
  train.crop=256 data.synthetic_size=256 data.synthetic_train=128 data.synthetic_val=8 2>&1 | tee "$out/training.txt" || failed="$failed training"
else
  echo "NOT RUN (Ray and MLflow are not installed here): pipeline.bench" | tee "$out/training.txt"
fi
# The host emulation of the CUDA kernels, on this machine's compiler (it needs no GPU; last, as CI
# runs it too). The argument-check cases last and alone: a crash there (seen with g++ 13.3 + torch
# 2.11, before the op libraries named the shared libstdc++ to the linker) must not hide the rest.
stage "host emulation"
(
  # built once first: a build error is reported once, not by every test
  $PY -c "from ops.emulation import load_emulation; load_emulation()" || exit 1
  rc=0
  if $PY -c "import xdist" 2>/dev/null; then par="-n 8" limit=600; else par="" limit=1800; fi  # one process: many times as long
  timeout -k 30 $limit $PY -m pytest -q -p no:cacheprovider $par tests/test_cuda_emulation.py -k "not bad_arguments" || rc=1
  timeout -k 30 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py -k "bad_arguments" || rc=1
  exit $rc
) 2>&1 | tee "$out/emulation.txt" || failed="$failed emulation"
stage "done"
echo "results in $out"
if [ -n "$failed" ]; then echo "FAILED:$failed"; exit 1; fi
