#!/usr/bin/env bash
# Chunk store bandwidth: file store with O_DIRECT vs dd iflag=direct, Redis on
# loopback vs redis-benchmark, and the bw= link emulation, for 256-token chunks
# of the llama-1b and mha-160m shapes (see bench/bench_store.c, docs/STORE.md).
# The file part writes ~1.5 GB under ${CAKE_BENCH_DIR:-out/bench}/store-tmp (on
# the disk to measure) and removes it. Extra arguments go to bench_store
# (e.g. --seconds 1 --rounds 1 for a quick look). Takes 5-6 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh build >/dev/null
dir=${CAKE_BENCH_DIR:-out/bench}
mkdir -p "$dir"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //');" \
     "disk of $dir: $(df --output=source "$dir" | tail -1)"
for shape in llama-1b mha-160m; do
    ./build/bench_store --dir "$dir/store-tmp" --shape "$shape" "$@"
done
