//! Orthogonal transforms a cache applies to keys and values before quantizing them, and to queries and
//! outputs so that attention is unchanged: a normalized Walsh-Hadamard rotation, and the RoPE rotation by a
//! token's offset within its key group.
//!
//! For an orthogonal `T`, `(T q) . (T k) = q . k` and `sum_t p_t v_t = T^-1 sum_t p_t (T v_t)`, so a cache may
//! store `T k` and `T v`, score with `T q` and turn the summed output back with `T^-1`. kvq uses two:
//!
//! - **Hadamard** `H` (Sylvester, scaled by `1/sqrt(n)`, so `H = H^T = H^-1`): it spreads a few large
//!   channels over all of them, so a per-channel or per-token group no longer spends its levels on one
//!   outlier (llama.cpp rotates its quantized caches the same way). [`hadamard`] is the fast transform,
//!   `n log2 n` additions.
//! - **Group-relative RoPE**: a post-RoPE key at position `p0 + t` (`p0` its key group's first position,
//!   `t < G` its offset) is `R(p0 + t) k_pre = R(t) R(p0) k_pre`, since RoPE's rotations of one channel pair
//!   commute. So `R(-t) k_post = R(p0) k_pre`: every key of a group turned back to the group's first
//!   position is the group's pre-RoPE key under one rotation per channel pair, constant over the group.
//!   Per-channel groups of those keys see each channel as stable as before RoPE (KVQuant's pre-RoPE
//!   quantization, methods.md §2.1), and reading them needs only `R(t)` for `t < G`, one small table,
//!   instead of a rotation by every token's absolute position. The query side is `R(-t) q` per offset.

use crate::error::{Error, Result};

/// Which channels RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Pairing {
    /// `(2i, 2i + 1)`: Llama-family GGUFs (their converter permuted the rows for it).
    Adjacent,
    /// `(i, i + d/2)`: NeoX style (Qwen2, Gemma).
    Halves,
}

/// A model's RoPE: angle `pos * base^(-2i/d)` for channel pair `i < d/2`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rope {
    /// Frequency base (10,000 for Llama 2, SmolLM2; 1,000,000 for Gemma 3's global layers).
    pub base: f32,
    /// Channel pairing.
    pub pairing: Pairing,
}

impl Rope {
    /// The channels of pair `i` in a head of `d`.
    #[inline]
    pub const fn pair(&self, i: usize, d: usize) -> (usize, usize) {
        match self.pairing {
            Pairing::Adjacent => (2 * i, 2 * i + 1),
            Pairing::Halves => (i, i + d / 2),
        }
    }

    /// The pair channel `c` belongs to in a head of `d`, and whether it is the pair's first channel (the
    /// inverse of [`Rope::pair`]).
    #[inline]
    pub const fn pair_of(&self, c: usize, d: usize) -> (usize, bool) {
        match self.pairing {
            Pairing::Adjacent => (c / 2, c.is_multiple_of(2)),
            Pairing::Halves => (c % (d / 2), c < d / 2),
        }
    }

    /// Fills `table` (`[offsets][d/2][2]`, cosine then sine) with the rotation by `t` positions for
    /// `t < offsets`, angles computed in f64.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] if `table` holds fewer than `offsets * d` floats; [`Error::InvalidConfig`]
    /// for an odd `d` or a base that is not finite and above 1.
    pub fn offsets_table(&self, d: usize, offsets: usize, table: &mut [f32]) -> Result<()> {
        if !d.is_multiple_of(2) || d == 0 {
            return Err(Error::InvalidConfig { what: "RoPE head_dim (even)", value: d });
        }
        if !(self.base.is_finite() && self.base > 1.0) {
            return Err(Error::InvalidConfig { what: "RoPE base (finite, above 1)", value: 0 });
        }
        crate::error::need("RoPE table", offsets * d, table.len())?;
        for i in 0..d / 2 {
            let f = libm::pow(f64::from(self.base), -2.0 * i as f64 / d as f64);
            for t in 0..offsets {
                let (s, c) = libm::sincos(t as f64 * f);
                table[(t * d / 2 + i) * 2] = c as f32;
                table[(t * d / 2 + i) * 2 + 1] = s as f32;
            }
        }
        Ok(())
    }

    /// Rotates `x` (one head of `d`) by the angles in `cs` (one offset's `[d/2][2]` row of
    /// [`Rope::offsets_table`]): forward (`R(t) x`) or, with `inverse`, back (`R(-t) x`).
    #[inline(always)]
    pub fn rotate(&self, x: &mut [f32], cs: &[f32], inverse: bool) {
        let d = x.len();
        for i in 0..d / 2 {
            let (a, b) = self.pair(i, d);
            let (c, s) = (cs[2 * i], if inverse { -cs[2 * i + 1] } else { cs[2 * i + 1] });
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * c - x1 * s;
            x[b] = x0 * s + x1 * c;
        }
    }
}

/// Whether [`hadamard`] takes vectors of `n`: a power of two, at least 2.
pub const fn hadamard_len_ok(n: usize) -> bool {
    n >= 2 && n.is_power_of_two()
}

/// The normalized Walsh-Hadamard transform of `x` in place (`x <- H x`, `H` Sylvester-ordered and scaled
/// by `1/sqrt(n)`, so applying it twice gives `x` back up to rounding). `x.len()` must be a power of two
/// (the configuration checks it); other lengths are left unchanged.
#[inline]
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    if !hadamard_len_ok(n) {
        return;
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let k = 1.0 / libm::sqrtf(n as f32);
    for v in x.iter_mut() {
        *v *= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use crate::testutil::Rng;
    use std::vec;
    use std::vec::Vec;

    /// `H` from its definition, `H[i][j] = (-1)^popcount(i & j) / sqrt(n)`, in f64.
    fn naive_hadamard(x: &[f32]) -> Vec<f64> {
        let n = x.len();
        (0..n)
            .map(|i| {
                let s: f64 = (0..n)
                    .map(|j| if (i & j).count_ones() % 2 == 0 { f64::from(x[j]) } else { -f64::from(x[j]) })
                    .sum();
                s / (n as f64).sqrt()
            })
            .collect()
    }

    #[test]
    fn hadamard_is_its_definition_and_its_own_inverse() {
        let mut rng = Rng::new(7);
        for n in [2usize, 4, 8, 64, 128, 256] {
            let x: Vec<f32> = (0..n).map(|_| rng.unit() * 5.0).collect();
            let want = naive_hadamard(&x);
            let mut y = x.clone();
            hadamard(&mut y);
            // log2(n) additions and one scaling, each within a unit roundoff of the running magnitude.
            let norm: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let tol = (n.trailing_zeros() as f64 + 2.0) * f64::from(f32::EPSILON) * norm;
            for (a, b) in y.iter().zip(&want) {
                assert!((f64::from(*a) - b).abs() <= tol, "n {n}: {a} vs {b}");
            }
            hadamard(&mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() <= 2.0 * tol as f32, "n {n}: round trip {a} vs {b}");
            }
        }
        let mut odd = vec![1.0f32, 2.0, 3.0];
        hadamard(&mut odd);
        assert_eq!(odd, [1.0, 2.0, 3.0]);
        assert!(!hadamard_len_ok(96) && hadamard_len_ok(64));
    }

    /// `R(t)` from the table equals RoPE at position `t` computed directly, for both pairings, and
    /// `R(-t)` undoes it; `R(a) R(b) = R(a + b)`, the identity group-relative storage rests on.
    #[test]
    fn rope_offsets_rotate_as_rope_does() {
        let d = 16;
        for pairing in [Pairing::Adjacent, Pairing::Halves] {
            let rope = Rope { base: 10_000.0, pairing };
            let mut table = vec![0.0f32; 40 * d];
            rope.offsets_table(d, 40, &mut table).unwrap();
            let mut rng = Rng::new(3);
            let x: Vec<f32> = (0..d).map(|_| rng.unit()).collect();
            for t in [0usize, 1, 5, 39] {
                let mut y = x.clone();
                rope.rotate(&mut y, &table[t * d..][..d], false);
                for i in 0..d / 2 {
                    let (a, b) = rope.pair(i, d);
                    let ang = t as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64);
                    let (s, c) = ang.sin_cos();
                    let wa = f64::from(x[a]) * c - f64::from(x[b]) * s;
                    let wb = f64::from(x[a]) * s + f64::from(x[b]) * c;
                    assert!((f64::from(y[a]) - wa).abs() < 1e-6 && (f64::from(y[b]) - wb).abs() < 1e-6);
                }
                rope.rotate(&mut y, &table[t * d..][..d], true);
                for (a, b) in y.iter().zip(&x) {
                    assert!((a - b).abs() < 1e-6);
                }
            }
            let (mut ab, mut a_then_b) = (x.clone(), x.clone());
            rope.rotate(&mut ab, &table[12 * d..][..d], false);
            rope.rotate(&mut a_then_b, &table[5 * d..][..d], false);
            rope.rotate(&mut a_then_b, &table[7 * d..][..d], false);
            for (u, v) in ab.iter().zip(&a_then_b) {
                assert!((u - v).abs() < 1e-6);
            }
        }
        let rope = Rope { base: 10_000.0, pairing: Pairing::Adjacent };
        assert!(rope.offsets_table(15, 4, &mut [0.0; 64]).is_err());
        assert!(rope.offsets_table(16, 4, &mut [0.0; 63]).is_err());
        assert!(Rope { base: f32::NAN, ..rope }.offsets_table(16, 4, &mut [0.0; 64]).is_err());
    }
}
