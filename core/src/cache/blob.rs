//! Calibration tables as a run of `u32` words, for a device that keeps them in flash: the host measures
//! the tables (`kvq calibrate`), writes each layer's as a blob ([`TableWriter`]), and the device hands the
//! blob to [`load_tables`] after [`Cache::new`], which makes the same checked calls the host's cache
//! would receive. The blob holds only what a cache's setters take (codebook levels, key centres, balancing
//! factors, outlier thresholds, channel permutations); the configuration, including a clipping factor,
//! travels apart.
//!
//! ```text
//! header  magic "KVQT" (little-endian u32), version, record count
//! record  tag, stream (0 keys, 1 values), index (head or codebook unit), n, m, then the payload:
//!   1 levels       n encoding levels, n decoding levels (f32 bits)
//!   2 centre       n f32 (one head's channels)
//!   3 balance      n f32
//!   4 thresholds   n lower, n upper (f32)
//!   5 permutation  n channel indices, m group bounds (one u32 each)
//! ```
//!
//! Records other than permutations have `m = 0`. A blob is parsed with every length checked against
//! what is left and against the core's limits, so a truncated or hostile blob is an error, never a panic
//! or a read past its end.

use super::{Cache, Stream};
use crate::cache::config::MAX_HEAD_DIM;
use crate::error::{Error, Result};
use crate::quant::codebook::MAX_LEVELS;

/// First word of a blob: "KVQT" read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVQT");
/// Version of the format above.
pub const VERSION: u32 = 1;
/// Words of the header.
pub const HEADER_WORDS: usize = 3;
/// Words of a record's header.
pub const RECORD_WORDS: usize = 5;

const LEVELS: u32 = 1;
const CENTER: u32 = 2;
const BALANCE: u32 = 3;
const THRESHOLDS: u32 = 4;
const PERMUTATION: u32 = 5;

/// What takes a cache's calibration tables: the cache itself ([`Cache`]'s checked setters), or a
/// [`TableWriter`] that records the calls.
pub trait TableSink {
    /// See [`Cache::set_levels`].
    ///
    /// # Errors
    /// The sink's refusal.
    fn set_levels(&mut self, stream: Stream, unit: usize, enc: &[f32], dec: &[f32]) -> Result<()>;
    /// See [`Cache::set_center`].
    ///
    /// # Errors
    /// The sink's refusal.
    fn set_center(&mut self, head: usize, mean: &[f32]) -> Result<()>;
    /// See [`Cache::set_balance`].
    ///
    /// # Errors
    /// The sink's refusal.
    fn set_balance(&mut self, head: usize, b: &[f32]) -> Result<()>;
    /// See [`Cache::set_thresholds`].
    ///
    /// # Errors
    /// The sink's refusal.
    fn set_thresholds(&mut self, head: usize, lower: &[f32], upper: &[f32]) -> Result<()>;
    /// See [`Cache::set_permutation`].
    ///
    /// # Errors
    /// The sink's refusal.
    fn set_permutation(&mut self, stream: Stream, head: usize, perm: &[u16], bounds: &[u16]) -> Result<()>;
}

impl TableSink for Cache<'_> {
    fn set_levels(&mut self, stream: Stream, unit: usize, enc: &[f32], dec: &[f32]) -> Result<()> {
        Cache::set_levels(self, stream, unit, enc, dec)
    }
    fn set_center(&mut self, head: usize, mean: &[f32]) -> Result<()> {
        Cache::set_center(self, head, mean)
    }
    fn set_balance(&mut self, head: usize, b: &[f32]) -> Result<()> {
        Cache::set_balance(self, head, b)
    }
    fn set_thresholds(&mut self, head: usize, lower: &[f32], upper: &[f32]) -> Result<()> {
        Cache::set_thresholds(self, head, lower, upper)
    }
    fn set_permutation(&mut self, stream: Stream, head: usize, perm: &[u16], bounds: &[u16]) -> Result<()> {
        Cache::set_permutation(self, stream, head, perm, bounds)
    }
}

/// Writes table calls into a caller's buffer as a blob; [`TableWriter::finish`] gives its length.
#[derive(Debug)]
pub struct TableWriter<'a> {
    out: &'a mut [u32],
    len: usize,
    records: u32,
}

impl<'a> TableWriter<'a> {
    /// A writer over `out`.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] if `out` cannot hold the header.
    pub fn new(out: &'a mut [u32]) -> Result<Self> {
        crate::error::need("table blob", HEADER_WORDS, out.len())?;
        out[..HEADER_WORDS].copy_from_slice(&[MAGIC, VERSION, 0]);
        Ok(Self { out, len: HEADER_WORDS, records: 0 })
    }

    /// Words written so far, the header with its record count included.
    pub fn finish(self) -> usize {
        self.len
    }

    fn push(&mut self, tag: u32, stream: u32, index: usize, a: Words<'_>, b: Words<'_>) -> Result<()> {
        let n = a.len();
        let m = if tag == PERMUTATION { b.len() } else { 0 };
        let total = self.len + RECORD_WORDS + a.len() + b.len();
        crate::error::need("table blob", total, self.out.len())?;
        let at = self.len;
        self.out[at..at + RECORD_WORDS].copy_from_slice(&[tag, stream, index as u32, n as u32, m as u32]);
        for (o, w) in self.out[at + RECORD_WORDS..total].iter_mut().zip(a.iter().chain(b.iter())) {
            *o = w;
        }
        self.len = total;
        self.records += 1;
        self.out[2] = self.records;
        Ok(())
    }
}

/// A record's payload part: floats or channel indices, each one word.
#[derive(Clone, Copy)]
enum Words<'s> {
    F32(&'s [f32]),
    U16(&'s [u16]),
}

impl Words<'_> {
    fn len(&self) -> usize {
        match self {
            Words::F32(x) => x.len(),
            Words::U16(x) => x.len(),
        }
    }
    fn iter(self) -> impl Iterator<Item = u32> {
        let (f, u) = match self {
            Words::F32(x) => (x, &[][..]),
            Words::U16(x) => (&[][..], x),
        };
        f.iter().map(|x| x.to_bits()).chain(u.iter().map(|&x| u32::from(x)))
    }
}

const fn stream_word(s: Stream) -> u32 {
    match s {
        Stream::Keys => 0,
        Stream::Values => 1,
    }
}

impl TableSink for TableWriter<'_> {
    fn set_levels(&mut self, stream: Stream, unit: usize, enc: &[f32], dec: &[f32]) -> Result<()> {
        if enc.len() != dec.len() {
            return Err(Error::ShapeMismatch {
                what: "decoding levels",
                expected: enc.len(),
                got: dec.len(),
            });
        }
        self.push(LEVELS, stream_word(stream), unit, Words::F32(enc), Words::F32(dec))
    }
    fn set_center(&mut self, head: usize, mean: &[f32]) -> Result<()> {
        self.push(CENTER, 0, head, Words::F32(mean), Words::F32(&[]))
    }
    fn set_balance(&mut self, head: usize, b: &[f32]) -> Result<()> {
        self.push(BALANCE, 0, head, Words::F32(b), Words::F32(&[]))
    }
    fn set_thresholds(&mut self, head: usize, lower: &[f32], upper: &[f32]) -> Result<()> {
        if lower.len() != upper.len() {
            return Err(Error::ShapeMismatch {
                what: "upper thresholds",
                expected: lower.len(),
                got: upper.len(),
            });
        }
        self.push(THRESHOLDS, 0, head, Words::F32(lower), Words::F32(upper))
    }
    fn set_permutation(&mut self, stream: Stream, head: usize, perm: &[u16], bounds: &[u16]) -> Result<()> {
        self.push(PERMUTATION, stream_word(stream), head, Words::U16(perm), Words::U16(bounds))
    }
}

/// Hands every record of `blob` to `sink` in order; returns the records applied. A failure stops at the
/// record that failed (the sink's own error, or [`Error::Malformed`] for a blob that does not parse);
/// records before it have been applied.
///
/// # Errors
/// [`Error::Malformed`] for a wrong magic or version, a count or length past the blob's end, a length over
/// the core's limits (`MAX_HEAD_DIM` channels, `MAX_LEVELS` levels), an unknown tag or stream, an index
/// word over `u16`; otherwise the sink's errors.
pub fn load_tables(sink: &mut impl TableSink, blob: &[u32]) -> Result<usize> {
    let bad = |what, at| Err(Error::Malformed { what, at });
    if blob.len() < HEADER_WORDS {
        return bad("shorter than its header", blob.len());
    }
    if blob[0] != MAGIC {
        return bad("no KVQT magic", 0);
    }
    if blob[1] != VERSION {
        return bad("version (this core reads 1)", 1);
    }
    let count = blob[2] as usize;
    let mut at = HEADER_WORDS;
    let mut perm = [0u16; MAX_HEAD_DIM];
    let mut bounds = [0u16; MAX_HEAD_DIM + 1];
    for _ in 0..count {
        let Some(h) = blob.get(at..at + RECORD_WORDS) else {
            return bad("record header past the end", at);
        };
        let (tag, stream, index, n, m) = (h[0], h[1], h[2] as usize, h[3] as usize, h[4] as usize);
        let stream = match stream {
            0 => Stream::Keys,
            1 => Stream::Values,
            _ => return bad("stream (0 keys, 1 values)", at + 1),
        };
        let limit = if tag == LEVELS { MAX_LEVELS } else { MAX_HEAD_DIM };
        if n > limit || m > MAX_HEAD_DIM + 1 || (tag != PERMUTATION && m != 0) {
            return bad("record length over the core's limits", at + 3);
        }
        let words = match tag {
            LEVELS | THRESHOLDS => 2 * n,
            CENTER | BALANCE => n,
            PERMUTATION => n + m,
            _ => return bad("record tag", at),
        };
        let body_at = at + RECORD_WORDS;
        let Some(body) = blob.get(body_at..body_at + words) else {
            return bad("record payload past the end", body_at);
        };
        let f: &[f32] = bytemuck::cast_slice(body);
        match tag {
            LEVELS => sink.set_levels(stream, index, &f[..n], &f[n..])?,
            CENTER => sink.set_center(index, f)?,
            BALANCE => sink.set_balance(index, f)?,
            THRESHOLDS => sink.set_thresholds(index, &f[..n], &f[n..])?,
            _ => {
                for (i, (&w, o)) in
                    body.iter().zip(perm[..n].iter_mut().chain(bounds[..m].iter_mut())).enumerate()
                {
                    *o = match u16::try_from(w) {
                        Ok(x) => x,
                        Err(_) => return bad("channel index over u16", body_at + i),
                    };
                }
                sink.set_permutation(stream, index, &perm[..n], &bounds[..m])?;
            }
        }
        at = body_at + words;
    }
    if at != blob.len() {
        return bad("words after the last record", at);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::{fill_tables_into, generic_configs};
    use crate::testutil::Rng;
    extern crate std;
    use std::vec;

    /// A blob written from the setter calls and loaded into a fresh cache leaves the same arena as the calls
    /// made directly, for every generic format (codebooks, centres, balance, thresholds, permutations).
    #[test]
    fn a_loaded_blob_sets_what_the_calls_set() {
        let mut with_tables = 0;
        for (name, cfg) in generic_configs(2, 64, 300) {
            let words = cfg.layout().unwrap().total_words;
            let (mut a, mut b) = (vec![0u32; words], vec![0u32; words]);
            let mut direct = Cache::new(cfg, &mut a).unwrap();
            fill_tables_into(&cfg, &mut direct, &mut Rng::new(3));
            let mut blob = vec![0u32; 1 << 16];
            let mut w = TableWriter::new(&mut blob).unwrap();
            fill_tables_into(&cfg, &mut w, &mut Rng::new(3));
            let n = w.finish();
            let mut loaded = Cache::new(cfg, &mut b).unwrap();
            let records = load_tables(&mut loaded, &blob[..n]).unwrap();
            with_tables += usize::from(records > 0);
            assert!(a == b, "{name}: {records} records");
        }
        assert!(with_tables >= 5, "{with_tables}");
    }

    /// Truncated, padded and corrupted blobs are errors (or, where a flipped word still parses, a table the
    /// cache checks), never a panic.
    #[test]
    fn bad_blobs_are_errors() {
        let (_, cfg) =
            generic_configs(2, 64, 300).into_iter().find(|(n, _)| *n == "nuq3-rope-outliers").unwrap();
        let mut blob = vec![0u32; 1 << 16];
        let mut w = TableWriter::new(&mut blob).unwrap();
        fill_tables_into(&cfg, &mut w, &mut Rng::new(5));
        let n = w.finish();
        let blob = &blob[..n];
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        assert!(load_tables(&mut cache, blob).is_ok());
        for cut in (0..n).step_by(7) {
            assert!(load_tables(&mut cache, &blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = blob.to_vec();
        long.push(0);
        assert!(matches!(load_tables(&mut cache, &long), Err(Error::Malformed { .. })));
        let mut rng = Rng::new(9);
        for _ in 0..2000 {
            let mut bad = blob.to_vec();
            let i = (rng.next_u64() % n as u64) as usize;
            bad[i] = match rng.next_u64() % 4 {
                0 => u32::MAX,
                1 => bad[i] ^ (1 << (rng.next_u64() % 32)),
                2 => 1 << 20,
                _ => 0,
            };
            let _ = load_tables(&mut cache, &bad);
        }
        let mut bad = blob.to_vec();
        bad[0] ^= 1;
        assert!(matches!(load_tables(&mut cache, &bad), Err(Error::Malformed { at: 0, .. })));
        assert!(matches!(TableWriter::new(&mut [0u32; 2]), Err(Error::BufferTooSmall { .. })));
        let mut small = [0u32; 8];
        let mut w = TableWriter::new(&mut small).unwrap();
        assert!(matches!(w.set_center(0, &[0.0; 64]), Err(Error::BufferTooSmall { .. })));
    }
}
