//! A cache's calibration tables: typed views of the `tables` regions ([`super::layout::Tables`]), their
//! defaults, and the checked setters a runtime calls once after [`super::Cache::new`] with what calibration
//! measured.
//!
//! Defaults make an uncalibrated cache well defined: centres 0, balancing factors 1, the uniform levels
//! `-1 + 2i/(L-1)` for codebooks, no outlier thresholds (`-inf, inf`: no key outliers), the identity
//! permutation with equal groups. [`super::Cache::reset`] keeps the tables.

use super::layout::{Region, Tables};
use super::{Cache, Stream};
use crate::cache::config::{Axis, Precision, QuantSpec};
use crate::error::{Error, Result};

/// Read-only typed views of one stream's tables.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TableView<'c> {
    pub(crate) rope: &'c [f32],
    pub(crate) center: &'c [f32],
    pub(crate) balance: &'c [f32],
    pub(crate) levels: &'c [f32],
    pub(crate) thresholds: &'c [f32],
    pub(crate) perm: &'c [u16],
    pub(crate) bounds: &'c [u16],
}

impl<'c> TableView<'c> {
    pub(crate) fn new(arena: &'c [u32], t: &Tables) -> Self {
        let f = |r: Region| -> &'c [f32] { bytemuck::cast_slice(&arena[r.offset..r.end()]) };
        let u = |r: Region| -> &'c [u16] { bytemuck::cast_slice(&arena[r.offset..r.end()]) };
        Self {
            rope: f(t.rope),
            center: f(t.center),
            balance: f(t.balance),
            levels: f(t.levels),
            thresholds: f(t.thresholds),
            perm: u(t.perm),
            bounds: u(t.bounds),
        }
    }

    /// Encoding and decoding levels of codebook unit `unit` (a head, or `head * d + c` for per-channel
    /// keys) with `n` levels.
    pub(crate) fn unit_levels(&self, unit: usize, n: usize) -> Option<(&'c [f32], &'c [f32])> {
        if self.levels.is_empty() {
            return None;
        }
        let t = &self.levels[unit * 2 * n..][..2 * n];
        Some((&t[..n], &t[n..]))
    }

    /// Permutation and group bounds of head `h` (empty for unpermuted streams).
    pub(crate) fn order(&self, h: usize, d: usize, groups: usize) -> (&'c [u16], &'c [u16]) {
        if self.perm.is_empty() {
            return (&[], &[]);
        }
        (&self.perm[h * d..][..d], &self.bounds[h * (groups + 1)..][..groups + 1])
    }
}

fn f32s(arena: &mut [u32], r: Region) -> &mut [f32] {
    bytemuck::cast_slice_mut(&mut arena[r.offset..r.end()])
}

fn u16s(arena: &mut [u32], r: Region) -> &mut [u16] {
    bytemuck::cast_slice_mut(&mut arena[r.offset..r.end()])
}

fn uniform_levels(out: &mut [f32]) {
    let n = out.len();
    for (i, v) in out.iter_mut().enumerate() {
        *v = -1.0 + 2.0 * i as f32 / (n - 1).max(1) as f32;
    }
}

fn check_finite(x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { index }),
        None => Ok(()),
    }
}

impl Cache<'_> {
    /// Writes every table's default (see the module docs) and the RoPE offsets.
    pub(super) fn init_tables(&mut self) -> Result<()> {
        let (heads, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        for s in [Stream::Keys, Stream::Values] {
            let (p, l) = self.stream_cfg(s);
            let Precision::Quant(q) = p else { continue };
            let t = l.tables;
            if t.rope.words > 0
                && let Some(rope) = self.cfg.transform.rope
            {
                rope.offsets_table(d, q.group, f32s(self.arena, t.rope))?;
            }
            f32s(self.arena, t.center).fill(0.0);
            f32s(self.arena, t.balance).fill(1.0);
            let n = q.width.levels() as usize;
            for unit in f32s(self.arena, t.levels).chunks_exact_mut(n) {
                uniform_levels(unit);
            }
            for pair in f32s(self.arena, t.thresholds).chunks_exact_mut(2) {
                pair.copy_from_slice(&[f32::NEG_INFINITY, f32::INFINITY]);
            }
            if q.permuted {
                let groups = d / q.group;
                for h in 0..heads {
                    for (i, v) in u16s(self.arena, t.perm)[h * d..][..d].iter_mut().enumerate() {
                        *v = i as u16;
                    }
                    let b = &mut u16s(self.arena, t.bounds)[h * (groups + 1)..][..groups + 1];
                    for (j, v) in b.iter_mut().enumerate() {
                        *v = (j * q.group) as u16;
                    }
                }
            }
        }
        Ok(())
    }

    fn quant_stream(&self, s: Stream) -> Result<(QuantSpec, Tables)> {
        let (p, l) = self.stream_cfg(s);
        match p {
            Precision::Quant(q) => Ok((q, l.tables)),
            Precision::F16 => Err(Error::InvalidConfig { what: "table of an f16 stream", value: 0 }),
        }
    }

    fn check_head(&self, head: usize) -> Result<()> {
        if head >= self.cfg.kv_heads {
            return Err(Error::OutOfBounds { index: head, len: self.cfg.kv_heads });
        }
        Ok(())
    }

    /// Sets the codebook levels of one unit of a codebook stream: `unit` is the KV head, or
    /// `head * head_dim + channel` for per-channel keys. `enc` are the encoding levels (strictly
    /// increasing, in the normalized `[-1, 1]` space of a group), `dec` the reconstruction levels (Q-Norm's
    /// corrected table, or `enc` itself).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a stream without a codebook, a level not strictly increasing, or a
    /// level outside `[-4, 4]` (a table far outside a group's range is a calibration bug);
    /// [`Error::OutOfBounds`] for a unit past the stream's; [`Error::ShapeMismatch`] unless both tables
    /// hold the width's number of levels; [`Error::NonFinite`].
    pub fn set_levels(&mut self, stream: Stream, unit: usize, enc: &[f32], dec: &[f32]) -> Result<()> {
        let (q, t) = self.quant_stream(stream)?;
        if !q.codebook {
            return Err(Error::InvalidConfig { what: "levels of a stream without a codebook", value: 0 });
        }
        let n = q.width.levels() as usize;
        let units = if q.axis == Axis::PerChannel {
            self.cfg.kv_heads * self.cfg.head_dim
        } else {
            self.cfg.kv_heads
        };
        if unit >= units {
            return Err(Error::OutOfBounds { index: unit, len: units });
        }
        for x in [enc, dec] {
            if x.len() != n {
                return Err(Error::ShapeMismatch { what: "codebook levels", expected: n, got: x.len() });
            }
            check_finite(x)?;
            if let Some(i) = x.iter().position(|v| v.abs() > 4.0) {
                return Err(Error::InvalidConfig {
                    what: "codebook level outside [-4, 4] at index",
                    value: i,
                });
            }
        }
        if let Some(i) = enc.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::InvalidConfig {
                what: "codebook levels not increasing at index",
                value: i + 1,
            });
        }
        let dst = &mut f32s(self.arena, t.levels)[unit * 2 * n..][..2 * n];
        dst[..n].copy_from_slice(enc);
        dst[n..].copy_from_slice(dec);
        Ok(())
    }

    /// Sets head `head`'s per-channel key means (in the stored basis, after the key rotations; subtracted
    /// before quantizing).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the cache does not centre keys; [`Error::OutOfBounds`];
    /// [`Error::ShapeMismatch`] unless `head_dim` values; [`Error::NonFinite`]; [`Error::ParamOverflow`]
    /// for a mean above [`super::MAX_ABS`].
    pub fn set_center(&mut self, head: usize, mean: &[f32]) -> Result<()> {
        if !self.cfg.transform.center_keys {
            return Err(Error::InvalidConfig {
                what: "key centres of a cache that does not centre",
                value: 0,
            });
        }
        self.set_per_channel(head, mean, |l| l.keys.tables.center, |v| v.abs() <= super::MAX_ABS)
    }

    /// Sets head `head`'s per-channel key balancing factors `b` (keys are multiplied by `b`, queries divided;
    /// MiKV's `sqrt(max|q| / max|k|)`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the cache does not balance keys, or for a factor outside
    /// `[1/64, 64]`; otherwise as [`Cache::set_center`].
    pub fn set_balance(&mut self, head: usize, b: &[f32]) -> Result<()> {
        if !self.cfg.transform.balance_keys {
            return Err(Error::InvalidConfig {
                what: "key balance of a cache that does not balance",
                value: 0,
            });
        }
        self.set_per_channel(head, b, |l| l.keys.tables.balance, |v| (1.0 / 64.0..=64.0).contains(&v))
    }

    fn set_per_channel(
        &mut self,
        head: usize,
        x: &[f32],
        region: impl Fn(&super::Layout) -> Region,
        ok: impl Fn(f32) -> bool,
    ) -> Result<()> {
        self.check_head(head)?;
        let d = self.cfg.head_dim;
        if x.len() != d {
            return Err(Error::ShapeMismatch { what: "per-channel table", expected: d, got: x.len() });
        }
        check_finite(x)?;
        if let Some(i) = x.iter().position(|&v| !ok(v)) {
            return Err(Error::InvalidConfig {
                what: "per-channel table value out of range at index",
                value: i,
            });
        }
        let r = region(&self.layout);
        f32s(self.arena, r)[head * d..][..d].copy_from_slice(x);
        Ok(())
    }

    /// Sets head `head`'s per-channel outlier thresholds of per-channel keys (in the stored basis): a value
    /// below `lower[c]` or above `upper[c]` is an outlier candidate (KVQuant's calibrated per-channel
    /// thresholds, methods.md §2.2).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the key stream has no per-channel outliers, or where `lower > upper`;
    /// [`Error::OutOfBounds`], [`Error::ShapeMismatch`], [`Error::NonFinite`].
    pub fn set_thresholds(&mut self, head: usize, lower: &[f32], upper: &[f32]) -> Result<()> {
        self.check_head(head)?;
        let (q, t) = self.quant_stream(Stream::Keys)?;
        if q.outliers == 0 || q.axis != Axis::PerChannel {
            return Err(Error::InvalidConfig {
                what: "thresholds of keys without per-channel outliers",
                value: 0,
            });
        }
        let d = self.cfg.head_dim;
        for x in [lower, upper] {
            if x.len() != d {
                return Err(Error::ShapeMismatch { what: "outlier thresholds", expected: d, got: x.len() });
            }
            check_finite(x)?;
        }
        if let Some(i) = lower.iter().zip(upper).position(|(a, b)| a > b) {
            return Err(Error::InvalidConfig {
                what: "outlier thresholds (lower > upper) at channel",
                value: i,
            });
        }
        let dst = &mut f32s(self.arena, t.thresholds)[head * 2 * d..][..2 * d];
        for (c, pair) in dst.chunks_exact_mut(2).enumerate() {
            pair.copy_from_slice(&[lower[c], upper[c]]);
        }
        Ok(())
    }

    /// Sets head `head`'s channel permutation and group bounds of a permuted stream: permuted position `i`
    /// holds stored channel `perm[i]`; group `j` is positions `bounds[j]..bounds[j + 1]` (`head_dim / G`
    /// groups, `bounds[0] = 0`, non-decreasing, last `head_dim`; a group may be empty, as SKVQ's
    /// clustering can leave one).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unpermuted stream or bad bounds; [`Error::InvalidPermutation`];
    /// [`Error::OutOfBounds`], [`Error::ShapeMismatch`].
    pub fn set_permutation(
        &mut self,
        stream: Stream,
        head: usize,
        perm: &[u16],
        bounds: &[u16],
    ) -> Result<()> {
        self.check_head(head)?;
        let (q, t) = self.quant_stream(stream)?;
        if !q.permuted {
            return Err(Error::InvalidConfig { what: "permutation of an unpermuted stream", value: 0 });
        }
        let d = self.cfg.head_dim;
        let groups = d / q.group;
        if perm.len() != d {
            return Err(Error::ShapeMismatch { what: "channel permutation", expected: d, got: perm.len() });
        }
        if bounds.len() != groups + 1 {
            return Err(Error::ShapeMismatch {
                what: "group bounds",
                expected: groups + 1,
                got: bounds.len(),
            });
        }
        let mut seen = [0u64; 8];
        for (i, &p) in perm.iter().enumerate() {
            let p = usize::from(p);
            if p >= d || p >= 512 || seen[p / 64] & (1 << (p % 64)) != 0 {
                return Err(Error::InvalidPermutation { index: i });
            }
            seen[p / 64] |= 1 << (p % 64);
        }
        let ok = bounds[0] == 0
            && usize::from(bounds[groups]) == d
            && bounds.windows(2).all(|w| w[0] <= w[1])
            && bounds.windows(2).all(|w| usize::from(w[1] - w[0]) <= super::config::MAX_GROUP);
        if !ok {
            return Err(Error::InvalidConfig {
                what: "group bounds (0, non-decreasing, head_dim)",
                value: groups,
            });
        }
        u16s(self.arena, t.perm)[head * d..][..d].copy_from_slice(perm);
        u16s(self.arena, t.bounds)[head * (groups + 1)..][..groups + 1].copy_from_slice(bounds);
        Ok(())
    }
}
