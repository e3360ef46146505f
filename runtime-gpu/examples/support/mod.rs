//! What the examples share: synthetic keys, values and queries.

/// `n` values in [-1, 1) from an xorshift generator, every 61st scaled by 8: a few outlier channels, as
/// real keys have.
pub(crate) fn rows(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let x = ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if i % 61 == 7 { x * 8.0 } else { x }
        })
        .collect()
}
