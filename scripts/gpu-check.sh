#!/usr/bin/env bash
# kvq-gpu on a machine with an NVIDIA GPU, in two halves so that the GPU machine needs neither cargo,
# the network nor NVRTC:
#   scripts/gpu-check.sh build   here: the GPU tests and gpu_bench built for x86-64 Linux, and every
#                                kernel compiled for the usual architectures into a module cache
#                                (NVRTC from scripts/fetch-nvrtc.sh), all under target/gpu-check/
#   scripts/gpu-check.sh run     there (with target/gpu-check/ carried): every kernel against kvq-core
#                                on many shapes (KVQ_REQUIRE_GPU=1: no GPU is a failure), then the
#                                benchmark; logs and JSON go to $OUT (or target/gpu-check/out)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/gpu-check
case "${1:-}" in
build)
    scripts/fetch-nvrtc.sh
    mkdir -p "$dir/bin"
    cargo build --release -p kvq-gpu --bin kvq-gpu-compile --example gpu_bench --example jetson-demo
    test_bin=$(cargo test --release -p kvq-gpu --test gpu --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"): print(m["executable"])')
    cp "$test_bin" "$dir/bin/gpu-tests"
    cp target/release/examples/gpu_bench target/release/examples/jetson-demo "$dir/bin/"
    strip --strip-debug "$dir"/bin/*
    # sm_80 A100, sm_86 RTX 30, sm_87 Orin, sm_89 RTX 40/L4, sm_90 H100/H200, sm_100 B200, sm_120 RTX 50.
    # NVRTC 12.9: its CUBINs load under CUDA 12 and 13 drivers alike (13.x ones may not under a 12.x driver).
    KVQ_CUDA_CACHE="$dir/cuda" LD_LIBRARY_PATH=target/nvrtc/cu12/lib \
        target/release/kvq-gpu-compile --cache --arch sm_80,sm_86,sm_87,sm_89,sm_90,sm_100,sm_120 > "$dir/registers.txt"
    du -sh "$dir"
    ;;
run)
    out=${OUT:-$dir/out}
    mkdir -p "$out"
    export KVQ_CUDA_CACHE="$PWD/$dir/cuda" KVQ_REQUIRE_GPU=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$out/nvidia-smi.txt" || true
    "$dir/bin/gpu-tests" --test-threads 1 --nocapture 2>&1 | tee "$out/gpu-tests.txt"
    "$dir/bin/gpu_bench" --json | tee "$out/gpu_bench.jsonl"
    "$dir/bin/gpu_bench" --tokens 32768,131072 --model smollm2 | tee "$out/gpu_bench.txt"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
