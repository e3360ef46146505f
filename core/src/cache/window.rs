//! Index arithmetic of the cache's windows and rings, apart from any storage.
//!
//! Body tokens (those after the sinks) carry a logical index `j = 0, 1, 2, ...` that never resets. Each
//! stream (keys, values) keeps the tokens `[base, n)`: the older ones `[base, q)` quantized in a ring of
//! `cap` slots (token `j` in slot `j % cap`), the newer ones `[q, n)` in a full-precision window of `R`
//! slots (token `j` in slot `j % R`). `q` follows from `n` alone, by the stream's [`Residual`] rule, so the
//! state of a whole cache is three numbers: sinks held, `n` and `base`.

/// How a stream's full-precision window turns into quantized tokens (methods.md §1.4, §3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Residual {
    /// No window: every token goes straight to the body (the fp16 stream).
    None,
    /// KIVI keys: the window fills to `R` tokens, then all `R` are quantized at once and it empties,
    /// so it holds `n mod R` tokens.
    Block,
    /// KIVI values, SKVQ: a FIFO of the last `R` tokens; each new token pushes the oldest into the body.
    Fifo,
}

impl Residual {
    /// End of the quantized run `[.., q)` after `n` body tokens with a window of `r` tokens.
    ///
    /// `r` must be non-zero for [`Residual::Block`] (the configuration checks it).
    #[inline]
    pub const fn quantized_end(self, n: usize, r: usize) -> usize {
        match self {
            Self::None => n,
            Self::Block => n - n % r,
            Self::Fifo => n.saturating_sub(r),
        }
    }
}

/// A run of consecutive ring slots: `len` slots from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Run {
    /// First slot.
    pub start: usize,
    /// Number of slots.
    pub len: usize,
    /// Position of the run's first token within the logical range it came from.
    pub offset: usize,
}

/// The slots of logical tokens `[start, end)` in a ring of `cap` slots, in token order: at most two runs
/// (the second is empty unless the range wraps). `end - start` must not exceed `cap`.
#[inline]
pub const fn ring_runs(start: usize, end: usize, cap: usize) -> [Run; 2] {
    let len = end - start;
    if len == 0 || cap == 0 {
        return [Run { start: 0, len: 0, offset: 0 }, Run { start: 0, len: 0, offset: 0 }];
    }
    let s = start % cap;
    let first = if cap - s < len { cap - s } else { len };
    [Run { start: s, len: first, offset: 0 }, Run { start: 0, len: len - first, offset: first }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_rule_matches_kivi_prefill() {
        // methods.md §1.4: with r = T mod R, T - r keys quantized; T < R quantizes nothing.
        let r = 128;
        for (n, q) in [(0, 0), (1, 0), (127, 0), (128, 128), (129, 128), (300, 256), (1024, 1024)] {
            assert_eq!(Residual::Block.quantized_end(n, r), q, "n = {n}");
        }
        // Values: the last R stay full precision; T <= R quantizes nothing.
        for (n, q) in [(0, 0), (1, 0), (128, 0), (129, 1), (300, 172)] {
            assert_eq!(Residual::Fifo.quantized_end(n, r), q, "n = {n}");
        }
        assert_eq!(Residual::None.quantized_end(77, r), 77);
        assert_eq!(Residual::Fifo.quantized_end(5, 0), 5);
    }

    #[test]
    fn runs_wrap_once() {
        assert_eq!(ring_runs(3, 3, 8)[0].len, 0);
        let [a, b] = ring_runs(6, 11, 8);
        assert_eq!((a.start, a.len, a.offset), (6, 2, 0));
        assert_eq!((b.start, b.len, b.offset), (0, 3, 2));
        let [a, b] = ring_runs(16, 24, 8);
        assert_eq!((a.start, a.len, b.len), (0, 8, 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 8 } else { 1024 }, failure_persistence: None, ..ProptestConfig::default() })]
        /// The runs visit exactly the slots `j % cap` of the range, in order, each once.
        #[test]
        fn prop_runs_cover_the_range(start in 0usize..10_000, len in 0usize..64, cap in 1usize..64) {
            let len = len.min(cap);
            let runs = ring_runs(start, start + len, cap);
            let mut j = start;
            let mut pos = 0;
            for run in runs {
                prop_assert_eq!(run.offset, pos);
                for k in 0..run.len {
                    prop_assert_eq!(run.start + k, j % cap);
                    prop_assert!(run.start + k < cap);
                    j += 1;
                    pos += 1;
                }
            }
            prop_assert_eq!(j, start + len);
        }

        /// Quantized and window parts always partition `[0, n)`, and the window never exceeds `R`.
        #[test]
        fn prop_window_bounds(n in 0usize..100_000, r in 1usize..512) {
            for rule in [Residual::None, Residual::Block, Residual::Fifo] {
                let q = rule.quantized_end(n, r);
                prop_assert!(q <= n);
                prop_assert!(n - q <= r);
                if rule == Residual::Block { prop_assert!(n - q < r); prop_assert_eq!(q % r, 0); }
            }
        }
    }
}
