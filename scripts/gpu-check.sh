#!/usr/bin/env bash
# The CUDA backend on a GPU machine, in one go of under 6 minutes: build, the
# CUDA tests (with a fallback run on the plain attention kernel if they fail),
# the CPU forward tests, then prefill/decode benchmarks of the llama-8b and
# longalpaca-13b shapes (one-shot 16K prefill and 512-token chunks).
#
#   bash scripts/gpu-check.sh [RESULTS_DIR]      (default out/gpu)
#
# Only three files go to RESULTS_DIR (it may travel over a network, with a
# limit on the number of files), updated after every step so that a run cut
# short still leaves them: summary.txt, all.log (every step's full output) and
# machine.txt. Models are written to a scratch folder with room for them (/tmp
# first) and deleted after use. Every step runs under `timeout`; a failed step is reported
# and the script goes on. Nothing is installed from the network. If the build
# libraries are missing and out/gpu-carry/debs (or $CAKE_DEBS) holds Debian
# packages of them, they are unpacked into /tmp/cake-deps and used from there.
# Test models: $CAKE_TEST_MODELS, else out/gpu-carry/models, else ../shared/models.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=/tmp/cake-gpu-logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
T0=$(date +%s)
BUDGET=${CAKE_GPU_BUDGET:-350} # seconds for the whole script
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT CMD...: runs CMD with a time limit, output to $LOGS/NAME.log
# (and the terminal), one line in the summary. Returns CMD's status.
step() {
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s)
    echo "=== [$(elapsed)s] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$LOGS/$name.log"
    local dt=$(($(date +%s) - t))
    local what=ok
    [ $rc -eq 124 ] && what="TIMEOUT" || { [ $rc -ne 0 ] && what="FAILED (rc $rc)"; }
    note "$(printf '%-28s %-16s %4ss' "$name" "$what" "$dt")"
    { echo "=== $name: $what after ${dt}s: $*"; cat "$LOGS/$name.log"; echo; } >>"$OUT/all.log"
    cp "$SUMMARY" "$OUT/summary.txt"
    return $rc
}

echo "=== cake gpu-check: results in $OUT, budget ${BUDGET}s"
{
    date -u
    nvidia-smi -L || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv || true
    /usr/local/cuda/bin/nvcc --version | tail -2 || echo "no nvcc at /usr/local/cuda/bin"
    nproc
    free -g
    df -h /tmp . 2>/dev/null
} 2>&1 | tee "$OUT/machine.txt"
: >"$OUT/all.log"

# ---- build dependencies ----
missing=()
pkg-config --exists openblas 2>/dev/null || missing+=(openblas)
pkg-config --exists cmocka 2>/dev/null || missing+=(cmocka)
pkg-config --exists hiredis 2>/dev/null || missing+=(hiredis)
[ -f /usr/include/xxhash.h ] || pkg-config --exists libxxhash 2>/dev/null || missing+=(xxhash)
command -v cmake >/dev/null || missing+=(cmake)
command -v gcc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -gt 0 ]; then
    note "missing build dependencies: ${missing[*]}"
    DEBS=${CAKE_DEBS:-out/gpu-carry/debs}
    if ls "$DEBS"/*.deb >/dev/null 2>&1; then
        ROOT=/tmp/cake-deps
        rm -rf "$ROOT" && mkdir -p "$ROOT"
        for f in "$DEBS"/*.deb; do dpkg -x "$f" "$ROOT" || note "cannot unpack $f"; done
        # The .pc files name /usr: point them at the unpacked tree.
        find "$ROOT" -name '*.pc' -exec sed -i "s#/usr#$ROOT/usr#g" {} +
        A=x86_64-linux-gnu
        export PKG_CONFIG_PATH="$ROOT/usr/lib/$A/pkgconfig:$ROOT/usr/lib/$A/openblas-pthread/pkgconfig:$ROOT/usr/lib/pkgconfig:${PKG_CONFIG_PATH:-}"
        export CPATH="$ROOT/usr/include:$ROOT/usr/include/$A/openblas-pthread:${CPATH:-}"
        export LIBRARY_PATH="$ROOT/usr/lib/$A:$ROOT/usr/lib/$A/openblas-pthread:${LIBRARY_PATH:-}"
        export LD_LIBRARY_PATH="$ROOT/usr/lib/$A:$ROOT/usr/lib/$A/openblas-pthread:${LD_LIBRARY_PATH:-}"
        export CMAKE_PREFIX_PATH="$ROOT/usr:${CMAKE_PREFIX_PATH:-}"
        note "using the packages unpacked from $DEBS into $ROOT"
    else
        note "no Debian packages to fall back on (out/gpu-carry/debs or \$CAKE_DEBS): the build will likely fail"
    fi
fi

# ---- build ----
# Keep going (-k) past a target that fails (someone's test, say): the others may
# still be built. sm_90 is CMake's default here too; named to be sure.
if command -v make >/dev/null; then
    GEN="Unix Makefiles" KEEP="-k"
else
    GEN="Ninja" KEEP="-k 0"
fi
step configure 120 cmake -S . -B build-gpu -G "$GEN" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90
step build 240 cmake --build build-gpu -j16 -- $KEEP
for b in build-gpu/cake build-gpu/bench_engine build-gpu/tests/test_cuda build-gpu/tests/test_forward; do
    [ -x "$b" ] || note "not built: $b"
done

# ---- tests ----
if [ -z "${CAKE_TEST_MODELS:-}" ]; then
    if [ -f out/gpu-carry/models/stories260K.gguf ]; then
        export CAKE_TEST_MODELS=$(pwd)/out/gpu-carry/models
    elif [ -f ../shared/models/stories260K.gguf ]; then
        export CAKE_TEST_MODELS=$(cd ../shared/models && pwd)
    else
        note "no stories260K.gguf: the golden tests skip"
    fi
fi
if [ -x build-gpu/tests/test_cuda ]; then
    if ! step test_cuda 150 build-gpu/tests/test_cuda; then
        # Is it the tensor-core attention? The same tests on the plain kernel.
        CAKE_CUDA_ATTN=simt step test_cuda_simt 120 build-gpu/tests/test_cuda
    fi
    grep -E "max error|within|bit-identical|greedy ids|differ|near tie|skip:" \
        "$LOGS"/test_cuda*.log >"$LOGS/test_cuda_numbers.txt" 2>/dev/null
fi
[ -x build-gpu/tests/test_forward ] && step test_forward 90 build-gpu/tests/test_forward

# ---- benchmarks ----
# scratch for models: the first folder with room for the biggest (26 GB + slack)
MODELS=""
for d in /tmp /var/tmp "$(pwd)/build-gpu"; do
    mkdir -p "$d" 2>/dev/null || continue
    free_gb=$(df -BG --output=avail "$d" 2>/dev/null | tail -1 | tr -dc 0-9)
    if [ -n "$free_gb" ] && [ "$free_gb" -ge 30 ]; then
        MODELS="$d/cake-gpu-models"
        break
    fi
done
[ -z "$MODELS" ] && MODELS=/tmp/cake-gpu-models && note "no folder with 30 GB free; trying $MODELS"
mkdir -p "$MODELS"

# bench SHAPE GB: makes the model, runs one-shot and chunked prefill, deletes it.
# The prompt runs twice: the second time is warm (cuBLAS and module loading done).
bench() {
    local shape=$1 gb=$2 f="$MODELS/$1.gguf"
    local need=$((gb * 3 + 30)) # rough seconds: mkmodel, upload, two runs
    if [ "$(left)" -lt "$need" ]; then
        note "$shape: skipped, $(left)s left and about ${need}s needed"
        return
    fi
    local free_gb=$(df -BG --output=avail "$MODELS" | tail -1 | tr -dc 0-9)
    if [ "$free_gb" -lt $((gb + 2)) ]; then
        note "$shape: skipped, ${free_gb} GB free in $MODELS, $((gb + 2)) needed"
        return
    fi
    if step "mkmodel_$shape" 150 build-gpu/cake mkmodel --shape "$shape" -o "$f"; then
        CAKE_CUDA_PROFILE=1 step "bench_${shape}_oneshot" 120 build-gpu/bench_engine "$f" \
            --backend cuda --prompt 16384,16384 --batch 16384 --decode 32
        if [ "$(left)" -gt 30 ]; then
            step "bench_${shape}_chunk512" 120 build-gpu/bench_engine "$f" \
                --backend cuda --prompt 16384,16384 --batch 512 --decode 32
        else
            note "$shape chunked: skipped, $(left)s left"
        fi
    fi
    rm -f "$f" "$f.tmp"
}

if [ -x build-gpu/bench_engine ] && [ -x build-gpu/cake ]; then
    bench llama-8b 16
    bench longalpaca-13b 26
fi
rm -rf "$MODELS"

# ---- summary ----
{
    echo
    echo "== benchmark lines (the second 16384-token prefill is the warm one)"
    for f in "$LOGS"/bench_*.log; do
        [ -f "$f" ] || continue
        echo "-- $(basename "$f" .log)"
        grep -E "^model|prefill|decode|peak RSS" "$f"
        # attention vs GEMM time of the warm one-shot prefill
        grep "cake cuda profile: 16384 tokens" "$f" | tail -1
    done
    echo
    echo "== test numbers"
    head -60 "$LOGS/test_cuda_numbers.txt" 2>/dev/null
    echo
    echo "total $(elapsed)s"
} | tee -a "$SUMMARY"

cp "$SUMMARY" "$OUT/summary.txt"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
