#!/usr/bin/env bash
# Engine speed on the mkmodel shapes mha-160m and llama-1b, F16 and F32 weights,
# 2 threads: prefill tokens/s at 512 and 2048 prompt tokens, decode tokens/s and
# peak RSS. Models are written to ${CAKE_BENCH_DIR:-out/bench} (about 8 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh build >/dev/null
dir=${CAKE_BENCH_DIR:-out/bench}
mkdir -p "$dir"
threads=${THREADS:-2}
for shape in mha-160m llama-1b; do
    for dt in f16 f32; do
        f="$dir/$shape-$dt.gguf"
        [ -f "$f" ] || ./build/cake mkmodel --shape "$shape" --dtype "$dt" -o "$f"
        ./build/bench_engine "$f" --threads "$threads" --prompt 512,2048 --decode 32
    done
done
