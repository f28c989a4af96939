#!/usr/bin/env bash
# Everything mmattn checks on a GPU, in one call: the kernels' build, their `cuda` tests (while
# mmcv builds), the model-level numbers (the HRNet-OCR training step, stock against each PSA
# form, replayed from a CUDA graph, then eager), compute-sanitizer memcheck, the op benchmark,
# the host cost of a block (against a conv + BN + ReLU) and racecheck. See docs/kernels.md.
#
#   bash tools/gpu_check.sh --prepare   # on the development machine: fill .whl/ (git-ignored)
#   bash tools/gpu_check.sh             # on the GPU machine, from the repo root, .whl/ carried
#
# --prepare also compiles mmattn's kernels for the lent machines' torch (DEVICE_TORCH, 2.11.0)
# and GPUs (DEVICE_ARCH, 9.0) into .whl/kernels/ (tools/prebuild_kernels.py, about 4 minutes
# on 2 cores): the GPU machine loads them where they match its torch and this tree (checked,
# kernels_prebuilt), and compiles them only where they do not (kernels_build, about 115 s).
#
# The GPU machine's image has torch, nvcc, ninja and compute-sanitizer but no OpenMMLab
# package and no network: the pure-Python wheels and mmcv's source come in .whl/. mmattn
# imports mmcv, so mmcv is installed first without its compiled ops (seconds); mmcv's ops (which
# mmseg imports; the HRNet-OCR step runs none of them) are built into a wheel, for the CPU only,
# in the background while mmattn's kernels build and are tested, and installed before the
# model benchmark. Each stage's output goes to $OUT/<stage>.log (default gpu_check/); a failed
# stage is reported and the next one still runs.
#
# A lease is short (15 minutes, a call at most 10): the whole script keeps within DEADLINE
# seconds (default 560, counted from its start), each stage within its own limit and what is
# left of the deadline (a stage with under MIN_STAGE_S, 20 s, left is skipped, and counts as
# failed). Limits and the benchmarks' arguments can be replaced:
#
#   MODEL_ARGS='--iters 6 --backends auto,folded --profile 12' bash tools/gpu_check.sh  # + folded
#   LIMIT_model_benchmark=300 OP_ARGS='--preset gpu --op psa' bash tools/gpu_check.sh
#   SANITIZE_ARGS='--dtypes float32' bash tools/gpu_check.sh   # both sanitizer stages
#   SPLIT_SWEEP='64 16' bash tools/gpu_check.sh   # + the model benchmark per split cap
#   GLUE_SWEEP='1 4 8' bash tools/gpu_check.sh     # + the model benchmark per glue team size
#
# GRAPH_ARGS runs the model benchmark on these arguments as the stage model_graph, before the
# eager one: its CUDA-graph mode (each training step captured once and replayed, the step
# without per-operator host work, where issue 12's step goals are judged on a host-bound
# machine; about 50 s for stock and the four PSA forms in fp32 and bf16 on an H100, before
# `--switches all` added, in the same turns, a copy of each PSA model per kernel default
# switched off: 11 more models, the kernels' changes since the ninth lease against what they
# replaced). Set to '' it is skipped:
#
#   GRAPH_ARGS='--cuda-graph --forms psa_s-official --dtypes float32 --profile 25' \
#     bash tools/gpu_check.sh
#
# SPLIT_SWEEP (default none) runs, after the model benchmark, one more model benchmark (its
# arguments SWEEP_ARGS: stock, PSA_p and the paper's parallel form, fp32, 5 steps) per value with
# MMATTN_PSA_MAX_SPLITS set to it (the cap on the pass kernels' splits per image that the glue
# kernels merge; docs/kernels.md), a stage `splits_<value>` each. GLUE_SWEEP (default none)
# likewise with MMATTN_PSA_GLUE_BLOCKS (the glue kernels' blocks per image, a cluster's size
# on compute capability 9.0), a stage `glue_<value>` each.
#
# NCU_ARGS (default none) runs Nsight Compute, the stage ncu after the op benchmark, over
# tools/sanitize_kernels.py with these arguments (the kernels once at a benchmark's shape), the
# kernels matching NCU_KERNELS (a regex of their names), NCU_SECTIONS its sections:
#
#   NCU_ARGS='--ops paper-parallel,official-sequential --dtypes bfloat16 --shapes 16,256,128,128
#   --layouts nchw' bash tools/gpu_check.sh
#
# CUDA_TESTS (default tests/ops tests/models/test_volo.py tests/test_benchmark.py) are the
# paths whose `cuda` tests the stage cuda_tests runs: 246 tests on 2026-11-28, the kernels'
# (tests/ops, 237; its last 98 at random shapes) first; the benchmark tools' tests start a
# process each.
#
# MMCV_OPS=0 skips building mmcv's ops (only the model benchmarks need them): a call of the
# kernels' stages alone then waits for nothing.
#
# Exit status: the number of failed stages (a stage stopped at its limit counts as failed).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(mmengine==0.10.7 mmsegmentation==1.2.2 timm==1.0.31 addict termcolor yapf platformdirs
        ftfy wcwidth 'setuptools<81')

# The lent machines' torch and GPUs (every lease 2026-11-26..28: torch 2.11.0+cu130, Python
# 3.12, H100 or H200), for which --prepare builds the kernels ahead (DEVICE_TORCH='' skips it)
DEVICE_TORCH=${DEVICE_TORCH-2.11.0}
DEVICE_ARCH=${DEVICE_ARCH:-9.0}
PREBUILT=${PREBUILT:-.whl/kernels/mmattn_kernels.so}
[[ $PREBUILT = /* ]] || PREBUILT=$PWD/$PREBUILT

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  python -m pip wheel -q --no-deps "${WHEELS[@]}" -w .whl
  python -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d .whl
  if [ -n "$DEVICE_TORCH" ]; then
    # the kernels compiled here (nvcc, 2 cores: about 4 minutes) against that torch, in a
    # virtual environment of its own (this machine's packages visible, its torch shadowed), so
    # that a lease loads them instead of compiling (the JIT build there when they do not match)
    venv=${PREBUILD_VENV:-/tmp/mmattn_torch_$DEVICE_TORCH}
    [ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv" || exit 1
    "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != \
'$DEVICE_TORCH')" 2>/dev/null ||
      "$venv/bin/python" -m pip install -q --no-deps "torch==$DEVICE_TORCH" || exit 1
    MMATTN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=$DEVICE_ARCH TORCH_EXTENSIONS_DIR=$venv/extensions \
      "$venv/bin/python" tools/prebuild_kernels.py "$(dirname "$PREBUILT")" || exit 1
  fi
  ls -la .whl "$(dirname "$PREBUILT")"
  exit 0
fi

OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
JOBS=$(nproc)
failed=0
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
MODEL_ARGS=${MODEL_ARGS:---iters 5 --warmup 2 --backends auto --profile 8}  # H100: 150 s
OP_ARGS=${OP_ARGS:---preset gpu --op psa --iters 20 --kernels 12 --host-split 8}
SANITIZE_ARGS=${SANITIZE_ARGS:-}
SPLIT_SWEEP=${SPLIT_SWEEP:-}
GLUE_SWEEP=${GLUE_SWEEP:-}
GRAPH_ARGS=${GRAPH_ARGS---cuda-graph --iters 6 --warmup 2 --backends auto --profile 8 \
--switches all}
NCU_ARGS=${NCU_ARGS:-}
NCU_KERNELS=${NCU_KERNELS:-'^(fwd|bwd|value|release|outlook)_'}
NCU_SECTIONS=${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats SchedulerStats WarpStateStats \
MemoryWorkloadAnalysis}
MMCV_OPS=${MMCV_OPS:-1}
CUDA_TESTS=${CUDA_TESTS:-tests/ops tests/models/test_volo.py tests/test_benchmark.py}
SANITIZE_KERNELS=${SANITIZE_KERNELS:-'(fwd|bwd|value|release_[ps]|outlook)_[a-z_]*kernel'}
SWEEP_FORMS=psa_p-official,paper-parallel   # (stock always runs, as the baseline)
SWEEP_ARGS=${SWEEP_ARGS:---iters 5 --warmup 2 --backends auto --profile 8 --dtypes float32 \
--forms $SWEEP_FORMS}

stage() {  # stage NAME DEFAULT_LIMIT COMMAND...: run it (LIMIT_<NAME> s at most), log it, report
  local name=$1 limit_var="LIMIT_$1" limit left start rc
  limit=${!limit_var:-$2}
  shift 2
  left=$(( DEADLINE - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "${MIN_STAGE_S:-20}" ]; then
    echo "== $name: skipped, $limit s allowed (its limit, or what DEADLINE=$DEADLINE leaves)"
    failed=$((failed + 1))
    return 0
  fi
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   (stopped at its limit of $limit s)" >> "$OUT/$name.log"
  fi
  echo "== $name: rc $rc in $(( $(date +%s) - start )) s ($OUT/$name.log)"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
PIP=(python3 -m pip install -q --no-index --no-deps --no-cache-dir)
"${PIP[@]}" .whl/*.whl || exit 100
MMCV_WITH_OPS=0 "${PIP[@]}" --no-build-isolation .whl/mmcv-2.1.0.tar.gz || exit 101
export MMATTN_SKIP_STACK_CHECK=1 MMATTN_JIT=1 MAX_JOBS=$JOBS
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # mmattn from this tree, for tools/*.py too

# mmcv's ops, CPU only (its setup.py compiles the CUDA ops whenever torch sees a GPU: hidden
# from it here), into a wheel: site-packages is not touched while the kernels' stages import mmcv.
# Linked against torch's libstdc++.so.6 as mmattn's kernels are (extension.link_flags): the
# machine's $CXX links libstdc++ statically, and an error message with a number crashed there.
rm -rf /tmp/mmcv_ops
if [ "$MMCV_OPS" != 0 ]; then
  CXX_RUNTIME=$(python3 -c 'from mmattn.ops.extension import link_flags; print(*link_flags())')
  ( CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 FORCE_CUDA=0 LDFLAGS="${LDFLAGS:-} $CXX_RUNTIME" \
      python3 -m pip wheel -q --no-index \
      --no-deps --no-cache-dir --no-build-isolation .whl/mmcv-2.1.0.tar.gz -w /tmp/mmcv_ops \
      > "$OUT/mmcv_build.log" 2>&1; echo $? > /tmp/mmcv_build.rc ) &
  mmcv_pid=$!
fi

# the kernels --prepare built for this torch and GPU (or those MMATTN_KERNELS_LIB names):
# loaded and checked (`mmattn.ops.build` given MMATTN_KERNELS_LIB: the build description against
# this process, an argument error's numbers) and then used by every stage, else compiled here
prebuilt=${MMATTN_KERNELS_LIB:-}
[ -n "$prebuilt" ] || [ ! -f "$PREBUILT" ] || prebuilt=$PREBUILT
unset MMATTN_KERNELS_LIB
if [ -n "$prebuilt" ]; then
  if MMATTN_KERNELS_LIB=$prebuilt timeout 120 python3 -m mmattn.ops.build --cuda \
      > "$OUT/kernels_prebuilt.log" 2>&1; then
    export MMATTN_KERNELS_LIB=$prebuilt
    echo "== kernels_prebuilt: using $MMATTN_KERNELS_LIB"
  else
    echo "== kernels_prebuilt: not used, compiled instead ($OUT/kernels_prebuilt.log)"
  fi
  tail -n 5 "$OUT/kernels_prebuilt.log"
fi
[ -n "${MMATTN_KERNELS_LIB:-}" ] || stage kernels_build 240 python3 -m mmattn.ops.build --cuda
# shellcheck disable=SC2086
stage cuda_tests 120 python3 -m pytest $CUDA_TESTS -q -m cuda -p no:cacheprovider
if [ "$MMCV_OPS" != 0 ]; then
  wait "$mmcv_pid"
  rc=$(cat /tmp/mmcv_build.rc)
  if [ "$rc" = 0 ]; then  # mmcv-lite (MMCV_WITH_OPS=0 names it so) makes way for mmcv
    { python3 -m pip uninstall -q -y mmcv-lite && "${PIP[@]}" /tmp/mmcv_ops/mmcv-*.whl; } \
      >> "$OUT/mmcv_build.log" 2>&1 || rc=$?
  fi
  echo "== mmcv_build (with its CPU ops): rc $rc, $(( $(date +%s) - T0 )) s into the run"
  [ "$rc" = 0 ] || { failed=$((failed + 1)); tail -n 25 "$OUT/mmcv_build.log"; }
fi
if [ -n "$GRAPH_ARGS" ]; then
  # shellcheck disable=SC2086  # the arguments are meant to split
  TAIL=45 stage model_graph 240 python3 tools/benchmark_model.py $GRAPH_ARGS
fi
# shellcheck disable=SC2086
TAIL=30 stage model_benchmark 300 python3 tools/benchmark_model.py $MODEL_ARGS
sweep() {  # sweep PREFIX VARIABLE VALUES...: the model benchmark once per value of VARIABLE
  local prefix=$1 variable=$2 value
  shift 2
  for value in "$@"; do
    # shellcheck disable=SC2086
    TAIL=30 stage "${prefix}_$value" 150 env "$variable=$value" \
      python3 tools/benchmark_model.py $SWEEP_ARGS
  done
}
# shellcheck disable=SC2086
sweep splits MMATTN_PSA_MAX_SPLITS $SPLIT_SWEEP
# shellcheck disable=SC2086
sweep glue MMATTN_PSA_GLUE_BLOCKS $GLUE_SWEEP
# shellcheck disable=SC2086
stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python3 tools/sanitize_kernels.py $SANITIZE_ARGS
# shellcheck disable=SC2086
TAIL=20 stage op_benchmark 120 python3 tools/benchmark.py $OP_ARGS
if [ -n "$NCU_ARGS" ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
  # shellcheck disable=SC2086
  TAIL=8 stage ncu 150 "${NCU:-ncu}" -k "regex:$NCU_KERNELS" \
    $(printf -- '--section %s ' $NCU_SECTIONS) python3 tools/sanitize_kernels.py $NCU_ARGS
fi
# the host cost of a block (Python, dispatch, autograd, launches) against a conv + BN + ReLU's
TAIL=12 stage host_benchmark 60 python3 tools/benchmark.py --preset host-gpu --iters 200 \
  --warmup 20
# shellcheck disable=SC2086
stage racecheck 150 compute-sanitizer --tool racecheck \
  python3 tools/sanitize_kernels.py $SANITIZE_ARGS
# A hazard in one of mmattn's kernels (SANITIZE_KERNELS, a regex of their names) fails the
# stage, whatever its severity (some are warnings, which leave the exit status 0); those in
# other libraries' kernels are counted, and the exit status is the program's: cuBLAS's bf16
# kernels (nvjet_sm90_*), which the reference paths run, reported shared-memory hazards of
# their own on an H100 (2026-11-27)
hazards=$(grep "Race reported" "$OUT/racecheck.log" 2>/dev/null)
if grep -qE "$SANITIZE_KERNELS" <<< "$hazards"; then
  echo "== racecheck: hazards reported in mmattn's kernels ($OUT/racecheck.log)"
  failed=$((failed + 1))
elif [ -n "$hazards" ]; then
  echo "== racecheck: $(wc -l <<< "$hazards") hazard report(s), none in mmattn's kernels"
fi
echo "== gpu_check: $failed failed stage(s), $(( $(date +%s) - T0 )) s"
exit "$failed"
