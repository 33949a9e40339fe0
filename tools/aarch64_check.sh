#!/usr/bin/env bash
# The aarch64 build and its tests, on an x86-64 Debian/Ubuntu host, under
# emulation (qemu-user). The wheels are built for aarch64 too (pyproject's
# cibuildwheel archs) and there only the portable kernel (kernel_baseline.cpp,
# GCC vector extensions -> NEON) is compiled: this is where it is built and
# tested on that architecture.
#
#  1. Host packages (qemu-user-static, binfmt-support, debootstrap,
#     g++-aarch64-linux-gnu) are installed with apt-get if missing (root).
#  2. An arm64 Debian tree (bookworm, minbase) with its own Python, NumPy,
#     pytest and Hypothesis is made with debootstrap in $ARM_ROOT,
#     once; later runs reuse it (its second stage and its apt run through
#     qemu-aarch64 via binfmt_misc).
#  3. The extension is cross-compiled on the host with aarch64-linux-gnu-g++
#     against that tree's Python headers and pip's pybind11 (in a host venv), with CMakeLists.txt's
#     sources and flags for a non-x86 target: -O3 -fno-math-errno
#     -ffp-contract=off (no -ffast-math, no -march), only kernel_baseline.cpp
#     as the ISA source, no TILEATTN_HAVE_X86. (Not through CMake: finding an
#     aarch64 Python from an x86 CMake is more machinery than these seven
#     files need. pybind11's LTO is left out, as in .ci/sanitize.sh.)
#  4. A copy of python/ and tests/ with the built _core*.so goes into the
#     tree; show_config() and the selected tests run there, in a chroot,
#     under emulation (slow: expect 10-30x native).
#
# Environment: ARM_ROOT (the arm64 tree, default /tmp/tileattn-arm64/root),
# ARM_BUILD (objects, default /tmp/tileattn-arm64/build), ARM_VENV (host venv
# for pybind11, default /tmp/tileattn-arm64/venv), ARM_MIRROR (Debian
# mirror), ARM_SUITE (default bookworm), ARM_JOBS (parallel compiles,
# default 2), ARM_TESTS (override the test selection), ARM_PYTEST_ARGS
# (extra pytest arguments, e.g. "-x" or "-k decode").
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
rootfs=${ARM_ROOT:-/tmp/tileattn-arm64/root}
build=${ARM_BUILD:-/tmp/tileattn-arm64/build}
mirror=${ARM_MIRROR:-http://deb.debian.org/debian}
suite=${ARM_SUITE:-bookworm}
jobs=${ARM_JOBS:-2}
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# The tests that exercise the C++ core and the modules built on it; not the
# torch/keras/transformers cross-checks (no such packages in the tree; they
# would skip), nor the long property and fuzz sweeps (hours under emulation;
# add them with ARM_TESTS).
default_tests="test_attention.py test_masks.py test_errors.py test_layouts_dtypes.py
  test_core_kv.py test_cache.py test_linear_kernel.py test_dense_copy.py test_edge_cases.py
  test_backward.py test_mha_features.py test_encoder.py test_module_base.py
  test_threads.py test_hardening.py test_module_backward.py test_row_ops.py
  test_batch_independence.py test_varlen.py"

[ "$(id -u)" = 0 ] || { echo "aarch64_check.sh: needs root (debootstrap, chroot, mount)" >&2; exit 1; }

# -- 1. host packages ---------------------------------------------------------
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# aarch64 executables run through qemu: binfmt_misc must be mounted (it is
# not in some containers) and the qemu-aarch64 entry enabled.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
  echo "aarch64_check.sh: binfmt_misc has no enabled qemu-aarch64 entry" >&2; exit 1; }

# -- 2. the arm64 tree --------------------------------------------------------
# Not Debian's python3-pybind11: bookworm's is 2.10, older than the 2.12
# pyproject.toml's build-system requires (it fails to compile module code);
# pybind11 is headers only, so the host's pip copy serves (step 3).
pkgs="python3 python3-dev python3-numpy python3-pytest python3-hypothesis"
mounted=()
cleanup() {
  local m
  for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_tree() {
  mountpoint -q "$rootfs/proc" || { mount -t proc proc "$rootfs/proc"; mounted+=("$rootfs/proc"); }
  mountpoint -q "$rootfs/dev" || { mount --bind /dev "$rootfs/dev"; mounted+=("$rootfs/dev"); }
}
in_tree() {  # runs a command in the tree with a clean environment
  chroot "$rootfs" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

if [ ! -x "$rootfs/usr/bin/python3" ]; then
  echo "== debootstrap --arch=arm64 $suite into $rootfs"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  debootstrap --arch=arm64 --variant=minbase --include="${pkgs// /,}" "$suite" "$rootfs" "$mirror"
  echo "== tree made ($(elapsed))"
fi
# The static emulator inside the tree too, for hosts whose binfmt entry does
# not pin it (no F flag).
cp -f "$(command -v qemu-aarch64-static)" "$rootfs/usr/bin/"
mount_tree
missing=
for p in $pkgs; do
  in_tree dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "${missing// /}" ]; then
  echo "== apt-get install (in the tree):$missing"
  cp -f /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
  in_tree apt-get update -qq
  in_tree env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
pyver=$(in_tree python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ext=$(in_tree python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
echo "== tree: python $pyver, extension suffix $ext ($(elapsed))"

# -- 3. cross-compile ----------------------------------------------------------
# The sources CMakeLists.txt compiles on a target that is not x86-64: those of
# pybind11_add_module plus the initial TILEATTN_ISA_SOURCES.
cml="$src/CMakeLists.txt"
sources=$( { sed -n '/^pybind11_add_module(_core/,/)/p' "$cml"
             grep -o 'set(TILEATTN_ISA_SOURCES [^)]*)' "$cml"; } |
           grep -o 'csrc/[A-Za-z0-9_]*\.cpp' | grep -vx 'csrc/kernel_avx.*\.cpp' | sort -u)
# Guard against the list drifting: every csrc/*.cpp is either built here or
# one of the x86-only kernels.
for f in "$src"/csrc/*.cpp; do
  rel=csrc/$(basename "$f")
  case "$rel" in csrc/kernel_avx*.cpp) continue ;; esac
  echo "$sources" | grep -qx "$rel" || {
    echo "aarch64_check.sh: $rel is not in CMakeLists.txt's list as read here; update the script" >&2
    exit 1; }
done
grep -q 'kernel_baseline.cpp' <<<"$sources" || { echo "aarch64_check.sh: no kernel_baseline.cpp" >&2; exit 1; }

# pybind11 as pyproject.toml's build-system requires it, from pip into a
# host virtual environment (headers only: the same for every architecture).
venv=${ARM_VENV:-/tmp/tileattn-arm64/venv}
pyb=$(grep -o '"pybind11[^"]*"' "$src/pyproject.toml" | tr -d '"')
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pyb"
pybind_inc=$("$venv/bin/python" -c 'import pybind11; print(pybind11.get_include())')
pybind_ver=$("$venv/bin/python" -c 'import pybind11; print(pybind11.__version__)')

cxx=aarch64-linux-gnu-g++
# As CMake's Release build with CMakeLists.txt's TILEATTN_COMMON_FLAGS and
# pybind11_add_module's -fvisibility=hidden. The tree's headers come after
# the cross compiler's own (-idirafter), so only Python's are taken from it.
common=(-std=c++17 -O3 -DNDEBUG -fno-math-errno -ffp-contract=off -Wall -Wextra
        -fPIC -fvisibility=hidden -pthread)
defs=("-DTILEATTN_COMPILER=\"GNU $($cxx -dumpfullversion) (aarch64-linux-gnu cross)\""
      "-DTILEATTN_BUILD_FLAGS=\"${common[*]}\"")
incs=(-isystem "$pybind_inc" -idirafter "$rootfs/usr/include/python$pyver" -idirafter "$rootfs/usr/include")
rm -rf "$build" && mkdir -p "$build"
echo "== $cxx ($($cxx -dumpfullversion)), pybind11 $pybind_ver: $(echo $sources | tr '\n' ' ')"
export cxx build src
printf '%s\n' $sources | xargs -P "$jobs" -I{} sh -c \
  'echo "   {}"; o="$build/$(basename {} .cpp).o"; exec "$0" "$@" -c "$src/{}" -o "$o"' \
  "$cxx" "${common[@]}" "${defs[@]}" "${incs[@]}"
objs=()
for s in $sources; do objs+=("$build/$(basename "$s" .cpp).o"); done
$cxx -shared -pthread -s -o "$build/_core$ext" "${objs[@]}"
aarch64-linux-gnu-readelf -h "$build/_core$ext" | grep -q 'Machine:.*AArch64' || {
  echo "aarch64_check.sh: $build/_core$ext is not an AArch64 object" >&2; exit 1; }
echo "== built ($(elapsed))"

# -- 4. the tests, in the tree -------------------------------------------------
rm -rf "$rootfs/src" && mkdir -p "$rootfs/src"
(cd "$src" && tar cf - pyproject.toml python tests) | tar xf - -C "$rootfs/src"
find "$rootfs/src" -name '__pycache__' -prune -exec rm -rf {} +
rm -f "$rootfs"/src/python/tileattn/_core*.so
cp "$build/_core$ext" "$rootfs/src/python/tileattn/"

in_tree sh -c 'cd /src && PYTHONPATH=/src/python python3 -c "import tileattn; tileattn.show_config()"'

tests=()
for t in ${ARM_TESTS:-$default_tests}; do
  [ -e "$rootfs/src/tests/$t" ] && tests+=("tests/$t")
done
echo "== pytest (emulated aarch64): ${tests[*]}"
status=0
tstart=$(date +%s)
# shellcheck disable=SC2086
in_tree sh -c 'cd /src && PYTHONPATH=/src/python PYTHONFAULTHANDLER=1 exec python3 -m pytest -q -p no:cacheprovider "$@"' \
  sh ${ARM_PYTEST_ARGS:-} "${tests[@]}" || status=$?
echo "aarch64_check.sh: tests $(( $(date +%s) - tstart )) s, total $(elapsed); status $([ $status = 0 ] && echo OK || echo "FAILED ($status)")"
exit $status
