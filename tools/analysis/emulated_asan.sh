#!/usr/bin/env bash
# The CUDA kernels' CPU emulation (tests/ops/test_kernels_emulated.py) under AddressSanitizer:
# every memory access of the kernels and of their host code checked against the bounds of its
# allocation, what compute-sanitizer's memcheck checks on a GPU, here at the emulated tests'
# shapes and on any machine. About 7 minutes on 2 cores the first time (4 of them the sanitized
# build, cached by torch as mmattn_emulated_kernels_asan), under 3 after (the tests at a third of
# their speed); a report ends the run with the access, its kernel and the allocation. Extra
# arguments go to pytest.
#
#   bash tools/analysis/emulated_asan.sh [-k value]
#
# The ASan runtime must come first in the process (LD_PRELOAD), and so must the libstdc++ that
# torch runs on: ASan resolves the C++ exception thrower at its start, and torch loads its
# libstdc++ only later (without it every TORCH_CHECK that throws stops the process).
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime=$("${CXX:-g++}" -print-file-name=libasan.so)
[ -e "$runtime" ] || { echo "emulated_asan.sh: no libasan.so beside ${CXX:-g++}" >&2; exit 2; }
stdcxx=$(python -c 'from mmattn.ops.extension import link_flags; print(link_flags()[1])')
export MMATTN_EMULATION_ASAN=1
options=detect_leaks=0:verify_asan_link_order=0:detect_stack_use_after_return=0
export ASAN_OPTIONS=$options${ASAN_OPTIONS:+:$ASAN_OPTIONS}
LD_PRELOAD="$runtime $stdcxx${LD_PRELOAD:+ $LD_PRELOAD}" exec python -m pytest \
  tests/ops/test_kernels_emulated.py -q -p no:cacheprovider "$@"
