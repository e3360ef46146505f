//! A reader for R's lazy-load databases (`data/Rdata.rdx` + `data/Rdata.rdb`), enough to pull the
//! character vectors out of a data package such as `janeaustenr` without R.
//!
//! The `.rdx` is a gzip'd serialized R list `(variables, references, compressed)`; `variables` maps each
//! name to an integer pair `(offset, length)` in the `.rdb`. Each `.rdb` entry is a 4-byte big-endian
//! uncompressed length, then (for `compressed` = 1) a zlib stream, or (2, 3) a type byte `'0'` none,
//! `'Z'` zlib, `'2'` bzip2 (not supported), `'X'` xz, then the stream. The payload is R's XDR
//! serialization (format 2 or 3): `"X\n"`, versions, then items, each an `int` of flags (type in the low
//! byte, attribute bit 9, tag bit 10) followed by the item.
//!
//! Hostile input gives an error: every length is checked against the bytes left, nesting is capped.

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::io::Read;

/// The values this reader understands; others are an error naming the R type.
#[derive(Debug, Clone, PartialEq)]
pub enum RValue {
    /// `NULL`.
    Null,
    /// A symbol (its name).
    Sym(String),
    /// A character vector (`None` is `NA`).
    Str(Vec<Option<String>>),
    /// An integer vector (`NA` is `i32::MIN`).
    Int(Vec<i32>),
    /// A logical vector.
    Lgl(Vec<i32>),
    /// A double vector.
    Real(Vec<f64>),
    /// A generic vector (list) with its `names` attribute, if any.
    List(Vec<RValue>, Vec<String>),
    /// A pairlist: (tag, value) pairs.
    Pairs(Vec<(Option<String>, RValue)>),
}

const NILVALUE: u32 = 254;
const REFSXP: u32 = 255;
const MAX_DEPTH: usize = 64;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    refs: Vec<RValue>,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(
            n <= self.b.len() - self.at,
            "truncated R serialization: {n} bytes wanted at {}, {} left",
            self.at,
            self.b.len() - self.at
        );
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        let s = self.take(4)?;
        Ok(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.int()?;
        if n == -1 {
            // Long vector: two ints.
            let hi = self.int()? as u32 as u64;
            let lo = self.int()? as u32 as u64;
            let n = (hi << 32) | lo;
            return usize::try_from(n).context("R vector length overflows");
        }
        ensure!(n >= 0, "negative R vector length {n}");
        let n = n as usize;
        // Every element takes at least one byte: refuse counts beyond the input before allocating.
        ensure!(
            n <= self.b.len() - self.at,
            "R vector length {n} exceeds the {} bytes left",
            self.b.len() - self.at
        );
        Ok(n)
    }

    fn header(&mut self) -> Result<()> {
        ensure!(self.take(2)? == b"X\n", "not an XDR R serialization (expected \"X\\n\")");
        let version = self.int()?;
        ensure!(version == 2 || version == 3, "R serialization version {version} (only 2 and 3)");
        self.int()?; // writer's R version
        self.int()?; // minimal R version
        if version == 3 {
            let n = self.len()?;
            self.take(n)?; // native encoding name
        }
        Ok(())
    }

    fn charsxp(&mut self) -> Result<Option<String>> {
        let n = self.int()?;
        if n == -1 {
            return Ok(None);
        }
        ensure!(n >= 0, "negative string length {n}");
        let s = self.take(n as usize)?;
        // Latin-1 strings are mapped byte for byte; UTF-8 and ASCII are checked.
        Ok(Some(match std::str::from_utf8(s) {
            Ok(s) => s.to_owned(),
            Err(_) => s.iter().map(|&c| char::from(c)).collect(),
        }))
    }

    fn item(&mut self, depth: usize) -> Result<RValue> {
        ensure!(depth < MAX_DEPTH, "R serialization nested deeper than {MAX_DEPTH}");
        let flags = self.int()? as u32;
        let ty = flags & 0xff;
        let has_attr = flags & (1 << 9) != 0;
        let has_tag = flags & (1 << 10) != 0;
        let mut v = match ty {
            NILVALUE => return Ok(RValue::Null),
            REFSXP => {
                let mut i = (flags >> 8) as usize;
                if i == 0 {
                    i = self.int()? as usize;
                }
                return self
                    .refs
                    .get(i.wrapping_sub(1))
                    .cloned()
                    .with_context(|| format!("R reference {i} to an unknown item"));
            }
            1 => {
                // SYMSXP: a CHARSXP follows; symbols join the reference table.
                let name = match self.item(depth + 1)? {
                    RValue::Str(mut s) if s.len() == 1 => s.pop().flatten().unwrap_or_default(),
                    other => bail!("symbol name is not a string: {other:?}"),
                };
                let v = RValue::Sym(name);
                self.refs.push(v.clone());
                return Ok(v);
            }
            9 => return Ok(RValue::Str(vec![self.charsxp()?])),
            2 => {
                // LISTSXP: attributes, tag, car, then the cdr (iterated, not recursed).
                let mut pairs = Vec::new();
                let (mut attr, mut tag) = (has_attr, has_tag);
                loop {
                    if attr {
                        self.item(depth + 1)?;
                    }
                    let name = if tag {
                        match self.item(depth + 1)? {
                            RValue::Sym(s) => Some(s),
                            _ => None,
                        }
                    } else {
                        None
                    };
                    pairs.push((name, self.item(depth + 1)?));
                    let next = self.int()? as u32;
                    match next & 0xff {
                        NILVALUE => break,
                        2 => {
                            attr = next & (1 << 9) != 0;
                            tag = next & (1 << 10) != 0;
                        }
                        t => bail!("pairlist continues with R type {t}"),
                    }
                }
                return Ok(RValue::Pairs(pairs));
            }
            10 | 13 => {
                let n = self.len()?;
                let s = self.take(n.checked_mul(4).context("R vector too long")?)?;
                let v = s.chunks_exact(4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
                if ty == 10 { RValue::Lgl(v) } else { RValue::Int(v) }
            }
            14 => {
                let n = self.len()?;
                let s = self.take(n.checked_mul(8).context("R vector too long")?)?;
                RValue::Real(
                    s.chunks_exact(8)
                        .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                        .collect(),
                )
            }
            16 => {
                let n = self.len()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let f = self.int()? as u32;
                    ensure!(f & 0xff == 9, "character vector element of R type {}", f & 0xff);
                    v.push(self.charsxp()?);
                }
                RValue::Str(v)
            }
            19 | 20 => {
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.item(depth + 1)?);
                }
                RValue::List(v, Vec::new())
            }
            t => bail!("unsupported R type {t} in the serialization"),
        };
        if has_attr {
            let attrs = self.item(depth + 1)?;
            if let (RValue::List(items, _), RValue::Pairs(pairs)) = (&mut v, attrs)
                && let Some(names) = pairs.into_iter().find_map(|(tag, val)| match (tag.as_deref(), val) {
                    (Some("names"), RValue::Str(s)) => {
                        Some(s.into_iter().map(Option::unwrap_or_default).collect())
                    }
                    _ => None,
                })
            {
                return Ok(RValue::List(std::mem::take(items), names));
            }
        }
        Ok(v)
    }
}

/// Deserializes one R object (XDR format 2 or 3).
///
/// # Errors
/// Malformed or truncated input, an unsupported type.
pub fn unserialize(bytes: &[u8]) -> Result<RValue> {
    let mut r = Reader { b: bytes, at: 0, refs: Vec::new() };
    r.header()?;
    r.item(0)
}

/// A lazy-load database: the index and the data file's bytes.
pub struct LazyLoadDb {
    vars: HashMap<String, (usize, usize)>,
    compressed: i32,
    rdb: Vec<u8>,
}

fn gunzip(b: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).read_to_end(&mut out).with_context(|| format!("gunzip {what}"))?;
    Ok(out)
}

/// A writer that refuses to grow past `cap` bytes (a decompression bomb stops at the header's length + 1).
struct Capped {
    out: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + b.len() > self.cap {
            return Err(std::io::Error::other("more bytes than the entry's header says"));
        }
        self.out.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LazyLoadDb {
    /// Parses the index `rdx` (gzip'd) over the data `rdb`.
    ///
    /// # Errors
    /// A malformed index.
    pub fn new(rdx: &[u8], rdb: Vec<u8>) -> Result<Self> {
        let idx = unserialize(&gunzip(rdx, "the .rdx index")?)?;
        let RValue::List(items, names) = idx else { bail!("the .rdx index is not a list") };
        let get = |n: &str| names.iter().position(|x| x == n).map(|i| &items[i]);
        let Some(RValue::List(vals, vnames)) = get("variables") else {
            bail!("the .rdx index has no `variables` list")
        };
        let compressed = match get("compressed") {
            Some(RValue::Lgl(v) | RValue::Int(v)) if !v.is_empty() => v[0],
            _ => 1,
        };
        let mut vars = HashMap::new();
        for (n, v) in vnames.iter().zip(vals) {
            let RValue::Int(p) = v else { bail!("variable {n}: index entry is not an integer pair") };
            ensure!(p.len() == 2 && p[0] >= 0 && p[1] >= 0, "variable {n}: bad index entry {p:?}");
            let (off, len) = (p[0] as usize, p[1] as usize);
            ensure!(
                off.checked_add(len).is_some_and(|e| e <= rdb.len()),
                "variable {n}: bytes {off}+{len} beyond the {}-byte .rdb",
                rdb.len()
            );
            vars.insert(n.clone(), (off, len));
        }
        Ok(Self { vars, compressed, rdb })
    }

    /// The variable names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The value of variable `name`.
    ///
    /// # Errors
    /// An unknown name, a corrupt or unsupported entry.
    pub fn get(&self, name: &str) -> Result<RValue> {
        let &(off, len) =
            self.vars.get(name).with_context(|| format!("no variable `{name}` in the database"))?;
        let e = &self.rdb[off..off + len];
        ensure!(e.len() >= 5, "variable {name}: entry of {len} bytes");
        let n = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as usize;
        ensure!(n <= 1 << 30, "variable {name}: claims {n} bytes uncompressed");
        let what = format!("variable {name}");
        let mut raw = Capped { out: Vec::with_capacity(n.min(1 << 28)), cap: n };
        let done = match (self.compressed, e[4]) {
            (1, _) => std::io::copy(&mut flate2::read::ZlibDecoder::new(&e[4..]), &mut raw).map(|_| ()),
            (2 | 3, b'0') => std::io::Write::write_all(&mut raw, &e[5..]),
            (2 | 3, b'Z') => {
                std::io::copy(&mut flate2::read::ZlibDecoder::new(&e[5..]), &mut raw).map(|_| ())
            }
            (2 | 3, b'X') => lzma_rs::xz_decompress(&mut &e[5..], &mut raw).map_err(std::io::Error::other),
            (c, t) => bail!("{what}: compression {c} with type byte {t:#x} is not supported (bzip2?)"),
        };
        done.with_context(|| format!("decompressing {what}"))?;
        let raw = raw.out;
        ensure!(raw.len() == n, "{what}: decompressed to {} bytes, the header says {n}", raw.len());
        unserialize(&raw).with_context(|| what.clone())
    }

    /// Variable `name` as a character vector's lines (`NA` as empty lines).
    ///
    /// # Errors
    /// As [`LazyLoadDb::get`], or a variable that is not a character vector.
    pub fn lines(&self, name: &str) -> Result<Vec<String>> {
        match self.get(name)? {
            RValue::Str(v) => Ok(v.into_iter().map(Option::unwrap_or_default).collect()),
            other => bail!("variable {name} is not a character vector ({})", kind(&other)),
        }
    }
}

fn kind(v: &RValue) -> &'static str {
    match v {
        RValue::Null => "NULL",
        RValue::Sym(_) => "symbol",
        RValue::Str(_) => "character",
        RValue::Int(_) => "integer",
        RValue::Lgl(_) => "logical",
        RValue::Real(_) => "double",
        RValue::List(..) => "list",
        RValue::Pairs(_) => "pairlist",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serializes a named list of character vectors the way R does (format 3, UTF-8 strings).
    fn ser_named(items: &[(&str, &[&str])]) -> Vec<u8> {
        let mut b = b"X\n".to_vec();
        let int = |b: &mut Vec<u8>, v: i32| b.extend_from_slice(&v.to_be_bytes());
        for v in [3, 0x40402, 0x30500, 5] {
            int(&mut b, v);
        }
        b.extend_from_slice(b"UTF-8");
        let chars = |b: &mut Vec<u8>, s: &str| {
            int(b, 0x8009);
            int(b, s.len() as i32);
            b.extend_from_slice(s.as_bytes());
        };
        int(&mut b, 19 | (1 << 9));
        int(&mut b, items.len() as i32);
        for (_, lines) in items {
            int(&mut b, 16);
            int(&mut b, lines.len() as i32);
            for l in *lines {
                chars(&mut b, l);
            }
        }
        int(&mut b, 2 | (1 << 10));
        int(&mut b, 1);
        chars(&mut b, "names");
        int(&mut b, 16);
        int(&mut b, items.len() as i32);
        for (n, _) in items {
            chars(&mut b, n);
        }
        int(&mut b, NILVALUE as i32);
        b
    }

    #[test]
    fn named_list_round_trip() {
        let b = ser_named(&[("a", &["x", "héllo"]), ("bb", &[])]);
        let v = unserialize(&b).unwrap();
        assert_eq!(
            v,
            RValue::List(
                vec![RValue::Str(vec![Some("x".into()), Some("héllo".into())]), RValue::Str(vec![])],
                vec!["a".into(), "bb".into()]
            )
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = ser_named(&[("a", &["x", "yz"]), ("bb", &["q"])]);
        for n in 0..b.len() {
            assert!(unserialize(&b[..n]).is_err(), "prefix {n} parsed");
        }
    }

    #[test]
    fn hostile_lengths_are_errors() {
        let mut b = ser_named(&[("a", &["x"])]);
        // The list length (right after the header and the list's flags) set to 2^30.
        let at = 2 + 16 + 5 + 4;
        b[at..at + 4].copy_from_slice(&(1i32 << 30).to_be_bytes());
        assert!(unserialize(&b).is_err());
        let deep: Vec<u8> = {
            let mut d = b"X\n".to_vec();
            for v in [2, 0, 0] {
                d.extend_from_slice(&i32::to_be_bytes(v));
            }
            for _ in 0..100 {
                d.extend_from_slice(&i32::to_be_bytes(19));
                d.extend_from_slice(&i32::to_be_bytes(1));
            }
            d
        };
        assert!(unserialize(&deep).unwrap_err().to_string().contains("nested"));
    }
}
