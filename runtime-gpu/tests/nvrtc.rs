//! Every kernel source compiles with NVRTC for Jetson Xavier (sm_72, NVRTC 12.x), Jetson Orin (sm_87) and
//! a data-centre GPU (sm_90), with each kernel's registers and spills printed and no spills in the
//! decode kernels (attend, merge). No GPU is needed: `scripts/fetch-nvrtc.sh` puts NVRTC from PyPI in
//! `target/nvrtc/`. Without it the test prints why it skips; `KVQ_REQUIRE_NVRTC=1` (CI) makes that a
//! failure.

use std::path::PathBuf;
use std::process::Command;

use kvq_gpu::nvrtc::SOURCES;

fn lib_dir(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("KVQ_NVRTC_ROOT")
        .map_or(root.join("target/nvrtc"), PathBuf::from)
        .join(name)
        .join("lib");
    dir.join("libnvrtc.so").exists().then_some(dir)
}

fn compile_with(name: &str, archs: &str) -> Option<Vec<serde_json::Value>> {
    let Some(dir) = lib_dir(name) else {
        assert!(
            std::env::var_os("KVQ_REQUIRE_NVRTC").is_none(),
            "KVQ_REQUIRE_NVRTC is set but target/nvrtc/{name} is missing: run scripts/fetch-nvrtc.sh"
        );
        eprintln!(
            "skipping {name}: no NVRTC in target/nvrtc/{name}/lib (scripts/fetch-nvrtc.sh fetches it from PyPI)"
        );
        return None;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_kvq-gpu-compile"))
        .args(["--arch", archs, "--json"])
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} {archs}: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    Some(text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

fn check(name: &str, archs: &str) {
    let Some(rows) = compile_with(name, archs) else { return };
    for arch in archs.split(',') {
        for src in &SOURCES {
            for k in src.kernels {
                let r = rows
                    .iter()
                    .find(|r| r["arch"] == arch && r["kernel"] == *k)
                    .unwrap_or_else(|| panic!("{name}: no report for {k} on {arch}"));
                let (regs, stores, loads) = (&r["registers"], &r["spill_stores"], &r["spill_loads"]);
                eprintln!(
                    "NVRTC {} {arch} {k:<22} {regs:>4} registers, spills {stores}/{loads} bytes",
                    r["nvrtc"].as_str().unwrap_or("?")
                );
                assert!(
                    regs.as_u64().unwrap() > 0 && regs.as_u64().unwrap() <= 255,
                    "{k} {arch}: {regs} registers"
                );
                if src.file == "attend.cu" || src.file == "merge.cu" {
                    assert_eq!((stores.as_u64(), loads.as_u64()), (Some(0), Some(0)), "{k} spills on {arch}");
                }
            }
        }
    }
}

#[test]
fn kernels_compile_for_orin_and_hopper_with_nvrtc_13() {
    check("cu13", "sm_87,sm_90");
}

#[test]
fn kernels_compile_for_xavier_and_orin_with_nvrtc_12() {
    check("cu12", "sm_72,sm_87");
}

/// A source with an error gives NVRTC's log naming the line, not a panic.
#[test]
fn a_broken_source_reports_nvrtc_log() {
    let Some(dir) = lib_dir("cu13") else {
        eprintln!("skipping: no NVRTC in target/nvrtc/cu13/lib");
        return;
    };
    // The library is found through LD_LIBRARY_PATH, read when the process starts: run in a child.
    if std::env::var_os("KVQ_NVRTC_CHILD").is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args(["a_broken_source_reports_nvrtc_log", "--exact", "--nocapture"])
            .env("LD_LIBRARY_PATH", &dir)
            .env("KVQ_NVRTC_CHILD", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let src = kvq_gpu::nvrtc::Source {
        file: "broken.cu",
        text: "#include \"kvq.cuh\"\nextern \"C\" __global__ void k(unsigned *a) { a[0] = undefined_name; }\n",
        kernels: &["k"],
    };
    match kvq_gpu::nvrtc::compile(&src, "sm_87", false) {
        Err(kvq_gpu::GpuError::Compile { log, .. }) => assert!(log.contains("undefined_name"), "{log}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

/// Without NVRTC on the library path the compiler binary says so and exits 2.
#[test]
fn without_nvrtc_the_compiler_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvq-gpu-compile"))
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .unwrap();
    if out.status.code() == Some(2) {
        assert!(String::from_utf8_lossy(&out.stderr).contains("no NVRTC"));
    } else {
        eprintln!("an NVRTC is installed system-wide here; nothing to check");
    }
}
