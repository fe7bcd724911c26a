#!/usr/bin/env bash
# The CPU TTFT sweep of docs/BENCHMARKS.md: `cake bench ttft` on the mha-160m
# shape, 2 threads, prompts of 1024 and 2048 tokens, links emulated at
# 0.05-2 Gbit/s (they bracket the compute/load crossover on a 2-core machine),
# compute shares 1 and 0.125, medians of at least 3 runs. A cell repeats until its
# Cake runs and those of the faster baseline took 24 s, or the extra repeats 12 s;
# these skip a baseline that cannot matter (far slower), so cells where Cake does
# what the faster baseline does get the samples to tell them apart. About 13
# minutes.
# Usage: scripts/bench-ttft.sh [OUT_DIR [more cake bench ttft options]]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
build_quietly
model=$(mha_model)
out=${1:-out/bench-ttft-cpu}
shift || true
exec ./build/cake bench ttft -m "$model" --ctx 1024,2048 --bw 0.05,0.1,0.2,0.5,1,2 \
    --share 1,0.125 --repeat 3 --min-cell-time 24 --threads 2 --out "$out" --trace "$@"
