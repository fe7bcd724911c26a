#!/usr/bin/env bash
# The main job on defaults: build cake, make a 134M-parameter model (mha-160m
# shape: MHA, so KV-heavy like the paper's LongAlpaca), then show the point of
# cake on a ~2300-token prompt: a cold run computes it and stores its KV chunks
# in a file store; warm runs then take the first token by computing only,
# loading only, and Cake (both at once), over a link emulated at 0.1 Gbit/s,
# where computing and loading take about as long on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
build_quietly
model=$(mha_model)
prompt=out/demo-prompt.txt
for i in 1 2 3 4 5 6; do cat README.md docs/ENGINE.md; done >"$prompt.all"
head -c 4500 "$prompt.all" >"$prompt" && rm -f "$prompt.all"
store=out/demo-store
rm -rf "$store"
bw=${CAKE_DEMO_BW:-0.1Gbit}

summary() { # prints the fields of cake run --json that tell the story
    LC_ALL=C sed -n 's/.*"prompt_tokens":\([0-9]*\).*"ttft_ms":\([0-9.]*\).*"mode":"\([a-z]*\)".*"chunks_computed":\([0-9]*\),"chunks_loaded":\([0-9]*\).*"meet_chunk":\(-*[0-9]*\).*/\3: ttft \2 ms for \1 tokens; \4 chunks computed, \5 loaded; meet at chunk \6/p'
}
echo "== cold: compute the prompt and store its chunks (file:$store)"
./build/cake run -m "$model" -f "$prompt" -n 16 --seed 1 --store "file:$store" --json 2>/dev/null | summary
for mode in compute load cake; do
    echo "== warm, --mode $mode, link emulated at $bw"
    ./build/cake run -m "$model" -f "$prompt" -n 16 --seed 1 --store "file:$store?bw=$bw" \
        --mode "$mode" --json 2>/dev/null | summary
done
models=${CAKE_TEST_MODELS:-../shared/models}
if [ -f "$models/stories260K.gguf" ]; then
    echo "== a real (tiny) model: TinyStories 260K, greedy"
    ./build/cake run -m "$models/stories260K.gguf" -p "Once upon a time" -n 64 --temp 0
fi
