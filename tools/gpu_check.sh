#!/usr/bin/env bash
# Everything mmattn checks on a GPU, in one call: the kernels' build, their `cuda` tests (while
# mmcv builds), the model-level numbers (the HRNet-OCR training step, stock against each PSA
# form), compute-sanitizer memcheck, the op benchmark and racecheck. See docs/kernels.md.
#
#   bash tools/gpu_check.sh --prepare   # on the development machine: fill .whl/ (git-ignored)
#   bash tools/gpu_check.sh             # on the GPU machine, from the repo root, .whl/ carried
#
# The GPU machine's image has torch, nvcc, ninja and compute-sanitizer but no OpenMMLab
# package and no network: the pure-Python wheels and mmcv's source come in .whl/. mmcv's
# compiled ops (which mmseg imports) are built there, for the CPU only (the HRNet-OCR step
# runs none of them), in the background while mmattn's kernels build and are tested. Each
# stage's output goes to $OUT/<stage>.log (default gpu_check/); a failed stage is reported and
# the next one still runs. Each stage has a time limit in seconds (a lease is short: a stage
# that hangs must not take the rest with it), and the benchmarks' arguments can be replaced:
#
#   MODEL_ARGS='--iters 6 --backends auto,folded --profile 12' bash tools/gpu_check.sh
#   LIMIT_model_benchmark=240 OP_ARGS='--preset gpu --op psa' bash tools/gpu_check.sh
#
# Exit status: the number of failed stages (a stage stopped at its limit counts as failed).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(mmengine==0.10.7 mmsegmentation==1.2.2 timm==1.0.31 addict termcolor yapf platformdirs
        ftfy wcwidth 'setuptools<81')

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  python -m pip wheel -q --no-deps "${WHEELS[@]}" -w .whl
  python -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d .whl
  ls -la .whl
  exit 0
fi

OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
JOBS=$(nproc)
failed=0

MODEL_ARGS=${MODEL_ARGS:---iters 10 --backends auto,folded,reference --profile 12}
OP_ARGS=${OP_ARGS:---preset gpu --iters 30}

stage() {  # stage NAME DEFAULT_LIMIT COMMAND...: run it (LIMIT_<NAME> s at most), log it, report
  local name=$1 limit_var="LIMIT_$1" limit start rc
  limit=${!limit_var:-$2}
  shift 2
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "   (stopped at its limit of $limit s)" >> "$OUT/$name.log"
  echo "== $name: rc $rc in $(( $(date +%s) - start )) s ($OUT/$name.log)"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -m pip install -q --no-deps .whl/*.whl || exit 100
export MMATTN_SKIP_STACK_CHECK=1 MMATTN_JIT=1 MAX_JOBS=$JOBS

# mmcv with its ops, for mmseg: in the background while the kernels build; CPU ops only
# (mmcv's setup.py compiles the CUDA ops whenever torch sees a GPU: hidden from it here)
( CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 FORCE_CUDA=0 python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation .whl/mmcv-2.1.0.tar.gz > "$OUT/mmcv_build.log" 2>&1;
  echo $? > /tmp/mmcv_build.rc ) &
mmcv_pid=$!

stage kernels_build 300 python3 -m mmattn.ops.build --cuda
stage cuda_tests 180 python3 -m pytest tests/ops -q -m cuda -p no:cacheprovider
wait "$mmcv_pid"
echo "== mmcv_build: rc $(cat /tmp/mmcv_build.rc) ($OUT/mmcv_build.log)"
[ "$(cat /tmp/mmcv_build.rc)" = 0 ] || { failed=$((failed + 1)); tail -n 25 "$OUT/mmcv_build.log"; }
# shellcheck disable=SC2086  # the arguments are meant to split
TAIL=40 stage model_benchmark 420 python3 tools/benchmark_model.py $MODEL_ARGS
stage memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize_kernels.py
# shellcheck disable=SC2086
TAIL=30 stage op_benchmark 300 python3 tools/benchmark.py $OP_ARGS
stage racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitize_kernels.py
echo "== gpu_check: $failed failed stage(s)"
exit "$failed"
