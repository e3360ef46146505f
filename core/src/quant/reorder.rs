//! Channel reordering (SKVQ, methods.md §3.1-3.2).
//!
//! Channels with similar ranges are gathered next to each other before per-token group quantization, so
//! each group's min-max range fits its members. A [`ChannelOrder`] is a permutation of the `n` channels,
//! its inverse, and the boundaries of the variable-size groups in permuted order:
//!
//! ```text
//! permuted position i holds original channel perm[i];  original channel c sits at position inv[c]
//! group j = permuted positions bounds[j] .. bounds[j+1]
//! ```
//!
//! [`cluster_channels`] builds one from calibration statistics: a deterministic k-means of the channels'
//! `(min, max)` points (SKVQ's `KMeans(n_cluster).fit(stack(min, max))`, with farthest-point seeds in
//! place of sklearn's random `k-means++`), clusters ordered by the centre of their range, channels within
//! a cluster in their original order, empty clusters dropped (so groups number at most `k`). All memory is
//! the caller's.

use core::ops::Range;

use crate::error::{Error, Result, need};

/// A channel permutation with variable-size groups, over caller-owned arrays.
#[derive(Clone, Copy, Debug)]
pub struct ChannelOrder<'a> {
    perm: &'a [u16],
    inv: &'a [u16],
    bounds: &'a [u16],
}

/// Writes the inverse of `perm` into `inv`.
///
/// # Errors
/// [`Error::InvalidPermutation`] if `perm` repeats or skips an index (then `inv` holds garbage);
/// [`Error::ShapeMismatch`] if the lengths differ.
pub fn invert(perm: &[u16], inv: &mut [u16]) -> Result<()> {
    if perm.len() != inv.len() {
        return Err(Error::ShapeMismatch {
            what: "inverse permutation",
            expected: perm.len(),
            got: inv.len(),
        });
    }
    let n = perm.len();
    inv.fill(u16::MAX);
    for (i, &p) in perm.iter().enumerate() {
        let p = usize::from(p);
        if p >= n || inv[p] != u16::MAX {
            return Err(Error::InvalidPermutation { index: i });
        }
        inv[p] = i as u16;
    }
    Ok(())
}

impl<'a> ChannelOrder<'a> {
    /// Checks and wraps a permutation, its inverse and group boundaries
    /// (`bounds[0] == 0`, strictly increasing, last == `perm.len()`).
    ///
    /// # Errors
    /// [`Error::InvalidPermutation`], [`Error::ShapeMismatch`], [`Error::InvalidConfig`] for bad bounds.
    pub fn new(perm: &'a [u16], inv: &'a [u16], bounds: &'a [u16]) -> Result<Self> {
        let n = perm.len();
        if n > usize::from(u16::MAX) {
            return Err(Error::InvalidConfig { what: "channel count", value: n });
        }
        if inv.len() != n {
            return Err(Error::ShapeMismatch { what: "inverse permutation", expected: n, got: inv.len() });
        }
        for (i, &p) in perm.iter().enumerate() {
            if usize::from(p) >= n || usize::from(inv[usize::from(p)]) != i {
                return Err(Error::InvalidPermutation { index: i });
            }
        }
        let ok = bounds.len() >= 2
            && bounds[0] == 0
            && usize::from(bounds[bounds.len() - 1]) == n
            && bounds.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(Error::InvalidConfig { what: "group bounds (count)", value: bounds.len() });
        }
        Ok(Self { perm, inv, bounds })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.perm.len()
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Permuted positions of group `j` (`j < groups()`).
    pub fn group(&self, j: usize) -> Range<usize> {
        usize::from(self.bounds[j])..usize::from(self.bounds[j + 1])
    }

    /// The permutation (`perm[i]` = original channel at position `i`).
    pub fn perm(&self) -> &[u16] {
        self.perm
    }

    /// The inverse (`inv[c]` = position of original channel `c`).
    pub fn inv(&self) -> &[u16] {
        self.inv
    }

    /// `dst[i] = src[perm[i]]`: original order to grouped order.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless both slices have `channels()` elements.
    pub fn gather(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        self.check(src.len(), dst.len())?;
        for (d, &p) in dst.iter_mut().zip(self.perm) {
            *d = src[usize::from(p)];
        }
        Ok(())
    }

    /// `dst[perm[i]] = src[i]`: grouped order back to original order.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless both slices have `channels()` elements.
    pub fn scatter(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        self.check(src.len(), dst.len())?;
        for (d, &i) in dst.iter_mut().zip(self.inv) {
            *d = src[usize::from(i)];
        }
        Ok(())
    }

    fn check(&self, a: usize, b: usize) -> Result<()> {
        for got in [a, b] {
            if got != self.channels() {
                return Err(Error::ShapeMismatch { what: "channels", expected: self.channels(), got });
            }
        }
        Ok(())
    }
}

/// Buffers [`cluster_channels`] fills or uses.
#[derive(Debug)]
pub struct ClusterBuffers<'a> {
    /// `n` entries: the permutation.
    pub perm: &'a mut [u16],
    /// `n` entries: its inverse.
    pub inv: &'a mut [u16],
    /// `k + 1` entries: group boundaries; the first `groups + 1` are valid.
    pub bounds: &'a mut [u16],
    /// `n` entries of scratch: cluster labels.
    pub labels: &'a mut [u16],
    /// `2 * k` entries of scratch: the centroids.
    pub scratch: &'a mut [f32],
}

/// Clusters `n` channels by their calibration `(mins[c], maxs[c])` into at most `k` groups and writes the
/// permutation, inverse and bounds into `buf`. Returns the number of non-empty groups.
///
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::BufferTooSmall`], [`Error::NonFinite`],
/// [`Error::InvalidConfig`] for `k == 0` or more than 65535 channels, [`Error::EmptyInput`] for none.
pub fn cluster_channels(
    mins: &[f32],
    maxs: &[f32],
    k: usize,
    iterations: usize,
    buf: ClusterBuffers<'_>,
) -> Result<usize> {
    let n = mins.len();
    if maxs.len() != n {
        return Err(Error::ShapeMismatch { what: "channel maxima", expected: n, got: maxs.len() });
    }
    if n == 0 {
        return Err(Error::EmptyInput { what: "channels" });
    }
    if n > usize::from(u16::MAX) {
        return Err(Error::InvalidConfig { what: "channel count", value: n });
    }
    if k == 0 {
        return Err(Error::InvalidConfig { what: "cluster count", value: 0 });
    }
    need("perm", n, buf.perm.len())?;
    need("inv", n, buf.inv.len())?;
    need("labels", n, buf.labels.len())?;
    need("bounds", k + 1, buf.bounds.len())?;
    need("scratch", 2 * k, buf.scratch.len())?;
    if let Some(index) = mins.iter().chain(maxs).position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { index: index % n });
    }
    let k = k.min(n);
    let pt = |c: usize| (mins[c], maxs[c]);
    let dist = |a: (f32, f32), b: (f32, f32)| {
        let (dx, dy) = (f64::from(a.0) - f64::from(b.0), f64::from(a.1) - f64::from(b.1));
        dx * dx + dy * dy
    };
    let cent = &mut buf.scratch[..2 * k];
    // Farthest-point seeds: the widest channel first, then repeatedly the channel farthest from all seeds.
    let widest = (0..n).max_by(|&a, &b| (maxs[a] - mins[a]).total_cmp(&(maxs[b] - mins[b])).then(b.cmp(&a)));
    let first = widest.unwrap_or(0);
    (cent[0], cent[1]) = pt(first);
    for j in 1..k {
        let mut best = (-1.0f64, 0usize);
        for c in 0..n {
            let d = (0..j).map(|s| dist(pt(c), (cent[2 * s], cent[2 * s + 1]))).fold(f64::INFINITY, f64::min);
            if d > best.0 {
                best = (d, c);
            }
        }
        (cent[2 * j], cent[2 * j + 1]) = pt(best.1);
    }
    let labels = &mut buf.labels[..n];
    let assign = |cent: &[f32], labels: &mut [u16]| {
        for (c, l) in labels.iter_mut().enumerate() {
            let mut best = (f64::INFINITY, 0usize);
            for j in 0..k {
                let d = dist(pt(c), (cent[2 * j], cent[2 * j + 1]));
                if d < best.0 {
                    best = (d, j);
                }
            }
            *l = best.1 as u16;
        }
    };
    for _ in 0..iterations {
        assign(cent, labels);
        let mut moved = false;
        for j in 0..k {
            let (mut sx, mut sy, mut cnt) = (0.0f64, 0.0f64, 0usize);
            for c in (0..n).filter(|&c| usize::from(labels[c]) == j) {
                sx += f64::from(mins[c]);
                sy += f64::from(maxs[c]);
                cnt += 1;
            }
            if cnt > 0 {
                let (x, y) = ((sx / cnt as f64) as f32, (sy / cnt as f64) as f32);
                moved |= x != cent[2 * j] || y != cent[2 * j + 1];
                (cent[2 * j], cent[2 * j + 1]) = (x, y);
            }
        }
        if !moved {
            break;
        }
    }
    // Order clusters by the centre of their range (insertion sort of k pairs), then label once more.
    for j in 1..k {
        let mut i = j;
        while i > 0 && cent[2 * i - 2] + cent[2 * i - 1] > cent[2 * i] + cent[2 * i + 1] {
            cent.swap(2 * i - 2, 2 * i);
            cent.swap(2 * i - 1, 2 * i + 1);
            i -= 1;
        }
    }
    assign(cent, labels);
    // Stable placement cluster by cluster, dropping empty clusters.
    let (mut pos, mut groups) = (0usize, 0usize);
    buf.bounds[0] = 0;
    for j in 0..k {
        let before = pos;
        for c in (0..n).filter(|&c| usize::from(labels[c]) == j) {
            buf.perm[pos] = c as u16;
            pos += 1;
        }
        if pos > before {
            groups += 1;
            buf.bounds[groups] = pos as u16;
        }
    }
    invert(&buf.perm[..n], &mut buf.inv[..n])?;
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn planted_clusters_become_groups() {
        // Three kinds of channel, interleaved: narrow around 0, wide, shifted positive.
        let n = 48;
        let kind = |c: usize| (c * 7) % 3;
        let jitter = |c: usize| (c as f32 * 0.37).sin() * 0.01;
        let mins: Vec<f32> = (0..n).map(|c| [-0.1, -5.0, 2.0][kind(c)] + jitter(c)).collect();
        let maxs: Vec<f32> = (0..n).map(|c| [0.1, 5.0, 3.0][kind(c)] - jitter(c)).collect();
        let (mut perm, mut inv, mut bounds, mut labels) = (vec![0; n], vec![0; n], vec![0; 4], vec![0; n]);
        let mut scratch = vec![0.0; 6];
        let g = cluster_channels(
            &mins,
            &maxs,
            3,
            20,
            ClusterBuffers {
                perm: &mut perm,
                inv: &mut inv,
                bounds: &mut bounds,
                labels: &mut labels,
                scratch: &mut scratch,
            },
        )
        .unwrap();
        assert_eq!(g, 3);
        let order = ChannelOrder::new(&perm, &inv, &bounds[..=g]).unwrap();
        // Each group is one planted kind, whole.
        let mut seen_kinds = Vec::new();
        for j in 0..g {
            let members: Vec<usize> = order.group(j).map(|i| usize::from(perm[i])).collect();
            let k0 = kind(members[0]);
            assert!(members.iter().all(|&c| kind(c) == k0), "group {j} mixes kinds: {members:?}");
            assert!(members.windows(2).all(|w| w[0] < w[1]), "original order within a group");
            assert_eq!(members.len(), 16);
            seen_kinds.push(k0);
        }
        seen_kinds.sort();
        assert_eq!(seen_kinds, [0, 1, 2]);
        // The shifted-positive cluster (centre 2.5) comes last.
        assert_eq!(kind(usize::from(perm[bounds[2] as usize])), 2);
    }

    #[test]
    fn gather_then_scatter_is_identity() {
        let perm: [u16; 6] = [3, 0, 5, 1, 4, 2];
        let mut inv = [0u16; 6];
        invert(&perm, &mut inv).unwrap();
        let order = ChannelOrder::new(&perm, &inv, &[0, 2, 6]).unwrap();
        let x = [10.0f32, 11.0, 12.0, 13.0, 14.0, 15.0];
        let mut g = [0.0; 6];
        order.gather(&x, &mut g).unwrap();
        assert_eq!(g, [13.0, 10.0, 15.0, 11.0, 14.0, 12.0]);
        let mut back = [0.0; 6];
        order.scatter(&g, &mut back).unwrap();
        assert_eq!(back, x);
        assert_eq!(order.group(1), 2..6);
    }

    #[test]
    fn invalid_orders_are_errors() {
        let mut inv = [0u16; 3];
        assert_eq!(invert(&[0, 0, 1], &mut inv), Err(Error::InvalidPermutation { index: 1 }));
        assert_eq!(invert(&[0, 3, 1], &mut inv), Err(Error::InvalidPermutation { index: 1 }));
        let perm = [1u16, 0, 2];
        let bad_inv = [0u16, 1, 2];
        assert!(ChannelOrder::new(&perm, &bad_inv, &[0, 3]).is_err());
        let inv = [1u16, 0, 2];
        assert!(ChannelOrder::new(&perm, &inv, &[0, 3]).is_ok());
        for bounds in [&[0u16, 2][..], &[1, 3], &[0, 2, 2, 3], &[3]] {
            assert!(matches!(ChannelOrder::new(&perm, &inv, bounds), Err(Error::InvalidConfig { .. })));
        }
        let o = ChannelOrder::new(&perm, &inv, &[0, 3]).unwrap();
        assert!(o.gather(&[0.0; 2], &mut [0.0; 3]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 2 } else { 128 }, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn prop_cluster_is_a_permutation(
            pts in proptest::collection::vec((-5.0f32..5.0, 0.0f32..5.0), 1..80),
            k in 1usize..12,
        ) {
            let n = pts.len();
            let mins: Vec<f32> = pts.iter().map(|p| p.0).collect();
            let maxs: Vec<f32> = pts.iter().map(|p| p.0 + p.1).collect();
            let (mut perm, mut inv, mut bounds, mut labels) = (vec![0; n], vec![0; n], vec![0; k + 1], vec![0; n]);
            let mut scratch = vec![0.0; 2 * k];
            let g = cluster_channels(&mins, &maxs, k, 10, ClusterBuffers {
                perm: &mut perm, inv: &mut inv, bounds: &mut bounds, labels: &mut labels, scratch: &mut scratch,
            }).unwrap();
            prop_assert!(g >= 1 && g <= k.min(n));
            let order = ChannelOrder::new(&perm, &inv, &bounds[..=g]).unwrap();
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 1.5 - 3.0).collect();
            let mut y = vec![0.0; n];
            let mut z = vec![0.0; n];
            order.gather(&x, &mut y).unwrap();
            order.scatter(&y, &mut z).unwrap();
            prop_assert_eq!(z, x);
        }
    }
}
