#!/usr/bin/env bash
# CI: the C++ core under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds the extension with -DTILEATTN_SANITIZE=ON into its own build
# directory and installs it (not editable) into its own virtual environment
# under /tmp, so the developer's editable install is never touched. Then runs
# the tests that exercise the C++ (kernel, masks, layouts, errors, KV, threads,
# modules, fuzz, edge cases) once per ISA path the CPU supports, with the
# sanitizer runtime preloaded into the interpreter. Fails on a non-zero exit
# and on any sanitizer report, even one from a child process whose output a
# test swallowed (the reports go to files under $SAN_LOGS and are checked).
#
# Environment: SAN_VENV, SAN_BUILD, SAN_LOGS (defaults under /tmp),
# SAN_TESTS (override the test selection).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${SAN_VENV:-/tmp/tileattn-san-venv}
build=${SAN_BUILD:-/tmp/tileattn-san-build}
logs=${SAN_LOGS:-/tmp/tileattn-san-logs}
start=$(date +%s)

# The C++-facing tests; not the torch/transformers cross-checks or the
# examples (they spend their time in PyTorch and NumPy, not in our code).
default_tests="test_attention.py test_masks.py test_errors.py test_layouts_dtypes.py
  test_core_kv.py test_threads.py test_hypothesis.py test_mha_features.py
  test_cache.py test_edge_cases.py test_fuzz.py test_resources.py test_linear_kernel.py test_dense_copy.py
  test_varlen.py test_batch_independence.py test_row_ops.py test_bf16_linear.py
  test_bf16_attention.py test_bf16_arrays.py test_bf16_cache.py"
tests=()
for t in ${SAN_TESTS:-$default_tests}; do
  [ -e "$root/tests/$t" ] && tests+=("$root/tests/$t")
done

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# hypothesis as pinned in pyproject.toml's test extra: the fuzz suite's fixed
# seed draws the same cases only with the same release.
hyp=$(grep -o 'hypothesis==[0-9.]*' "$root/pyproject.toml")
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  numpy ml_dtypes pytest "$hyp" safetensors scikit-build-core pybind11 ninja cmake

# A build directory configured for another source tree cannot be reused.
if [ -f "$build/CMakeCache.txt" ] &&
   ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$root" "$build/CMakeCache.txt"; then
  rm -rf "$build"
fi
echo "== sanitizer build (ASan + UBSan) in $build"
# No LTO (pybind11 adds it to Release builds unless this is set): it only
# slows the sanitized link. -g1: function names and lines in the reports.
"$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps --force-reinstall \
  -Ccmake.define.TILEATTN_SANITIZE=ON -Ccmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -Ccmake.define.CMAKE_CXX_FLAGS=-g1 -Cbuild-dir="$build" -Cinstall.strip=false "$root"
echo "== built in $(( $(date +%s) - start )) s"

libasan=$(gcc -print-file-name=libasan.so)
libstdcxx=$(gcc -print-file-name=libstdc++.so)
if [ ! -e "$libasan" ]; then
  echo "sanitize.sh: gcc has no libasan.so ($libasan)" >&2
  exit 1
fi
# libstdc++ is preloaded too: ASan intercepts __cxa_throw only if it is
# loaded when ASan starts (else its first C++ exception hits a CHECK).
preload="$libasan $libstdcxx"

# detect_leaks=0: CPython does not free its interned strings, static types
# and module state at exit (by design), nor does NumPy its caches, so
# LeakSanitizer would report thousands of "leaks" that are not ours and bury
# any real report; leaks are checked instead by tests/test_resources.py (RSS
# over 100,000 calls). allocator_may_return_null=1: an allocation too large
# for memory must fail as it does under glibc (NULL -> MemoryError), which
# the tests check, instead of ASan aborting on its 1 TB limit.
# PYTHONMALLOC=malloc: the interpreter's own objects come from malloc too,
# so a stray write into one is caught as well.
rm -rf "$logs" && mkdir -p "$logs"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:log_path=$logs/asan:log_exe_name=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
export PYTHONMALLOC=malloc
# Tests that only mean something under the sanitizers (or mean nothing under
# them, like RSS) look at this; the fuzz suite runs fewer cases per target
# (and once per ISA path) unless TILEATTN_FUZZ_EXAMPLES says otherwise.
export TILEATTN_SANITIZED=1
export TILEATTN_FUZZ_EXAMPLES=${TILEATTN_FUZZ_EXAMPLES:-150}
export PYTHONFAULTHANDLER=1

out="$logs/pytest.out"
status=0
isas=$(cd /tmp && LD_PRELOAD="$preload" "$venv/bin/python" -c \
  "import tileattn._core as c; print(' '.join(c.isas_supported()))")
first=1
for isa in $isas; do
  # Tests that take the each_isa fixture loop over every path themselves:
  # they run in the first pass only (see .ci/san_plugin.py).
  echo "== TILEATTN_ISA=$isa $( [ $first = 1 ] && echo '(all tests)' || echo '(tests without each_isa)')"
  # Run from outside the checkout so the sanitized install is what is imported.
  if ! (cd /tmp && TILEATTN_ISA=$isa TILEATTN_SAN_FIRST_PASS=$first \
        PYTHONPATH="$root/.ci" LD_PRELOAD="$preload" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider -p san_plugin \
        --rootdir="$root" -c "$root/pyproject.toml" "${tests[@]}") 2>&1 | tee -a "$out"; then
    status=1
  fi
  first=0
done

# Report files holding only warnings (e.g. "failed to allocate" for the
# MemoryError tests) are counted, not shown.
reports=$(cd "$logs" && grep -lE 'ERROR: |runtime error:' asan* ubsan* 2>/dev/null || true)
warnings=$(ls "$logs" | grep -cE '^(asan|ubsan)' || true)
echo "== sanitizer log files: $warnings (with a report: $(echo $reports | wc -w))"
if [ -n "$reports" ]; then
  echo "== sanitizer reports:"
  for f in $reports; do echo "--- $f"; cat "$logs/$f"; done | tee -a "$out"
fi
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$out"; then
  echo "sanitize.sh: FAILED: a sanitizer report (above)" >&2
  status=1
fi
echo "sanitize.sh: ISA paths: $isas; $(( $(date +%s) - start )) s; status $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
