#!/usr/bin/env bash
# The benchmark programs are built beside the binary and run (scripts and
# gpu-check.sh call them; a build that lost them would fail only there).
set -u
CAKE=${1:?usage: test_benches.sh path/to/cake}
B=$(dirname "$CAKE")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
for b in bench_engine bench_store bench_kernels; do
    [ -x "$B/$b" ] && echo "ok   $b built" || { echo "FAIL $b not built"; fails=$((fails + 1)); }
done
"$CAKE" mkmodel --shape tiny -o "$tmp/tiny.gguf" >/dev/null 2>&1 || { echo "FAIL mkmodel"; exit 1; }
if "$B/bench_engine" "$tmp/tiny.gguf" --threads 2 --prompt 64 --decode 4 >"$tmp/out" 2>&1; then
    echo "ok   bench_engine runs: $(tail -1 "$tmp/out")"
else
    echo "FAIL bench_engine: $(tail -5 "$tmp/out")"
    fails=$((fails + 1))
fi
# bench_serve exists where the server is built (libmicrohttpd and cJSON found)
if [ -x "$B/bench_serve" ]; then
    if "$B/bench_serve" "$tmp/tiny.gguf" --clients 2 --decode 4 --long 512 --short 2 --rounds 1 \
        >"$tmp/out" 2>&1; then
        echo "ok   bench_serve runs: $(grep -c x "$tmp/out") ratio lines"
        for section in "^alone" "slots batched" "^mixed burst" "^shared prefix" "^step size" \
            "^next turn:" "^next turn, its slot taken" "^prefetch"; do
            if ! grep -q "$section" "$tmp/out"; then
                echo "FAIL bench_serve printed no '$section' line"
                fails=$((fails + 1))
            fi
        done
    else
        echo "FAIL bench_serve: $(tail -5 "$tmp/out")"
        fails=$((fails + 1))
    fi
elif "$CAKE" serve --help >/dev/null 2>&1; then
    echo "FAIL bench_serve not built beside a cake that serves"
    fails=$((fails + 1))
fi
[ "$fails" -eq 0 ]
