//! The CUDA sources and their compilation by NVRTC at run time, for the device's own architecture.
//!
//! Each source in `kernels/` is one operation and includes `kvq.cuh`; the header is pasted in before
//! compiling, so the crate carries everything it needs. [`compile`] gives a CUBIN for a real architecture
//! (`sm_87`) with ptxas's register and spill report, or PTX for a virtual one (`compute_87`).
//! [`Module`]s are cached on disk per architecture and source (see [`cache_file`]).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use crate::error::{GpuError, Result};

/// The shared layout header.
pub const HEADER: &str = include_str!("../kernels/kvq.cuh");

/// A kernel source: its file name and text.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name in `kernels/`.
    pub file: &'static str,
    /// The text.
    pub text: &'static str,
    /// The kernels it defines.
    pub kernels: &'static [&'static str],
}

/// The attention kernels, by GQA group size: `ATTEND[g - 1]` for `g` query heads a KV head.
pub const ATTEND: [&str; 8] = [
    "kvq_attend_g1",
    "kvq_attend_g2",
    "kvq_attend_g3",
    "kvq_attend_g4",
    "kvq_attend_g5",
    "kvq_attend_g6",
    "kvq_attend_g7",
    "kvq_attend_g8",
];

/// The attention kernels that also read the calibrated formats (kvq.cuh's generic reader), by GQA group
/// size.
pub const ATTEND_GENERIC: [&str; 8] = [
    "kvq_attend_generic_g1",
    "kvq_attend_generic_g2",
    "kvq_attend_generic_g3",
    "kvq_attend_generic_g4",
    "kvq_attend_generic_g5",
    "kvq_attend_generic_g6",
    "kvq_attend_generic_g7",
    "kvq_attend_generic_g8",
];

/// Every kernel of `attend.cu`.
pub const ATTEND_ALL: [&str; 16] = [
    ATTEND[0],
    ATTEND[1],
    ATTEND[2],
    ATTEND[3],
    ATTEND[4],
    ATTEND[5],
    ATTEND[6],
    ATTEND[7],
    ATTEND_GENERIC[0],
    ATTEND_GENERIC[1],
    ATTEND_GENERIC[2],
    ATTEND_GENERIC[3],
    ATTEND_GENERIC[4],
    ATTEND_GENERIC[5],
    ATTEND_GENERIC[6],
    ATTEND_GENERIC[7],
];

/// Every source.
pub const SOURCES: [Source; 4] = [
    Source {
        file: "append.cu",
        text: include_str!("../kernels/append.cu"),
        kernels: &["kvq_append_quantize", "kvq_append_store"],
    },
    Source { file: "attend.cu", text: include_str!("../kernels/attend.cu"), kernels: &ATTEND_ALL },
    Source { file: "merge.cu", text: include_str!("../kernels/merge.cu"), kernels: &["kvq_merge"] },
    Source { file: "copy.cu", text: include_str!("../kernels/copy.cu"), kernels: &["kvq_copy"] },
];

/// The source text with the header pasted in.
pub fn full_text(s: &Source) -> String {
    s.text.replace("#include \"kvq.cuh\"", HEADER)
}

/// NVRTC's options besides the architecture (part of the module cache's key).
pub const OPTIONS: [&str; 2] = ["--std=c++17", "-default-device"];

/// A compiled source.
#[derive(Clone, Debug)]
pub struct Module {
    /// The architecture it was compiled for (`sm_87`, `compute_90`).
    pub arch: String,
    /// CUBIN for a real architecture, PTX (NUL-terminated) for a virtual one.
    pub image: Vec<u8>,
    /// Whether `image` is a CUBIN.
    pub cubin: bool,
    /// NVRTC's log (ptxas's report for a CUBIN).
    pub log: String,
    /// Whether it was read from the module cache.
    pub cached: bool,
}

/// Whether an NVRTC library can be loaded.
pub fn available() -> bool {
    // SAFETY: loading a shared library runs its initializers; libnvrtc's are NVIDIA's and have no
    // preconditions. The library is only probed here, not called.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version (major, minor).
///
/// # Errors
/// [`GpuError::NoNvrtc`] without an NVRTC library.
pub fn version() -> Result<(i32, i32)> {
    if !available() {
        return Err(GpuError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for writes; the library is present (checked above).
    let r = unsafe { sys::nvrtcVersion(&raw mut major, &raw mut minor) };
    r.result().map_err(|e| GpuError::Driver(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn nvrtc_err(kernel: &'static str, arch: &str, what: &str, e: result::NvrtcError) -> GpuError {
    GpuError::Compile { kernel, arch: arch.to_string(), log: format!("{what}: {e:?}") }
}

/// Compiles `src` for `arch` (`sm_XX` gives a CUBIN, with ptxas's verbose report in the log when
/// `report` is set; `compute_XX` gives PTX).
///
/// # Errors
/// [`GpuError::NoNvrtc`] without NVRTC; [`GpuError::Compile`] with NVRTC's log if the source does not
/// compile for `arch`.
pub fn compile(src: &Source, arch: &str, report: bool) -> Result<Module> {
    if !available() {
        return Err(GpuError::NoNvrtc);
    }
    let text = CString::new(full_text(src))
        .map_err(|_| GpuError::Unsupported { what: "NUL in source", value: 0 })?;
    let name = CString::new(src.file).map_err(|_| GpuError::Unsupported { what: "NUL in name", value: 0 })?;
    let cubin = arch.starts_with("sm_");
    let mut opts =
        vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "-default-device".into()];
    if cubin && report {
        opts.push("--ptxas-options=-v".into());
    }
    let prog =
        result::create_program(&text, Some(&name)).map_err(|e| nvrtc_err(src.file, arch, "create", e))?;
    let guard = Program(prog);
    // SAFETY: `prog` is a live program (dropped by `guard` after every use below); the options are valid
    // C strings for the duration of the call.
    let compiled = unsafe { result::compile_program(guard.0, &opts) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(guard.0) }
        .map(|raw| {
            // SAFETY: NVRTC's log is a NUL-terminated string in `raw`, which outlives this borrow.
            unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned()
        })
        .unwrap_or_default();
    if compiled.is_err() {
        return Err(GpuError::Compile { kernel: src.file, arch: arch.to_string(), log });
    }
    let image = if cubin {
        let mut size = 0usize;
        // SAFETY: `size` is valid for a write; the program compiled.
        unsafe { sys::nvrtcGetCUBINSize(guard.0, &raw mut size) }
            .result()
            .map_err(|e| nvrtc_err(src.file, arch, "cubin size", e))?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds the `size` bytes NVRTC reported.
        unsafe { sys::nvrtcGetCUBIN(guard.0, buf.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| nvrtc_err(src.file, arch, "cubin", e))?;
        buf
    } else {
        // SAFETY: the program compiled.
        let ptx = unsafe { result::get_ptx(guard.0) }.map_err(|e| nvrtc_err(src.file, arch, "ptx", e))?;
        ptx.iter().map(|&c| c as u8).collect()
    };
    Ok(Module { arch: arch.to_string(), image, cubin, log, cached: false })
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed once, here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Registers and spills of one kernel, from ptxas's verbose report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    /// The kernel's name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame.
    pub stack: u32,
}

/// The kernels' usage in a ptxas verbose log ("Compiling entry function 'X'", then "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads" and "Used N registers").
pub fn usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let num = |line: &str, before: &str| -> Option<u32> {
        let at = line.find(before)?;
        line[..at].split_whitespace().last()?.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()
    };
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelUsage { name, registers: 0, spill_stores: 0, spill_loads: 0, stack: 0 });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = num(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num(line, "bytes spill loads").unwrap_or(0);
            }
            if let Some(r) = num(line, "registers") {
                k.registers = r;
            }
        }
    }
    out
}

/// Where compiled modules are kept: `$KVQ_CUDA_CACHE`, else `$XDG_CACHE_HOME/kvq/cuda`, else
/// `~/.cache/kvq/cuda`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KVQ_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("kvq").join("cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kvq").join("cuda"))
}

/// FNV-1a over the text, for cache file names.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The cache file of `src` compiled for `arch`: keyed by the source text (header included) and the
/// architecture, not by the NVRTC that compiled it (a CUBIN for an architecture loads under any driver
/// new enough for it), so modules compiled on another machine can be carried to one without NVRTC.
pub fn cache_file(src: &Source, arch: &str) -> Option<PathBuf> {
    let ext = if arch.starts_with("sm_") { "cubin" } else { "ptx" };
    let key = format!("{}\n{}", OPTIONS.join(" "), full_text(src));
    let name = format!("{}-{arch}-{:016x}.{ext}", src.file.trim_end_matches(".cu"), fnv(&key));
    cache_dir().map(|d| d.join(name))
}

/// [`compile`] through the disk cache ([`cache_file`]): a module compiled before is read back (NVRTC is
/// then not needed); otherwise it is compiled and written there. A cache that cannot be read or written
/// is skipped.
///
/// # Errors
/// As [`compile`], when the module is not in the cache.
pub fn compile_cached(src: &Source, arch: &str) -> Result<Module> {
    let file = cache_file(src, arch);
    if let Some(f) = &file
        && let Ok(image) = std::fs::read(f)
        && !image.is_empty()
    {
        let cubin = arch.starts_with("sm_");
        return Ok(Module { arch: arch.to_string(), image, cubin, log: String::new(), cached: true });
    }
    let m = compile(src, arch, false)?;
    store(src, &m);
    Ok(m)
}

/// Writes `m` to the module cache (atomically: a temporary file of this process, then a rename), or
/// nothing where the cache cannot be written.
pub fn store(src: &Source, m: &Module) {
    if let Some(f) = cache_file(src, &m.arch) {
        let tmp = f.with_extension(format!("{}.tmp", std::process::id()));
        let ok = f.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok())
            && std::fs::write(&tmp, &m.image).is_ok()
            && std::fs::rename(&tmp, f).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ptxas's verbose report as NVRTC 13.5 gives it for `merge.cu` on sm_87.
    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kvq_merge' for 'sm_87'
ptxas info    : Function properties for kvq_merge
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'kvq_copy' for 'sm_87'
ptxas info    : Function properties for kvq_copy
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers, 376 bytes cmem[0]
";

    #[test]
    fn ptxas_reports_parse_per_kernel() {
        let u = usage(LOG);
        assert_eq!(
            u,
            vec![
                KernelUsage {
                    name: "kvq_merge".into(),
                    registers: 40,
                    spill_stores: 12,
                    spill_loads: 4,
                    stack: 8
                },
                KernelUsage {
                    name: "kvq_copy".into(),
                    registers: 14,
                    spill_stores: 0,
                    spill_loads: 0,
                    stack: 0
                },
            ]
        );
    }

    /// The header is pasted into every source, and every kernel a source lists is defined in it.
    #[test]
    fn sources_define_their_kernels_and_take_the_header() {
        for s in &SOURCES {
            let text = full_text(s);
            assert!(!text.contains("#include \"kvq.cuh\"") && text.contains("typedef struct"), "{}", s.file);
            for k in s.kernels {
                let g = k.strip_prefix("kvq_attend_generic_g").or_else(|| k.strip_prefix("kvq_attend_g"));
                let defined = match g {
                    Some(n) => text.contains(&format!("KVQ_ATTEND({n})")),
                    None => text.contains(&format!("void {k}(")),
                };
                assert!(defined, "{} does not define {k}", s.file);
            }
        }
    }
}
