#!/usr/bin/env bash
# The main job on defaults: build cake, make a 134M-parameter model (mha-160m
# shape, random weights) and run one request on it, then run the real tiny
# TinyStories model when ../shared/models has it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh build
mkdir -p out
[ -f out/mha-160m.gguf ] || ./build/cake mkmodel --shape mha-160m -o out/mha-160m.gguf
echo "== cake run on out/mha-160m.gguf (random weights: the text is noise, the speed is real)"
./build/cake run -m out/mha-160m.gguf -f README.md -n 32 --seed 1 >/dev/null
models=${CAKE_TEST_MODELS:-../shared/models}
if [ -f "$models/stories260K.gguf" ]; then
    echo "== cake run on $models/stories260K.gguf (greedy)"
    ./build/cake run -m "$models/stories260K.gguf" -p "Once upon a time" -n 64 --temp 0
fi
