//! `kvq`: run a GGUF language model on the CPU with a quantized KV cache.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::{
    bench::*, calibrate::*, chat::*, demo::*, dump::*, generate::*, info::*, models::*, perplexity::*,
    plot::*, retrieval::*, tokenize::*,
};

#[derive(Parser)]
#[command(name = "kvq", version, about = "Language models on small devices with a quantized KV cache")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streamed as it comes.
    Generate(GenerateArgs),
    /// Interactive chat with the model's chat template: /help at the prompt, Ctrl-C stops a reply.
    Chat(ChatArgs),
    /// Print the token ids of a file.
    Tokenize(TokenizeArgs),
    /// Architecture, tensor types and KV bytes per token of each preset.
    Info(InfoArgs),
    /// Prefill and decode speed at several depths, per KV spec, in one run.
    Bench(BenchArgs),
    /// Perplexity, KL divergence and top-1 agreement against the f16 cache, every spec in one run.
    Perplexity(PerplexityArgs),
    /// Passkey and line retrieval over long prompts, per spec: exact match and answer log-probability.
    Retrieval(RetrievalArgs),
    /// A long document with a planted fact in a chat, answered with several KV caches side by side.
    Demo(DemoArgs),
    /// Measures the calibrated formats' tables (codebooks, thresholds, permutations, clipping, balance)
    /// on a calibration text and writes the model's calibration file.
    Calibrate(CalibrateArgs),
    /// Writes one layer's queries, keys and values over a text, with its mikv2, kvquant2 and skvq2 calibration tables (calibrating first if the model has none), for the firmware demo and its test.
    DumpQkv(DumpArgs),
    /// Plots perplexity change against bits per element from `kvq perplexity --json` files, with reference
    /// points measured elsewhere.
    PlotQuality(PlotQualityArgs),
    /// The models `-m` knows by name: where they come from, their size and whether they are cached.
    Models(ModelsArgs),
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kvq: error: {}", cli::report(&e));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Info(a) => info(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Retrieval(a) => retrieval(a),
        Cmd::Demo(a) => demo(a),
        Cmd::Calibrate(a) => calibrate(a),
        Cmd::DumpQkv(a) => dump_qkv(a),
        Cmd::PlotQuality(a) => plot_quality(a),
        Cmd::Models(a) => models(a),
    }
}
