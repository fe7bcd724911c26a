# Sourced by the scripts that run cake on the mha-160m shape (from the repo root).

# Builds cake into build/, its output in out/build.log (shown on failure).
build_quietly() {
    mkdir -p out
    bash scripts/build.sh build >out/build.log 2>&1 || { tail -30 out/build.log; exit 1; }
}

# Prints the path of the mha-160m model, making it first when it is missing.
mha_model() {
    local model=out/mha-160m.gguf
    [ -f "$model" ] || ./build/cake mkmodel --shape mha-160m -o "$model" >&2
    echo "$model"
}
