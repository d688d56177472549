#!/usr/bin/env bash
# One script for a fresh Hopper machine that has only this repository, the CUDA toolkit, the
# NVIDIA driver and a Python with torch (docs/gpu-proof.md):
#
#   bash tools/device_check.sh [OUT]          # OUT: results folder (default $OUT, else ./device-results)
#   bash tools/device_check.sh --dry-run      # no GPU needed: what it finds, then the host-target proof
#
# Steps, each timed and logged (a failing step does not stop the others; the exit status is
# nonzero if any failed, 2 if there is no GPU to run on):
#   1. inventory  nvidia-smi, nvcc, python, torch (and whether its build sees CUDA), pybind11, NCCL
#   2. build      moelink in place with nvcc for sm_90 (both extensions, from this repository only:
#                 no network, no pip), ptxas table and check (tools/check_ptxas.py: zero spills)
#   3. proof      python -m moelink.proof --target cuda --ranks 2,4,8 (N ranks as N streams; every
#                 path of moelink.proof.PATHS: layout, codecs, intranode, internode and low_latency
#                 over the loopback)
#   4. pytest     python -m pytest -m gpu tests (the proof itself is step 3, not rerun)
#   5. bench      python -m moelink.proof --bench-only (GB/s per rank, SM counts; us per LL call)
# Budget: under 8 minutes on a 16-core H200 machine (build ~2-3 min). Results in OUT:
#   summary.txt / summary.json  every step's status and seconds, the inventory, the proof's and the
#                               benchmark's console output
#   build.txt                   the build, the ptxas table and check, the device moelink sees
#   proof-cuda.txt/.json, bench-cuda.txt/.json, pytest-gpu.txt   the steps' results
# (8 files: what a lent device machine sends back at most.)
# Nothing is installed: a missing piece (pybind11, setuptools, nvcc) fails the step and says so.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
  case $arg in
    --dry-run|--host) DRY_RUN=1 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "device_check: unknown option $arg (try --help)" >&2; exit 3 ;;
    *) OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-$ROOT/device-results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
LOG="$OUT_DIR/summary.txt"
# At most 8 files come back from a lent device machine: these, and nothing else, are written.
for f in summary.txt summary.json build.txt proof-cuda.txt proof-cuda.json pytest-gpu.txt bench-cuda.txt bench-cuda.json \
         proof-host.txt proof-host.json; do rm -f "$OUT_DIR/$f"; done
: >"$LOG"
STEPS_JSON=()
FAILED=0
START=$(date +%s)
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOELINK_TIMEOUT_S=${MOELINK_TIMEOUT_S:-5}   # the GPU's wait deadline: each forced timeout costs it

say() { echo "device_check: $*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S OUTPUT_FILE COMMAND...: runs COMMAND with a time limit, its output to the
# console and appended to OUTPUT_FILE, and records the status.
run_step() {
  local name=$1 limit=$2 file=$3
  shift 3
  local t0 status
  t0=$(date +%s)
  say "== $name (limit ${limit}s): $*"
  echo "== $name: $*" >>"$file"
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$file"
  status=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  if (( status == 0 )); then
    say "PASS $name (${took}s)"
  else
    FAILED=1
    (( status == 124 || status == 137 )) && say "FAIL $name: ran past its ${limit}s limit" || say "FAIL $name: exit status $status (${took}s)"
  fi
  STEPS_JSON+=("{\"step\": \"$name\", \"status\": $status, \"seconds\": $took}")
  return "$status"
}

finish() {
  local total=$(( $(date +%s) - START ))
  say "total ${total}s; results in $OUT_DIR"
  {
    echo "{"
    echo "  \"dry_run\": $DRY_RUN, \"failed\": $FAILED, \"seconds\": $total,"
    echo "  \"inventory\": $(cat "$OUT_DIR/.inventory.json" 2>/dev/null || echo '{}'),"
    echo "  \"steps\": [$(IFS=,; echo "${STEPS_JSON[*]:-}")]"
    echo "}"
  } >"$OUT_DIR/summary.json"
  rm -f "$OUT_DIR/.inventory.json"
  exit "$1"
}

# ---- 1. inventory -------------------------------------------------------------------------------
say "repository $ROOT; results in $OUT_DIR; $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  say "GPU: $(nvidia-smi -L | head -n 4 | tr '\n' ';')"
  say "driver: $(nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv,noheader | head -n 1)"
else
  say "GPU: none (nvidia-smi $(command -v nvidia-smi >/dev/null 2>&1 && echo 'finds no device' || echo 'is not installed'))"
fi
NVCC=$(command -v nvcc || true)
[[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc && export PATH="/usr/local/cuda/bin:$PATH"
if [[ -n $NVCC ]]; then say "nvcc: $NVCC ($($NVCC --version | grep -o 'release [0-9.]*'))"; else say "nvcc: not found"; fi
"$PYTHON" - >"$OUT_DIR/.inventory.json" 2>/dev/null <<'EOF' || echo '{}' >"$OUT_DIR/.inventory.json"
import importlib, json, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
for name in ("torch", "pybind11", "setuptools", "pytest", "numpy"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as exc:  # noqa: BLE001
        info[name] = f"missing ({type(exc).__name__})"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["torch_sees_gpu"] = bool(torch.cuda.is_available())
except Exception:  # noqa: BLE001
    pass
try:
    import nvidia.nccl, pathlib
    info["nccl_headers"] = [str(p) for p in nvidia.nccl.__path__ if (pathlib.Path(p) / "include" / "nccl.h").is_file()]
except Exception:  # noqa: BLE001
    info["nccl_headers"] = []
print(json.dumps(info))
EOF
say "python: $(cat "$OUT_DIR/.inventory.json")"
if [[ $("$PYTHON" -c 'import torch, sys; sys.stdout.write(str(torch.cuda.is_available()))' 2>/dev/null) != True ]]; then
  say "note: this torch has no usable CUDA; the proof and benchmark do not need it (they use moelink._cuda.proof), the torch.cuda tests of pytest -m gpu skip"
fi

if (( DRY_RUN )); then
  say "--dry-run: no GPU steps; the host-target proof instead (what CI runs)"
  run_step "build (in place; CUDA too where nvcc is)" 900 "$OUT_DIR/build.txt" "$PYTHON" setup.py -q build_ext --inplace
  run_step "proof (host target, 2 and 4 ranks)" 900 "$OUT_DIR/build.txt" \
    "$PYTHON" -m moelink.proof --target host --ranks 2,4 --out "$OUT_DIR"
  (( GPU )) && say "a GPU is present: run without --dry-run for the GPU checks"
  finish "$FAILED"
fi
if (( ! GPU )); then
  say "no GPU on this machine: nothing to check here (use --dry-run for the host-target proof)"
  finish 2
fi
if [[ -z $NVCC ]]; then
  say "FAIL: nvcc not found (PATH, /usr/local/cuda/bin): the GPU build needs the CUDA toolkit"
  finish 1
fi

# ---- 2. build -----------------------------------------------------------------------------------
export MOELINK_CUDA=1 MOELINK_CUDA_ARCHS=${MOELINK_CUDA_ARCHS:-90} MOELINK_BUILD_JOBS=${MOELINK_BUILD_JOBS:-$(nproc)}
if ! run_step build 420 "$OUT_DIR/build.txt" "$PYTHON" setup.py -q build_ext --inplace; then
  say "the build failed: nothing else can run (see build.txt)"
  finish 1
fi
run_step "ptxas check" 60 "$OUT_DIR/build.txt" "$PYTHON" tools/check_ptxas.py build/ptxas-report.txt
run_step "device visible to moelink" 60 "$OUT_DIR/build.txt" "$PYTHON" -c '
import json, moelink._cuda as c
n = c.device_count()
print("moelink._cuda.device_count() =", n)
assert n > 0, "moelink._cuda sees no device"
print(json.dumps(c.proof.device_info()), json.dumps(c.build_info()))' || finish 1

# ---- 3-5. proof, pytest -m gpu, bench -----------------------------------------------------------
run_step proof 300 "$OUT_DIR/summary.txt" "$PYTHON" -m moelink.proof --target cuda --ranks 2,4,8 --out "$OUT_DIR"
run_step "pytest -m gpu" 240 "$OUT_DIR/pytest-gpu.txt" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests \
  --deselect tests/test_gpu_proof.py::test_the_proof_passes_at_2_4_and_8_ranks
run_step bench 180 "$OUT_DIR/summary.txt" "$PYTHON" -m moelink.proof --target cuda --bench-only --out "$OUT_DIR"
finish "$FAILED"
