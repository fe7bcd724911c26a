#!/usr/bin/env bash
# Installs the Debian 12 packages that building and testing cake need.
# A no-op when everything is present; run as root (or with sudo available).
set -euo pipefail

packages=(
    build-essential cmake pkg-config
    libopenblas-dev     # the sgemm yardstick of bench/bench_kernels.c
    libxxhash-dev       # chunk keys and checksums
    libcmocka-dev       # unit tests
    libhiredis-dev redis-server  # the Redis chunk store and its tests (a real server on loopback)
    libpcre2-dev        # the byte-level BPE (Llama 3) pre-tokenizer: Unicode-property regexes
    libmicrohttpd-dev libcjson-dev  # `cake serve`: HTTP and JSON
    gnuplot-nox         # `cake bench ttft` plots
    clang libclang-rt-14-dev  # fuzz target (libFuzzer) and sanitizer runtimes
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
