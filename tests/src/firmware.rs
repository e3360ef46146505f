//! Building `firmware-demo` and running it under QEMU (`qemu-system-arm -machine mps2-an386 -cpu
//! cortex-m4`), from the host tests.

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The board's SRAM (mps2-an386: 4 MiB at `0x2000_0000`), as the firmware counts it.
pub const SRAM_BYTES: usize = 4 << 20;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Why the firmware cannot run here, with how to fix it; `None` when QEMU and the target are present.
pub fn missing() -> Option<String> {
    let qemu = Command::new("qemu-system-arm").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some(
            "qemu-system-arm is not installed (Debian: `sudo apt-get install qemu-system-arm`; .ci/run installs it)"
                .into(),
        );
    }
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().ok().map(|o| {
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib/thumbv7em-none-eabihf")
    });
    if !sysroot.is_some_and(|p| p.exists()) {
        return Some(
            "the thumbv7em-none-eabihf target is missing (`rustup target add thumbv7em-none-eabihf`)".into(),
        );
    }
    None
}

/// Builds the firmware (release) over the stream in `qkv`, with defmt logging or without; returns the ELF's
/// path (the two builds keep apart target directories).
///
/// # Errors
/// Cargo's failure, with its output.
pub fn build(qkv: &Path, defmt: bool) -> Result<PathBuf> {
    let dir = root().join("firmware-demo");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = if defmt { "target/defmt" } else { "target" };
    let mut args = vec!["build", "--release", "--quiet", "--target-dir", target];
    if defmt {
        args.extend(["--features", "defmt"]);
    }
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(&args)
        .env("KVQ_QKV", qkv)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .output()
        .context("running cargo for firmware-demo")?;
    ensure!(out.status.success(), "building firmware-demo failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let elf = dir.join(target).join("thumbv7em-none-eabihf/release/firmware-demo");
    ensure!(elf.exists(), "no ELF at {}", elf.display());
    Ok(elf)
}

/// Runs the ELF under QEMU (killed after `timeout_s`); returns its exit code, standard output (text, or
/// defmt frames from a defmt build) and standard error.
///
/// # Errors
/// QEMU cannot be started.
pub fn run(elf: &Path, timeout_s: u32) -> Result<(i32, Vec<u8>, String)> {
    let out = Command::new(root().join("firmware-demo/run-qemu.sh"))
        .arg(elf)
        .env("QEMU_TIMEOUT", timeout_s.to_string())
        .output()
        .context("running qemu-system-arm")?;
    let code = out.status.code().unwrap_or(-1);
    Ok((code, out.stdout, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Decodes the defmt frames a defmt build wrote, with the format table of its ELF: one line per frame,
/// `LEVEL message`.
///
/// # Errors
/// The ELF has no defmt table, or the bytes hold a malformed or unfinished frame.
pub fn defmt_lines(elf: &[u8], frames: &[u8]) -> Result<Vec<String>> {
    let table = defmt_decoder::Table::parse(elf)?.context("the ELF has no defmt table")?;
    let mut dec = table.new_stream_decoder();
    dec.received(frames);
    let mut lines = Vec::new();
    loop {
        match dec.decode() {
            Ok(f) => {
                let level = f.level().map_or("PRINT", |l| l.as_str());
                lines.push(format!("{} {}", level.to_uppercase(), f.display_message()));
            }
            Err(defmt_decoder::DecodeError::UnexpectedEof) => break,
            Err(defmt_decoder::DecodeError::Malformed) => {
                bail!("a malformed defmt frame after {} frames", lines.len())
            }
        }
    }
    Ok(lines)
}

/// Sizes of an ELF's allocated sections, as `size` sums them: `(text, data, bss)` in bytes (text: code and
/// read-only data, the included stream among them; data: initialized writable; bss: zeroed, the arenas,
/// heap and stack reservation among them).
///
/// # Errors
/// The file does not parse as an object file.
pub fn sizes(elf: &[u8]) -> Result<(u64, u64, u64)> {
    use object::{Object, ObjectSection, SectionFlags, SectionKind};
    let file = object::File::parse(elf).context("parsing the firmware ELF")?;
    let (mut text, mut data, mut bss) = (0, 0, 0);
    for s in file.sections() {
        let alloc = match s.flags() {
            SectionFlags::Elf { sh_flags } => sh_flags & u64::from(object::elf::SHF_ALLOC) != 0,
            _ => true,
        };
        if !alloc {
            continue;
        }
        match s.kind() {
            SectionKind::UninitializedData | SectionKind::UninitializedTls => bss += s.size(),
            SectionKind::Data | SectionKind::Tls => data += s.size(),
            _ => text += s.size(),
        }
    }
    if text == 0 {
        bail!("no allocated sections");
    }
    Ok((text, data, bss))
}
