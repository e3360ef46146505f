//! Helpers for tests, here and in other crates (feature `testing`): a deterministic generator,
//! calibration-like tables that are not the identity, and appends that promote MiKV tokens. Not for use
//! outside tests: the tables are made up.
extern crate std;

use crate::cache::blob::TableSink;
use crate::cache::{Axis, Cache, CacheConfig, Stream};
use std::vec::Vec;

/// A small deterministic generator (xorshift64*), so tests need no `rand`.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Appends `k`, `v` (`[t][kv_heads][head_dim]`) to `cache`: at once without tiers; with tiers a token
/// at a time, each followed by an observation of random attention (over `(0, 1)`) for every head, so that
/// some tokens are promoted.
pub fn append_observed(cache: &mut Cache<'_>, k: &[f32], v: &[f32], rng: &mut Rng) {
    let cfg = *cache.config();
    if cfg.tiers.is_none() {
        cache.append(k, v).unwrap();
        return;
    }
    let w = cfg.kv_heads * cfg.head_dim;
    for (kt, vt) in k.chunks(w).zip(v.chunks(w)) {
        cache.append(kt, vt).unwrap();
        for h in 0..cfg.kv_heads {
            let p: Vec<f32> = (0..cache.tier_window()).map(|_| rng.unit().abs() + 1e-3).collect();
            cache.observe(h, &p).unwrap();
        }
    }
}

/// Calibration-like tables for `cache`: non-uniform levels, centres, balancing factors, thresholds and a
/// permutation with uneven groups, so no table is the identity.
pub fn fill_tables(cache: &mut Cache<'_>, rng: &mut Rng) {
    let cfg = *cache.config();
    fill_tables_into(&cfg, cache, rng);
}

/// [`fill_tables`] for any sink of `cfg`'s tables (a cache, or a blob writer).
pub fn fill_tables_into(cfg: &CacheConfig, cache: &mut impl TableSink, rng: &mut Rng) {
    let d = cfg.head_dim;
    for (stream, spec) in [(Stream::Keys, cfg.key_spec()), (Stream::Values, cfg.value_spec())] {
        let Some(q) = spec else { continue };
        if q.codebook {
            let n = q.width.levels() as usize;
            let units = if q.axis == Axis::PerChannel { cfg.kv_heads * d } else { cfg.kv_heads };
            for u in 0..units {
                // Levels bunched towards zero, ends at -1 and 1, a Q-Norm-like decode table.
                // Levels bunched towards zero (exponent 1.2 to 2 by unit), ends at -1 and 1.
                let e = 1.2 + 0.8 * (u % 5) as f32 / 4.0 + 0.01 * rng.unit();
                let enc: Vec<f32> = (0..n)
                    .map(|i| {
                        let a = -1.0 + 2.0 * i as f32 / (n - 1) as f32;
                        a.signum() * a.abs().powf(e)
                    })
                    .collect();
                // A Q-Norm-like decode table: shrunk a little.
                let dec: Vec<f32> = enc.iter().map(|a| a * 0.97).collect();
                cache.set_levels(stream, u, &enc, &dec).unwrap();
            }
        }
        if q.permuted {
            let groups = d / q.group;
            for h in 0..cfg.kv_heads {
                let mut perm: Vec<u16> = (0..d as u16).collect();
                for i in (1..d).rev() {
                    perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                // Uneven groups, one of them empty when there are three or more.
                let mut bounds: Vec<u16> = (0..=groups).map(|j| (j * d / groups) as u16).collect();
                if groups >= 2 {
                    bounds[1] = (d / groups / 2) as u16;
                }
                if groups >= 3 {
                    bounds[2] = bounds[1];
                }
                cache.set_permutation(stream, h, &perm, &bounds).unwrap();
            }
        }
    }
    let t = cfg.transform;
    for h in 0..cfg.kv_heads {
        if t.center_keys {
            let m: Vec<f32> = (0..d).map(|_| rng.unit() * 3.0).collect();
            cache.set_center(h, &m).unwrap();
        }
        if t.balance_keys {
            let b: Vec<f32> = (0..d).map(|_| 2f32.powf(rng.unit() * 2.0)).collect();
            cache.set_balance(h, &b).unwrap();
        }
        if matches!(cfg.key_spec(), Some(q) if q.outliers > 0 && q.axis == Axis::PerChannel) {
            let lo: Vec<f32> = (0..d).map(|_| -2.0 - rng.unit().abs()).collect();
            let hi: Vec<f32> = (0..d).map(|_| 2.0 + rng.unit().abs()).collect();
            cache.set_thresholds(h, &lo, &hi).unwrap();
        }
    }
}
