//! Non-uniform codebook quantizer: KVQuant's nuqX (methods.md §2.2-2.4).
//!
//! A [`Codebook`] is a sorted table of `2^b` levels (three for ternary) in a normalized space, usually
//! `[-1, 1]`. A vector (one key channel, one value token) is normalized by its outlier thresholds,
//! `a = (x - zero) / range` with `zero = (upper + lower) / 2` and `range = (upper - lower) / 2`
//! ([`VectorNorm`]), each `a` is encoded as the index of its nearest level, and decoded as
//! `x_hat = level'[code] * range + zero`, where `level'` is the table after the optional Q-Norm
//! correction (§2.4): `level' = level * normscale + normoffset`, chosen so the reconstructed calibration
//! data has the mean and standard deviation of the original.
//!
//! The tables come from [`kmeans_1d`], a deterministic weighted 1-D k-means (Lloyd's algorithm from
//! weighted-quantile seeds) over caller-provided points; calibration passes Fisher information as the
//! weights, so the objective is KVQuant's `sum_i F_ii (a_i - Q(a_i))^2` (§2.3). sklearn's `KMeans` with
//! `random_state=0` is replaced by fixed seeds so that the same data always gives the same table.

use super::param::{ParamFormat, Round};
use crate::error::{Error, Result, need};
use crate::pack::{self, Width};
use crate::view::{Strided, StridedMut};

/// Most levels a codebook holds (4-bit codes; KVQuant uses 2, 3 and 4).
pub const MAX_LEVELS: usize = 16;

/// Codes are staged through a stack buffer of this many before packing.
const CHUNK: usize = 64;

/// A sorted table of levels in normalized space, with its Q-Norm-corrected reconstruction table.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Codebook {
    width: Width,
    /// Encoding levels, strictly increasing; entries past `width.levels()` are unused.
    levels: [f32; MAX_LEVELS],
    /// Decoding levels: `levels` after Q-Norm (equal to `levels` without it).
    recon: [f32; MAX_LEVELS],
}

/// Per-vector normalization from outlier thresholds (methods.md §2.2), stored in a [`ParamFormat`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VectorNorm {
    /// Centre of the thresholds, `(upper + lower) / 2`.
    pub zero: f32,
    /// Half-width of the thresholds, `(upper - lower) / 2`.
    pub range: f32,
}

impl VectorNorm {
    /// The normalization for thresholds `lower <= upper`, with both numbers rounded to `fmt`.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for a non-finite threshold, [`Error::InvalidConfig`] if `lower > upper`,
    /// [`Error::ParamOverflow`] if a parameter does not fit `fmt`.
    pub fn from_thresholds(lower: f32, upper: f32, fmt: ParamFormat) -> Result<Self> {
        if !lower.is_finite() || !upper.is_finite() {
            return Err(Error::NonFinite { index: usize::from(lower.is_finite()) });
        }
        if lower > upper {
            return Err(Error::InvalidConfig { what: "thresholds (lower > upper)", value: 0 });
        }
        let zero = fmt.round_f64((f64::from(upper) + f64::from(lower)) / 2.0, Round::Nearest)?;
        let range = fmt.round_f64((f64::from(upper) - f64::from(lower)) / 2.0, Round::Up)?;
        Ok(Self { zero, range })
    }

    /// `x` in normalized space (0 when the range is empty).
    #[inline]
    pub fn normalize(&self, x: f32) -> f32 {
        if self.range == 0.0 { 0.0 } else { (x - self.zero) / self.range }
    }

    /// Normalized `a` back in the vector's own space.
    #[inline]
    pub fn denormalize(&self, a: f32) -> f32 {
        a * self.range + self.zero
    }
}

impl Codebook {
    /// A codebook for `width` from `levels` (any order; they are sorted).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless there are exactly `width.levels()` levels;
    /// [`Error::InvalidConfig`] for widths above 4 bits; [`Error::NonFinite`] for a non-finite level;
    /// [`Error::InvalidConfig`] if two levels are equal.
    pub fn new(width: Width, levels: &[f32]) -> Result<Self> {
        let n = width.levels() as usize;
        if n > MAX_LEVELS {
            return Err(Error::InvalidConfig { what: "codebook width (bits)", value: width.bits() as usize });
        }
        if levels.len() != n {
            return Err(Error::ShapeMismatch { what: "codebook levels", expected: n, got: levels.len() });
        }
        if let Some(index) = levels.iter().position(|l| !l.is_finite()) {
            return Err(Error::NonFinite { index });
        }
        let mut sorted = [0.0f32; MAX_LEVELS];
        sorted[..n].copy_from_slice(levels);
        sorted[..n].sort_unstable_by(f32::total_cmp);
        if let Some(i) = sorted[..n].windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::InvalidConfig { what: "codebook level repeated at index", value: i + 1 });
        }
        Ok(Self { width, levels: sorted, recon: sorted })
    }

    /// Code width.
    pub fn width(&self) -> Width {
        self.width
    }

    /// The encoding levels, ascending.
    pub fn levels(&self) -> &[f32] {
        &self.levels[..self.width.levels() as usize]
    }

    /// The decoding levels (after Q-Norm, if applied).
    pub fn recon(&self) -> &[f32] {
        &self.recon[..self.width.levels() as usize]
    }

    /// Index of the level nearest to `a`; on an exact tie, the lower one.
    ///
    /// The nearest level is one of the two neighbours of `a` in the sorted table, found by binary search,
    /// then decided by distance: this equals a brute-force scan (tested) without its `2^b` comparisons.
    #[inline]
    pub fn encode(&self, a: f32) -> u8 {
        let lv = self.levels();
        let i = lv.partition_point(|&l| l <= a); // first level above a
        if i == 0 {
            return 0;
        }
        if i == lv.len() {
            return (lv.len() - 1) as u8;
        }
        if a - lv[i - 1] <= lv[i] - a { (i - 1) as u8 } else { i as u8 }
    }

    /// The reconstruction of `code` in normalized space.
    #[inline]
    pub fn decode(&self, code: u8) -> f32 {
        self.recon[usize::from(code) & (MAX_LEVELS - 1)]
    }

    /// This codebook with Q-Norm fitted on normalized calibration data `data` (non-outliers only):
    /// with `(m1, s1)` the mean and standard deviation of `data` and `(m2, s2)` those of its rounded
    /// values, `normscale = s1 / s2` and `normoffset = m1 - m2 * s1 / s2` (methods.md §2.4).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no data, [`Error::NonFinite`] for a non-finite value.
    pub fn with_qnorm(&self, data: &[f32]) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::EmptyInput { what: "Q-Norm calibration data" });
        }
        let (mut s1, mut s2, mut q1, mut q2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (index, &a) in data.iter().enumerate() {
            if !a.is_finite() {
                return Err(Error::NonFinite { index });
            }
            let r = f64::from(self.levels[usize::from(self.encode(a))]);
            s1 += f64::from(a);
            q1 += f64::from(a) * f64::from(a);
            s2 += r;
            q2 += r * r;
        }
        let n = data.len() as f64;
        let (m1, m2) = (s1 / n, s2 / n);
        let sd1 = libm::sqrt((q1 / n - m1 * m1).max(0.0));
        let sd2 = libm::sqrt((q2 / n - m2 * m2).max(0.0));
        let scale = if sd2 > 0.0 { sd1 / sd2 } else { 1.0 };
        let offset = m1 - m2 * scale;
        let mut out = *self;
        for (r, &l) in out.recon.iter_mut().zip(&self.levels).take(self.width.levels() as usize) {
            *r = (f64::from(l) * scale + offset) as f32;
        }
        Ok(out)
    }

    /// Quantizes `src` under `norm` into codes `start..start + src.len()` of `words`.
    /// Values outside the thresholds take the nearest extreme level (see [`crate::quant::outliers`]
    /// to keep them exactly).
    ///
    /// # Errors
    /// [`Error::NonFinite`] (nothing written), [`Error::BufferTooSmall`].
    pub fn quantize(
        &self,
        src: Strided<'_>,
        norm: &VectorNorm,
        words: &mut [u32],
        start: usize,
    ) -> Result<()> {
        need("words", self.width.words_for(start + src.len()), words.len())?;
        if let Some(index) = src.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { index });
        }
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < src.len() {
            let n = CHUNK.min(src.len() - done);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.encode(norm.normalize(src.get(done + i)));
            }
            pack::pack(&buf[..n], self.width, words, start + done)?;
            done += n;
        }
        Ok(())
    }

    /// Reconstructs codes `start..start + out.len()` of `words` under `norm` into `out`.
    ///
    /// # Errors
    /// The errors of [`pack::unpack`].
    pub fn dequantize(
        &self,
        norm: &VectorNorm,
        words: &[u32],
        start: usize,
        mut out: StridedMut<'_>,
    ) -> Result<()> {
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < out.len() {
            let n = CHUNK.min(out.len() - done);
            pack::unpack(words, self.width, start + done, &mut buf[..n])?;
            for (i, &c) in buf[..n].iter().enumerate() {
                *out.at(done + i) = norm.denormalize(self.decode(c));
            }
            done += n;
        }
        Ok(())
    }
}

/// One calibration value and its weight (sensitivity) for [`kmeans_1d`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WeightedPoint {
    /// The value (normalized).
    pub value: f32,
    /// Its weight, `>= 0`.
    pub weight: f32,
}

/// What [`kmeans_1d`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KMeansReport {
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Final weighted objective `sum_i w_i * min_j (v_i - c_j)^2`.
    pub objective: f64,
    /// Whether the centroids stopped moving before `max_iter`.
    pub converged: bool,
}

/// Weighted 1-D k-means: fills `centroids` (its length is k) with ascending cluster centres of `points`.
///
/// Sorts `points` by value in place (the caller's buffer is the only memory used), seeds centroid `j` at
/// the weighted `(j + 1/2) / k` quantile, then runs Lloyd iterations ([`kmeans_1d_step`]) until no
/// centroid moves or `max_iter` is reached. Deterministic: the same points give the same centroids.
///
/// # Errors
/// [`Error::EmptyInput`] for no points, no centroids or zero total weight; [`Error::NonFinite`] for a
/// non-finite value or weight; [`Error::InvalidConfig`] for a negative weight.
pub fn kmeans_1d(
    points: &mut [WeightedPoint],
    centroids: &mut [f32],
    max_iter: usize,
) -> Result<KMeansReport> {
    kmeans_1d_init(points, centroids)?;
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        iterations += 1;
        if !kmeans_1d_step(points, centroids) {
            converged = true;
            break;
        }
    }
    Ok(KMeansReport { iterations, objective: kmeans_1d_objective(points, centroids), converged })
}

/// Validates and sorts `points` and seeds `centroids` at weighted quantiles (see [`kmeans_1d`]).
///
/// # Errors
/// As [`kmeans_1d`].
pub fn kmeans_1d_init(points: &mut [WeightedPoint], centroids: &mut [f32]) -> Result<()> {
    if points.is_empty() {
        return Err(Error::EmptyInput { what: "k-means points" });
    }
    if centroids.is_empty() {
        return Err(Error::EmptyInput { what: "k-means centroids" });
    }
    let mut total = 0.0f64;
    for (index, p) in points.iter().enumerate() {
        if !p.value.is_finite() || !p.weight.is_finite() {
            return Err(Error::NonFinite { index });
        }
        if p.weight < 0.0 {
            return Err(Error::InvalidConfig { what: "negative k-means weight at index", value: index });
        }
        total += f64::from(p.weight);
    }
    if total <= 0.0 {
        return Err(Error::EmptyInput { what: "k-means weight" });
    }
    points.sort_unstable_by(|a, b| a.value.total_cmp(&b.value));
    let k = centroids.len();
    let (mut acc, mut i) = (0.0f64, 0usize);
    for (j, c) in centroids.iter_mut().enumerate() {
        let target = (j as f64 + 0.5) / k as f64 * total;
        while i + 1 < points.len() && acc + f64::from(points[i].weight) < target {
            acc += f64::from(points[i].weight);
            i += 1;
        }
        *c = points[i].value;
    }
    Ok(())
}

/// One Lloyd iteration over points sorted by value: assigns each point to its nearest centroid (ties to
/// the lower), moves each centroid to its cluster's weighted mean, re-seeds an empty (or weightless)
/// cluster at the point that contributes most to the objective, and keeps the centroids sorted.
/// Returns whether any centroid moved. The objective never rises (see the tests for the bound).
pub fn kmeans_1d_step(points: &[WeightedPoint], centroids: &mut [f32]) -> bool {
    let k = centroids.len();
    let mut moved = false;
    let mut empty = 0usize;
    // Points are sorted and centroids ascending, so cluster j is a contiguous run of points, ending at the
    // midpoint between the *old* centroids j and j+1; `old` carries old c[j] past its update.
    let mut start = 0;
    let mut old = centroids.first().copied().unwrap_or(0.0);
    for j in 0..k {
        let end = if j + 1 == k {
            points.len()
        } else {
            let mid = (f64::from(old) + f64::from(centroids[j + 1])) / 2.0;
            start + points[start..].partition_point(|p| f64::from(p.value) <= mid)
        };
        let (mut sw, mut swx) = (0.0f64, 0.0f64);
        for p in &points[start..end] {
            sw += f64::from(p.weight);
            swx += f64::from(p.weight) * f64::from(p.value);
        }
        if j + 1 < k {
            old = centroids[j + 1];
        }
        if sw > 0.0 {
            let c = (swx / sw) as f32;
            moved |= c != centroids[j];
            centroids[j] = c;
        } else {
            centroids[j] = f32::NAN; // marked empty; `nearest_sq` ignores NaN centroids
            empty += 1;
        }
        start = end;
    }
    // Re-seed empty clusters, one at a time, at the point with the largest weighted squared distance to
    // its nearest centroid: that point's cost drops to zero and no other point's cost rises. With no such
    // point (every point sits on a centroid) the slot takes the largest value, a harmless duplicate.
    for _ in 0..empty {
        let mut best = (0.0f64, points[points.len() - 1].value);
        for p in points {
            let d = nearest_sq(centroids, p.value) * f64::from(p.weight);
            if d > best.0 {
                best = (d, p.value);
            }
        }
        if let Some(c) = centroids.iter_mut().find(|c| c.is_nan()) {
            *c = best.1;
            moved = true;
        }
    }
    centroids.sort_unstable_by(f32::total_cmp);
    moved
}

/// Squared distance from `v` to its nearest centroid.
fn nearest_sq(centroids: &[f32], v: f32) -> f64 {
    centroids
        .iter()
        .map(|&c| {
            let d = f64::from(v) - f64::from(c);
            d * d
        })
        .fold(f64::INFINITY, f64::min)
}

/// The weighted objective `sum_i w_i * min_j (v_i - c_j)^2`.
pub fn kmeans_1d_objective(points: &[WeightedPoint], centroids: &[f32]) -> f64 {
    points.iter().map(|p| f64::from(p.weight) * nearest_sq(centroids, p.value)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn brute(cb: &Codebook, a: f32) -> u8 {
        let mut best = 0;
        for (j, &l) in cb.levels().iter().enumerate() {
            if (a - l).abs() < (a - cb.levels()[best]).abs() {
                best = j;
            }
        }
        best as u8
    }

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    #[test]
    fn nearest_level_equals_brute_force() {
        let nf2 = Codebook::new(Width::B2, &[-1.0, -0.34, 0.28, 1.0]).unwrap();
        let u3 = Codebook::new(Width::B3, &[-1.0, -0.7, -0.45, -0.2, 0.0, 0.25, 0.6, 1.0]).unwrap();
        let t = Codebook::new(Width::Ternary, &[0.5, -1.0, 0.0]).unwrap();
        let lv4: Vec<f32> = (0..16).map(|i| libm::sinf(i as f32 * 0.19 - 1.4)).collect();
        let u4 = Codebook::new(Width::B4, &lv4).unwrap();
        assert_eq!(t.levels(), &[-1.0, 0.0, 0.5]);
        for cb in [nf2, u3, t, u4] {
            let mut r = lcg(7);
            for _ in 0..20_000 {
                let a = (r() - 0.5) * 3.0;
                assert_eq!(cb.encode(a), brute(&cb, a), "a={a}");
            }
            // Levels and midpoints exactly.
            let lv = cb.levels();
            for (j, &l) in lv.iter().enumerate() {
                assert_eq!(cb.encode(l), j as u8);
            }
            for w in lv.windows(2) {
                let m = (w[0] + w[1]) / 2.0;
                assert_eq!(cb.encode(m), brute(&cb, m), "mid {m}");
            }
        }
    }

    #[test]
    fn bad_tables_are_errors() {
        assert!(matches!(Codebook::new(Width::B2, &[0.0, 1.0]), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(Codebook::new(Width::B2, &[0.0, 1.0, 1.0, 2.0]), Err(Error::InvalidConfig { .. })));
        assert!(matches!(Codebook::new(Width::B8, &[0.0; 256]), Err(Error::InvalidConfig { .. })));
        assert_eq!(Codebook::new(Width::B1, &[0.0, f32::NAN]), Err(Error::NonFinite { index: 1 }));
    }

    #[test]
    fn round_trip_error_is_half_the_local_gap() {
        let cb = Codebook::new(Width::B3, &[-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0]).unwrap();
        let mut r = lcg(3);
        let xs: Vec<f32> = (0..100).map(|_| 2.0 + 6.0 * r()).collect(); // within thresholds [2, 8]
        let norm = VectorNorm::from_thresholds(2.0, 8.0, ParamFormat::F16).unwrap();
        assert_eq!(norm, VectorNorm { zero: 5.0, range: 3.0 });
        let mut w = vec![0u32; Width::B3.words_for(105)];
        cb.quantize(Strided::contiguous(&xs), &norm, &mut w, 5).unwrap();
        let mut back = vec![0.0; 100];
        cb.dequantize(&norm, &w, 5, StridedMut::contiguous(&mut back)).unwrap();
        for (&x, &y) in xs.iter().zip(&back) {
            // Half the largest gap between levels, in the vector's units, plus f32 rounding.
            assert!((x - y).abs() <= 0.2 * 3.0 + 1e-5, "x={x} y={y}");
            assert_eq!(y, norm.denormalize(cb.decode(cb.encode(norm.normalize(x)))));
        }
    }

    #[test]
    fn qnorm_matches_mean_and_spread() {
        let cb = Codebook::new(Width::B2, &[-0.9, -0.3, 0.3, 0.9]).unwrap();
        let mut r = lcg(11);
        let data: Vec<f32> = (0..5000).map(|_| (r() - 0.3) * 1.2).collect();
        let q = cb.with_qnorm(&data).unwrap();
        let stats = |v: &mut dyn Iterator<Item = f64>| {
            let (mut n, mut s, mut ss) = (0.0, 0.0, 0.0);
            for x in v {
                n += 1.0;
                s += x;
                ss += x * x;
            }
            (s / n, libm::sqrt(ss / n - (s / n) * (s / n)))
        };
        let (m1, s1) = stats(&mut data.iter().map(|&a| f64::from(a)));
        let (m2, s2) = stats(&mut data.iter().map(|&a| f64::from(q.decode(q.encode(a)))));
        // The correction is affine in the levels, so the moments match up to f32 storage of the levels.
        assert!((m1 - m2).abs() < 1e-6, "{m1} {m2}");
        assert!((s1 - s2).abs() < 1e-6, "{s1} {s2}");
        // Encoding still uses the original levels.
        assert_eq!(q.levels(), cb.levels());
        assert_ne!(q.recon(), cb.recon());
    }

    fn planted(seed: u64) -> (Vec<WeightedPoint>, [f32; 4]) {
        let centers = [-0.8f32, -0.1, 0.35, 0.9];
        let mut r = lcg(seed);
        let mut pts = Vec::new();
        for i in 0..2000 {
            let c = centers[i % 4];
            pts.push(WeightedPoint { value: c + (r() - 0.5) * 0.05, weight: 0.1 + r() });
        }
        (pts, centers)
    }

    #[test]
    fn kmeans_recovers_planted_clusters() {
        let (mut pts, centers) = planted(5);
        let mut c = [0.0f32; 4];
        let rep = kmeans_1d(&mut pts, &mut c, 50).unwrap();
        assert!(rep.converged);
        for (got, want) in c.iter().zip(centers) {
            // The noise is +-0.025 around each centre; a weighted mean stays inside it.
            assert!((got - want).abs() < 0.025, "{c:?}");
        }
        // Deterministic.
        let (mut pts2, _) = planted(5);
        pts2.reverse();
        let mut c2 = [0.0f32; 4];
        kmeans_1d(&mut pts2, &mut c2, 50).unwrap();
        assert_eq!(c, c2);
    }

    /// Rounding the f64 cluster means to f32 can raise the objective by at most
    /// `sum_j W_j * (|c_j| 2^-24)^2`; f64 summation adds at most `n * 2^-53` relative.
    fn slack(points: &[WeightedPoint], c: &[f32], obj: f64) -> f64 {
        let w: f64 = points.iter().map(|p| f64::from(p.weight)).sum();
        let cmax = c.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs())));
        w * (cmax * libm::ldexp(1.0, -24)).powi(2) + points.len() as f64 * f64::EPSILON * obj
    }

    #[test]
    fn kmeans_objective_never_rises() {
        for seed in 0..20u64 {
            let mut r = lcg(seed);
            let mut pts: Vec<WeightedPoint> = (0..500)
                .map(|_| WeightedPoint { value: (r() - 0.5) * (1.0 + 3.0 * r()), weight: r() * r() })
                .collect();
            let mut c = vec![0.0f32; 2 + seed as usize % 15];
            kmeans_1d_init(&mut pts, &mut c).unwrap();
            let mut prev = kmeans_1d_objective(&pts, &c);
            for _ in 0..30 {
                let moved = kmeans_1d_step(&pts, &mut c);
                let obj = kmeans_1d_objective(&pts, &c);
                assert!(obj <= prev + slack(&pts, &c, prev), "seed {seed}: {obj} > {prev}");
                assert!(c.windows(2).all(|w| w[0] <= w[1]));
                prev = obj;
                if !moved {
                    break;
                }
            }
        }
    }

    #[test]
    fn kmeans_bad_input() {
        let mut c = [0.0f32; 2];
        assert!(matches!(kmeans_1d(&mut [], &mut c, 5), Err(Error::EmptyInput { .. })));
        let mut p = [WeightedPoint { value: 1.0, weight: 0.0 }];
        assert!(matches!(kmeans_1d(&mut p, &mut c, 5), Err(Error::EmptyInput { .. })));
        let mut p =
            [WeightedPoint { value: 1.0, weight: 1.0 }, WeightedPoint { value: f32::NAN, weight: 1.0 }];
        assert_eq!(kmeans_1d(&mut p, &mut c, 5), Err(Error::NonFinite { index: 1 }));
        let mut p = [WeightedPoint { value: 1.0, weight: -1.0 }];
        assert!(matches!(kmeans_1d(&mut p, &mut c, 5), Err(Error::InvalidConfig { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 256 }, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn prop_encode_is_nearest(raw in proptest::collection::btree_set(-1000i32..1000, 8), a in -1.5f32..1.5) {
            let lv: Vec<f32> = raw.iter().map(|&i| i as f32 / 1000.0).collect();
            let cb = Codebook::new(Width::B3, &lv).unwrap();
            prop_assert_eq!(cb.encode(a), brute(&cb, a));
        }
    }
}
