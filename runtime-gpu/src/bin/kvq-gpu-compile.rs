//! Compiles every kernel source with the NVRTC found on the library path, for each architecture given,
//! and reports each kernel's registers, spills and stack (ptxas's verbose output). No GPU needed.
//!
//! ```text
//! kvq-gpu-compile [--arch sm_87,sm_90] [--json] [--cache]
//! ```
//!
//! `--cache` also writes each module to the module cache (`KVQ_CUDA_CACHE`), so that a machine with a
//! GPU but no NVRTC can load them.
//!
//! Exits 1 if a source does not compile or a decode kernel (attend, merge) spills; 2 without NVRTC.

use std::process::ExitCode;

use kvq_gpu::nvrtc;

fn main() -> ExitCode {
    let mut archs = vec!["sm_87".to_string(), "sm_90".to_string()];
    let mut json = false;
    let mut cache = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--arch" => match args.next() {
                Some(v) => archs = v.split(',').map(str::to_string).collect(),
                None => {
                    eprintln!("--arch needs a list, e.g. sm_72,sm_87");
                    return ExitCode::from(2);
                }
            },
            "--json" => json = true,
            "--cache" => cache = true,
            _ => {
                eprintln!("usage: kvq-gpu-compile [--arch sm_87,sm_90] [--json] [--cache]");
                return ExitCode::from(2);
            }
        }
    }
    let (major, minor) = match nvrtc::version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut ok = true;
    if !json {
        println!("NVRTC {major}.{minor}");
        println!(
            "{:<8} {:<11} {:<22} {:>9} {:>12} {:>11} {:>6}",
            "arch", "source", "kernel", "registers", "spill stores", "spill loads", "stack"
        );
    }
    for arch in &archs {
        for src in &nvrtc::SOURCES {
            let m = match nvrtc::compile(src, arch, true) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{e}");
                    ok = false;
                    continue;
                }
            };
            if cache && let Err(e) = nvrtc::compile_cached(src, arch) {
                eprintln!("{e}");
                ok = false;
            }
            let usage = nvrtc::usage(&m.log);
            for k in src.kernels {
                let Some(u) = usage.iter().find(|u| u.name == *k) else {
                    eprintln!("{arch} {}: no ptxas report for {k}; the log was:\n{}", src.file, m.log);
                    ok = false;
                    continue;
                };
                let decode = src.file == "attend.cu" || src.file == "merge.cu";
                if decode && (u.spill_stores > 0 || u.spill_loads > 0) {
                    eprintln!(
                        "{arch} {k}: spills ({} bytes stored, {} loaded)",
                        u.spill_stores, u.spill_loads
                    );
                    ok = false;
                }
                if json {
                    println!(
                        "{{\"nvrtc\":\"{major}.{minor}\",\"arch\":\"{arch}\",\"source\":\"{}\",\"kernel\":\"{k}\",\"registers\":{},\"spill_stores\":{},\"spill_loads\":{},\"stack\":{},\"image_bytes\":{}}}",
                        src.file,
                        u.registers,
                        u.spill_stores,
                        u.spill_loads,
                        u.stack,
                        m.image.len()
                    );
                } else {
                    println!(
                        "{arch:<8} {:<11} {k:<22} {:>9} {:>12} {:>11} {:>6}",
                        src.file, u.registers, u.spill_stores, u.spill_loads, u.stack
                    );
                }
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
