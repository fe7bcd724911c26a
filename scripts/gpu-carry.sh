#!/usr/bin/env bash
# Prepares out/gpu-carry, what a GPU run of scripts/gpu-check.sh carries to a
# machine that cannot reach the network: the Debian packages of the build's
# libraries (gpu-check unpacks them where the machine lacks them) and the
# test models from ../shared/models. out/ is not in the repo, so a fresh
# checkout has to make it again before the run:
#     bash scripts/gpu-carry.sh
#     run(command="... bash scripts/gpu-check.sh $OUT", carry=["out/gpu-carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=out/gpu-carry
mkdir -p "$DEST/debs" "$DEST/models"
PKGS="libcmocka-dev libcmocka0 libhiredis-dev libhiredis0.14 libxxhash-dev libxxhash0
libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0 libpcre2-dev libpcre2-8-0"
(cd "$DEST/debs" && apt-get download $PKGS)
MODELS=${CAKE_TEST_MODELS:-../shared/models}
for f in stories260K.gguf stories260K.bin tok512.bin; do
    [ -f "$MODELS/$f" ] && cp "$MODELS/$f" "$DEST/models/"
done
[ -d "$MODELS/golden" ] && cp -r "$MODELS/golden" "$DEST/models/"
du -sh "$DEST"
