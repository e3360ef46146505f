//! Evaluation texts, fetched from Debian packages on first use and cached, never committed:
//! Jane Austen's six novels from `r-cran-janeaustenr` (read out of R's lazy-load database by
//! [`crate::eval::rdata`]) and the Jargon File from `jargon-text`.
//!
//! Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` (never installed: the
//! Austen package would pull in R). The texts land in `<cache>/texts/NAME.txt`.
//!
//! Evaluation uses these texts; calibration (a later issue) must use other text, so the two stay disjoint.

use crate::eval::rdata::LazyLoadDb;
use crate::fetch::cache_dir;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The names [`text`] knows: the six novels (janeaustenr's variable names) and `jargon`.
pub const NAMES: [&str; 7] = [
    "prideprejudice",
    "sensesensibility",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
    "jargon",
];

const AUSTEN_PKG: &str = "r-cran-janeaustenr";
const JARGON_PKG: &str = "jargon-text";

/// The text called `name` (one of [`NAMES`]), fetching its package first if it is not cached.
///
/// # Errors
/// An unknown name; `apt-get`/`dpkg-deb` missing or failing (the message shows the commands to run by
/// hand); a package whose contents are not as expected.
pub fn text(name: &str, quiet: bool) -> Result<String> {
    let path = text_path(name, quiet)?;
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Where the text called `name` is cached, fetching it first if needed.
///
/// # Errors
/// As [`text`].
pub fn text_path(name: &str, quiet: bool) -> Result<PathBuf> {
    if !NAMES.contains(&name) {
        bail!("unknown text `{name}`; known: {}", NAMES.join(", "));
    }
    let dir = cache_dir()?.join("texts");
    let path = dir.join(format!("{name}.txt"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pkg = if name == "jargon" { JARGON_PKG } else { AUSTEN_PKG };
    if !quiet {
        eprintln!("kvq: fetching the evaluation text `{name}` (Debian package {pkg}) into {}", dir.display());
    }
    let work = dir.join(format!("{pkg}.work"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let root = download_and_unpack(pkg, &work)?;
    if name == "jargon" {
        let gz = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
        let bytes = std::fs::read(&gz).with_context(|| format!("{pkg} has no {}", gz.display()))?;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut s)
            .context("gunzip jargon.txt.gz")?;
        write_atomic(&path, &s)?;
    } else {
        let data = root.join("usr/lib/R/site-library/janeaustenr/data");
        let rdx =
            std::fs::read(data.join("Rdata.rdx")).with_context(|| format!("{pkg} has no data/Rdata.rdx"))?;
        let rdb =
            std::fs::read(data.join("Rdata.rdb")).with_context(|| format!("{pkg} has no data/Rdata.rdb"))?;
        let db = LazyLoadDb::new(&rdx, rdb).context("janeaustenr's Rdata database")?;
        for book in &NAMES[..6] {
            let lines = db.lines(book)?;
            let mut s = lines.join("\n");
            s.push('\n');
            write_atomic(&dir.join(format!("{book}.txt")), &s)?;
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(path)
}

fn write_atomic(path: &Path, s: &str) -> Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, s).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `apt-get download PKG` into `work`, then `dpkg-deb -x` into `work/root`; returns the root.
fn download_and_unpack(pkg: &str, work: &Path) -> Result<PathBuf> {
    let manual = format!(
        "fetch it by hand:\n  cd {w} && apt-get download {pkg} && dpkg-deb -x {pkg}_*.deb root\n(if apt-get cannot find it, run `apt-get update` first)",
        w = work.display()
    );
    let download = || Command::new("apt-get").args(["download", "-q", pkg]).current_dir(work).output();
    let mut out =
        download().with_context(|| format!("apt-get was not found, so {pkg} cannot be fetched; {manual}"))?;
    if !out.status.success() {
        // A fresh machine may have empty package lists; refreshing them needs root and changes nothing else.
        let _ = Command::new("apt-get").args(["update", "-qq"]).output();
        out = download()?;
    }
    if !out.status.success() {
        bail!("`apt-get download {pkg}` failed: {}; {manual}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let deb = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get ran but left no .deb in {}; {manual}", work.display()))?;
    let root = work.join("root");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .with_context(|| format!("dpkg-deb was not found; {manual}"))?;
    if !st.success() {
        bail!("`dpkg-deb -x {}` failed ({st}); {manual}", deb.display());
    }
    Ok(root)
}
