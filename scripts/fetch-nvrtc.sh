#!/usr/bin/env bash
# Fetches NVRTC, NVIDIA's run-time CUDA compiler, from PyPI into target/nvrtc/, so that kvq-gpu's kernels
# can be compiled (and their registers and spills reported) on a machine with no GPU and no CUDA toolkit:
#   target/nvrtc/cu13/lib   NVRTC 13.5 (nvidia-cuda-nvrtc): sm_87 (Jetson Orin), sm_90 and newer
#   target/nvrtc/cu12/lib   NVRTC 12.9 (nvidia-cuda-nvrtc-cu12): also sm_72 (Jetson Xavier; CUDA 13 dropped it)
# Each directory gets a libnvrtc.so link to the versioned library, the name the CUDA 12.2 build of cudarc
# looks for first. Run with LD_LIBRARY_PATH=target/nvrtc/cu13/lib, e.g.
#   LD_LIBRARY_PATH=target/nvrtc/cu13/lib cargo run -p kvq-gpu --bin kvq-gpu-compile -- --arch sm_87,sm_90
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/nvrtc
fetch() { # name requirement path-in-wheel
    local name=$1 req=$2 inner=$3
    if [ -e "$dest/$name/lib/libnvrtc.so" ]; then
        echo "$dest/$name: present"
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$req"
    python3 -m zipfile -e "$tmp"/*.whl "$tmp/x"
    rm -rf "${dest:?}/$name"
    mkdir -p "$dest/$name"
    mv "$tmp/x/$inner" "$dest/$name/lib"
    rm -rf "$tmp"
    local lib
    lib=$(cd "$dest/$name/lib" && ls libnvrtc.so.[0-9]* | head -1)
    ln -sf "$lib" "$dest/$name/lib/libnvrtc.so"
    echo "$dest/$name: $req ($lib)"
}
fetch cu13 nvidia-cuda-nvrtc==13.5.37 nvidia/cu13/lib
fetch cu12 nvidia-cuda-nvrtc-cu12==12.9.86 nvidia/cuda_nvrtc/lib
