#!/usr/bin/env bash
# Runs kvq's cargo-fuzz targets (fuzz/): the GGUF reader, the tokenizers over random vocabularies and
# text, the --kv grammar, and the cache with attention over random formats and tokens.
#   scripts/fuzz.sh [SECONDS per target, default 600] [targets...]
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`). Corpora grow in target/fuzz-corpus/<target>
# (not committed). The seeds are fuzz/corpus/<target> and target/fuzz-seeds/<target> (the tiny models),
# written first by runtime-host/examples/fuzz_seeds.rs: the GGUF seeds it builds, and the committed
# corpus, fuzz/seeds/<target>.hex (text, one input per line), unpacked. To refresh that corpus after a run:
#   (cd fuzz && cargo +nightly fuzz cmin -O <target> ../target/fuzz-corpus/<target>)
#   cargo run -p kvq-host --example fuzz_seeds -- --pack <target> target/fuzz-corpus/<target>
# The tokenizer target also checks that the default model's byte-level BPE gives back the text it
# encoded, when KVQ_FUZZ_MODEL names its GGUF (set here from kvq's cache when the model is there).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gguf tokenizer kvspec cache)
model="${KVQ_CACHE:-$HOME/.cache/kvq}/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] && export KVQ_FUZZ_MODEL="$model"
# The seeds: small GGUF files made in Rust (deterministic), and the committed corpus unpacked.
cargo run --release -q -p kvq-host --example fuzz_seeds
for t in "${targets[@]}"; do
  corpus="target/fuzz-corpus/$t"
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/corpus/$t" ] && seeds+=("$PWD/fuzz/corpus/$t")
  [ -d "target/fuzz-seeds/$t" ] && seeds+=("$PWD/target/fuzz-seeds/$t")
  (cd fuzz && cargo +nightly fuzz run -O "$t" "../$corpus" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -max_len=131072 2>&1 | grep -E "^#[0-9]+.*(DONE|pulse)|ERROR|panicked" | tail -3)
done
