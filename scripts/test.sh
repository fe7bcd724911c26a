#!/usr/bin/env bash
# The whole test suite: a release build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the threaded modules
# under ThreadSanitizer. Installs what is missing first (Debian 12, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== release build + tests"
bash scripts/build.sh build
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== ASan + UBSan build + tests"
bash scripts/build.sh build-asan -DCAKE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== TSan build + threaded tests"
bash scripts/build.sh build-tsan -DCAKE_TSAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan --output-on-failure -j"$jobs" \
    -R 'threadpool|kernels|forward|loader|store|staging'
echo "== all tests passed"
