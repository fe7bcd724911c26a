#!/usr/bin/env bash
# The whole test suite: a release build, the maths tests in a portable
# build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the threaded modules
# under ThreadSanitizer. Installs what is missing first (Debian 12, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== release build + tests"
bash scripts/build.sh build 2>&1 | tee /tmp/cake-build.log
# ptxas says so when it serialises the Hopper attention kernel's wgmma
# products (C7510-C7520: a register shortage, a divergent branch or a read of
# an accumulator while its product runs): the kernel is then several times
# slower, which only a GPU would show. A fresh build prints it (as CI's is).
if grep -E 'wgmma.mma_async instructions are serialized' /tmp/cake-build.log; then
    echo "ptxas serialised wgmma products (above): a performance bug in the attention kernel"
    exit 1
fi
ctest --test-dir build --output-on-failure -j"$jobs"

# Builds without AVX-512 (not -march=native) run the portable twins as the
# kernels and decoders: the maths tests hold those to the references too.
echo "== portable build + maths tests"
cmake -S . -B build-portable -DCMAKE_BUILD_TYPE=Release -DCAKE_NATIVE=OFF -DCAKE_CUDA=OFF >/dev/null
cmake --build build-portable -j"$jobs" --target test_kernels test_dequant test_forward
ctest --test-dir build-portable --output-on-failure -j"$jobs" -R '^test_(kernels|dequant|forward)$'

echo "== ASan + UBSan build + tests"
bash scripts/build.sh build-asan -DCAKE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== TSan build + threaded tests"
bash scripts/build.sh build-tsan -DCAKE_TSAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan --output-on-failure -j"$jobs" \
    -R 'threadpool|kernels|forward|loader|store|staging|serve|sched'
# The libFuzzer targets (fuzz/README.md) still build, replay their seeds and
# hold for some thousand runs from a fixed seed (the same inputs every time:
# ~10 s each). fuzz_model is left to runs by hand: its library takes clang
# minutes to build.
echo "== fuzz targets: seeds + fixed runs"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Release -DCAKE_FUZZ=ON -DCAKE_CUDA=OFF \
    -DCAKE_BUILD_TESTS=OFF >/dev/null
cmake --build build-fuzz -j"$jobs" --target fuzz_gguf fuzz_tokenizer fuzz_chunk fuzz_api \
    fuzz_gguf_corpus fuzz_tokenizer_corpus fuzz_chunk_corpus fuzz_api_corpus >/dev/null
for target in gguf:5000 tokenizer:8000 chunk:50000 api:50000; do
    t=${target%:*} runs=${target#*:}
    # a copy of the seeds, where new inputs go
    rm -rf "build-fuzz/fuzz/ci_$t" && cp -r "build-fuzz/fuzz/corpus_$t" "build-fuzz/fuzz/ci_$t"
    if ! build-fuzz/fuzz/fuzz_$t -seed=1 -runs="$runs" -artifact_prefix=build-fuzz/fuzz/ \
        "build-fuzz/fuzz/ci_$t" >"build-fuzz/fuzz/ci_$t.log" 2>&1; then
        tail -40 "build-fuzz/fuzz/ci_$t.log"
        echo "fuzz_$t failed (input in build-fuzz/fuzz/crash-*)"
        exit 1
    fi
    echo "fuzz_$t: $(grep -E '^Done' "build-fuzz/fuzz/ci_$t.log")"
done
echo "== all tests passed"
