//! MiKV's importance tiers ([`Tiers`]): attention received while a token sits in the full-precision
//! window, and the corrections that promote a key group's most attended tokens when it is quantized.
//!
//! The caller hands each decode step's probabilities to [`Cache::observe`]; a window slot's sum and count
//! are cleared when a new key lands in it. When a key group is quantized, each KV head ranks the group's
//! tokens by their mean received attention (sum over the query heads of its GQA group, divided by the
//! steps that saw it) and the top `keep` (those with any attention at all) get a slot: the logical body
//! index, and the key's correction (stored row minus its low-bit reconstruction, outliers included) in
//! `width`-bit codes. The value's correction joins the slot when the value leaves its window, `R` tokens
//! later. Attention adds `q . correction` to a promoted key's score and `p * correction` to the value sums,
//! both in the stored basis.

use super::config::Tiers;
use super::{Cache, Stream, StreamLayout, top_positions};
use crate::cache::config::{MAX_HEAD_DIM, MAX_OUTLIER_SLOTS, QuantSpec};
use crate::error::{Error, Result};
use crate::pack::{self, Width};
use crate::quant::uniform::{GroupParams, UniformSpec};
use half::f16;

/// A slot's token word when the slot holds no token.
pub(crate) const EMPTY_TOKEN: u32 = u32::MAX;

/// Read-only view of the tier slots.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TierView<'c> {
    slots: &'c [u32],
    tiers: Tiers,
    slot_words: usize,
    /// Key groups per head (key ring / G).
    groups: usize,
    /// Key group size.
    group: usize,
    /// Key ring slots.
    ring: usize,
    d: usize,
}

/// Words of one stream's part of a slot: a parameter word per correction group, then the codes.
const fn part_words(d: usize, width: Width) -> usize {
    d / Tiers::group(d) + d * width.bits() as usize / 32
}

impl<'c> TierView<'c> {
    /// The view of `cache`'s tiers, if it has any.
    pub(crate) fn of(cache: &'c Cache<'_>) -> Option<Self> {
        let tiers = cache.cfg.tiers?;
        let q = cache.cfg.key_spec()?;
        let t = cache.layout.tiers;
        Some(Self {
            slots: &cache.arena[t.slots.offset..t.slots.end()],
            tiers,
            slot_words: t.slot_words,
            groups: cache.layout.keys.ring / q.group,
            group: q.group,
            ring: cache.layout.keys.ring,
            d: cache.cfg.head_dim,
        })
    }

    /// Word offset of slot `k` of the key group holding logical body token `j`, head `h`.
    fn at(&self, h: usize, j: usize, k: usize) -> usize {
        let gi = (j % self.ring) / self.group;
        ((h * self.groups + gi) * self.tiers.keep + k) * self.slot_words
    }

    /// The promoted tokens of head `h` among logical body tokens `j0..j0 + n`, as `(j - j0, slot)`, in
    /// group order. An iterator rather than a closure, so that a kernel compiled for AVX2 inlines all of
    /// its loop (a closure is compiled for the baseline target).
    #[inline(always)]
    pub(crate) fn promoted(&self, h: usize, j0: usize, n: usize) -> Promoted<'c> {
        let gs = j0 - j0 % self.group;
        Promoted { view: *self, h, j0, end: j0 + n, gs, gi: (gs % self.ring) / self.group, k: 0 }
    }

    /// The slot of logical body token `j`, head `h`, if it is promoted.
    pub(crate) fn find(&self, h: usize, j: usize) -> Option<&'c [u32]> {
        self.promoted(h, j, 1).last().map(|(_, s)| s)
    }

    /// Whether the corrections are 4-bit in groups of 64 channels, the layout the AVX2 tier kernels
    /// read: per group a parameter word (f16 scale low, zero high), then 8 words of codes per group.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn b4_in_64s(&self) -> bool {
        self.tiers.width == Width::B4 && Tiers::group(self.d) == 64
    }

    /// `stream`'s part of a slot: its parameter words, then its codes.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn part(&self, slot: &'c [u32], stream: Stream) -> &'c [u32] {
        part(slot, stream, self.d, self.tiers.width)
    }

    /// Decodes `stream`'s correction of a slot into `out` (`head_dim` floats).
    #[inline(always)]
    pub(crate) fn correction(&self, slot: &[u32], stream: Stream, out: &mut [f32]) {
        decode(part(slot, stream, self.d, self.tiers.width), self.d, self.tiers.width, out);
    }
}

/// See [`TierView::promoted`].
pub(crate) struct Promoted<'c> {
    view: TierView<'c>,
    h: usize,
    j0: usize,
    end: usize,
    /// The current group's first logical token, and its index in the ring (stepped rather than divided
    /// for each group: `at`'s divisions were a third of the tier loops' time).
    gs: usize,
    gi: usize,
    /// The next slot of the group.
    k: usize,
}

impl<'c> Iterator for Promoted<'c> {
    type Item = (usize, &'c [u32]);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let v = &self.view;
        let (g, keep, sw) = (v.group, v.tiers.keep, v.slot_words);
        while self.gs < self.end {
            if self.k == keep {
                self.k = 0;
                self.gs += g;
                self.gi += 1;
                if self.gi == v.groups {
                    self.gi = 0;
                }
                continue;
            }
            let at = ((self.h * v.groups + self.gi) * keep + self.k) * sw;
            self.k += 1;
            let slot = &v.slots[at..at + sw];
            let tok = slot[0];
            if tok == EMPTY_TOKEN {
                continue;
            }
            // The slot's token belongs to this group (the ring holds no older group in its place).
            let j = tok as usize;
            if j >= self.j0 && j < self.end && j >= self.gs && j < self.gs + g {
                return Some((j - self.j0, slot));
            }
        }
        None
    }
}

/// `stream`'s part of a slot.
fn part(slot: &[u32], stream: Stream, d: usize, width: Width) -> &[u32] {
    let pw = part_words(d, width);
    let at = 1 + if stream == Stream::Keys { 0 } else { pw };
    &slot[at..at + pw]
}

/// Decodes a part (parameter words, then codes) into `out`.
#[inline(always)]
fn decode(part: &[u32], d: usize, width: Width, out: &mut [f32]) {
    let tg = Tiers::group(d);
    let (params, codes) = part.split_at(d / tg);
    let b = width.bits() as usize;
    if 32 % b == 0 && tg.is_multiple_of(32 / b) {
        // Whole words of codes (1, 2, 4 and 8 bits), each width its own loop of constant shifts. At
        // `mikv2`'s 4 bits the serial unpacker below took a fifth of a decode step at 8k tokens (Zen 4).
        return match width {
            Width::B1 => decode_words::<1>(params, codes, tg, out),
            Width::B2 | Width::Ternary => decode_words::<2>(params, codes, tg, out),
            Width::B4 => decode_words::<4>(params, codes, tg, out),
            _ => decode_words::<8>(params, codes, tg, out),
        };
    }
    decode_serial(part, d, width, out);
}

/// A correction group's parameters from their word (f16 scale low, f16 zero high; see [`encode`]).
#[inline(always)]
fn params_of(w: u32) -> GroupParams {
    GroupParams { scale: f16::from_bits(w as u16).to_f32(), zero: f16::from_bits((w >> 16) as u16).to_f32() }
}

/// [`decode`] for `B`-bit codes, `32 / B` to a word, correction groups of `tg` channels (whole words).
#[inline(always)]
fn decode_words<const B: usize>(params: &[u32], codes: &[u32], tg: usize, out: &mut [f32]) {
    let per = 32 / B;
    let mask = (1u32 << B) - 1;
    for (gi, &w) in params.iter().enumerate() {
        let p = params_of(w);
        let o = &mut out[gi * tg..(gi + 1) * tg];
        for (chunk, &word) in o.chunks_exact_mut(per).zip(&codes[gi * tg / per..]) {
            for (k, x) in chunk.iter_mut().enumerate() {
                *x = p.decode(((word >> (k * B)) & mask) as u8);
            }
        }
    }
}

/// [`decode`] through the serial unpacker: 3-bit codes, and the twin the word loop is tested against.
fn decode_serial(part: &[u32], d: usize, width: Width, out: &mut [f32]) {
    let tg = Tiers::group(d);
    let (params, codes) = part.split_at(d / tg);
    let mut c = [0u8; MAX_HEAD_DIM];
    pack::unpack_bits(codes, width, 0, &mut c[..d]);
    for (gi, &w) in params.iter().enumerate() {
        let p = params_of(w);
        for (o, &k) in out[gi * tg..(gi + 1) * tg].iter_mut().zip(&c[gi * tg..]) {
            *o = p.decode(k);
        }
    }
}

/// Encodes `x` (`d` floats) into a part: per correction group, min-max `width`-bit codes with f16
/// parameters.
fn encode(x: &[f32], width: Width, part: &mut [u32]) -> Result<()> {
    let d = x.len();
    let tg = Tiers::group(d);
    let spec = UniformSpec::new(width);
    let (params, codes) = part.split_at_mut(d / tg);
    let mut c = [0u8; MAX_HEAD_DIM];
    for (gi, w) in params.iter_mut().enumerate() {
        let g = &x[gi * tg..(gi + 1) * tg];
        let (lo, hi) = g.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let p = spec.fit(lo, hi)?;
        for (o, &v) in c[gi * tg..(gi + 1) * tg].iter_mut().zip(g) {
            *o = spec.encode(&p, v);
        }
        *w = u32::from(f16::from_f32(p.scale).to_bits()) | (u32::from(f16::from_f32(p.zero).to_bits()) << 16);
    }
    codes.fill(0);
    pack::pack(&c[..d], width, codes, 0)
}

impl Cache<'_> {
    /// Tokens at the end of the held order (the keys' full-precision window) whose received attention
    /// [`Cache::observe`] takes; 0 without tiers.
    pub fn tier_window(&self) -> usize {
        if self.cfg.tiers.is_none() {
            return 0;
        }
        let q_end = super::Residual::Block.quantized_end(self.counts.n, self.cfg.residual);
        self.counts.n - q_end.max(self.counts.base)
    }

    /// Whether logical body token `j` (the `j`-th token after the sinks, counted from the start) of KV head
    /// `head` is held quantized with a tier correction.
    pub fn is_promoted(&self, head: usize, j: usize) -> bool {
        let Some(view) = TierView::of(self) else {
            return false;
        };
        let q_end = super::Residual::Block.quantized_end(self.counts.n, self.cfg.residual);
        head < self.cfg.kv_heads && j >= self.counts.base && j < q_end && view.find(head, j).is_some()
    }

    /// Adds the attention the window's tokens received from one step's query heads of KV head `head`:
    /// `received[i]` is the probability summed over those query heads for the `i`-th of the last
    /// [`Cache::tier_window`] held tokens (in order). A cache without tiers takes nothing.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] for a head past `kv_heads`; [`Error::ShapeMismatch`] if `received` is not
    /// [`Cache::tier_window`] long; [`Error::NonFinite`] for a NaN, infinite or negative entry (nothing is
    /// added then).
    pub fn observe(&mut self, head: usize, received: &[f32]) -> Result<()> {
        if self.cfg.tiers.is_none() {
            return Ok(());
        }
        if head >= self.cfg.kv_heads {
            return Err(Error::OutOfBounds { index: head, len: self.cfg.kv_heads });
        }
        let w = self.tier_window();
        if received.len() != w {
            return Err(Error::ShapeMismatch {
                what: "received attention length",
                expected: w,
                got: received.len(),
            });
        }
        if let Some(i) = received.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::NonFinite { index: i });
        }
        let (r, t) = (self.cfg.residual, self.layout.tiers);
        let j0 = self.counts.n - w;
        for (i, &p) in received.iter().enumerate() {
            let at = head * r + (j0 + i) % r;
            let s: &mut [f32] = bytemuck::cast_slice_mut(&mut self.arena[t.score.offset..t.score.end()]);
            s[at] += p;
            self.arena[t.seen.offset + at] += 1;
        }
        Ok(())
    }

    /// Clears the importance of window slot `slot` (a new key lands there).
    pub(crate) fn clear_importance(&mut self, slot: usize) {
        if self.cfg.tiers.is_none() {
            return;
        }
        let (r, t) = (self.cfg.residual, self.layout.tiers);
        for h in 0..self.cfg.kv_heads {
            self.arena[t.score.offset + h * r + slot] = 0;
            self.arena[t.seen.offset + h * r + slot] = 0;
        }
    }

    /// Promotes the most attended tokens of key group `gs` (logical, group-aligned), head `h`, whose
    /// stored rows are in the key scratch and whose codes are written: each gets a slot with its key's
    /// correction.
    pub(crate) fn promote_key_group(
        &mut self,
        l: StreamLayout,
        q: &QuantSpec,
        gs: usize,
        h: usize,
    ) -> Result<()> {
        let Some(tiers) = self.cfg.tiers else {
            return Ok(());
        };
        let (d, r, g) = (self.cfg.head_dim, self.cfg.residual, q.group);
        let t = self.layout.tiers;
        let mean = |i: usize| {
            let at = h * r + (gs + i) % r;
            let seen = self.arena[t.seen.offset + at];
            let s = f32::from_bits(self.arena[t.score.offset + at]);
            if seen == 0 { 0.0 } else { s / seen as f32 }
        };
        let mut sel = [0u16; MAX_OUTLIER_SLOTS];
        let n_sel = top_positions(g, tiers.keep, mean, &mut sel);
        let view = TierView::of(self).ok_or(Error::InvalidConfig { what: "tiers", value: 0 })?;
        let first = view.at(h, gs, 0);
        let sw = t.slot_words;
        for (k, &i) in sel[..n_sel].iter().enumerate() {
            let i = usize::from(i);
            let j = gs + i;
            let mut stored = [0.0f32; MAX_HEAD_DIM];
            self.stored_key_row(q, h, j % l.ring, &mut stored[..d])?;
            let scratch: &[f32] = bytemuck::cast_slice(&self.arena[l.scratch.offset..l.scratch.end()]);
            let mut corr = [0.0f32; MAX_HEAD_DIM];
            for c in 0..d {
                corr[c] = scratch[i * d + c] - stored[c];
            }
            let slot = &mut self.arena[t.slots.offset + first + k * sw..][..sw];
            slot[0] = j as u32;
            let pw = part_words(d, tiers.width);
            encode(&corr[..d], tiers.width, &mut slot[1..1 + pw])?;
        }
        for k in n_sel..tiers.keep {
            self.arena[t.slots.offset + first + k * sw] = EMPTY_TOKEN;
        }
        Ok(())
    }

    /// Writes the value correction of logical body token `j`, head `h`, if it is promoted: `ordered` is
    /// the value's stored row (stored basis and order), its codes already written at body slot `slot`.
    pub(crate) fn correct_value(
        &mut self,
        q: &QuantSpec,
        h: usize,
        j: usize,
        slot: usize,
        ordered: &[f32],
    ) -> Result<()> {
        let Some(tiers) = self.cfg.tiers else {
            return Ok(());
        };
        let d = self.cfg.head_dim;
        let Some(view) = TierView::of(self) else {
            return Ok(());
        };
        let mut at = None;
        for k in 0..tiers.keep {
            let a = view.at(h, j, k);
            if view.slots[a] == j as u32 {
                at = Some(a);
            }
        }
        let Some(at) = at else {
            return Ok(());
        };
        let mut stored = [0.0f32; MAX_HEAD_DIM];
        crate::attention::generic::token_stored(&self.view(Stream::Values), *q, h, d, slot, &mut stored[..d]);
        let mut corr = [0.0f32; MAX_HEAD_DIM];
        for c in 0..d {
            corr[c] = ordered[c] - stored[c];
        }
        let t = self.layout.tiers;
        let pw = part_words(d, tiers.width);
        let slot = &mut self.arena[t.slots.offset + at..][..t.slot_words];
        encode(&corr[..d], tiers.width, &mut slot[1 + pw..1 + 2 * pw])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use crate::testutil::Rng;

    /// The word loop of [`decode`] gives the serial unpacker's bits at every width it takes, over head sizes
    /// whose correction groups are 64 channels or the whole head; a code read from the wrong lane or word
    /// fails it.
    #[test]
    fn word_decode_equals_the_serial_one() {
        let mut rng = Rng::new(3);
        let mut checked = 0;
        for d in [32usize, 64, 96, 128, 256] {
            for width in [Width::B1, Width::B2, Width::B4, Width::B8] {
                let pw = part_words(d, width);
                for _ in 0..20 {
                    let x: std::vec::Vec<f32> = (0..d).map(|_| rng.unit() * 3.0).collect();
                    let mut part = std::vec![0u32; pw];
                    encode(&x, width, &mut part).unwrap();
                    let (mut a, mut b) = (std::vec![0f32; d], std::vec![0f32; d]);
                    decode(&part, d, width, &mut a);
                    decode_serial(&part, d, width, &mut b);
                    for (c, (a, b)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{width:?} d {d}: channel {c}: {a} vs {b}");
                    }
                    // The decoded correction is the encoded one to within its group's step.
                    let spread = x.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                    let step = spread / width.max_code() as f32;
                    for (c, (a, x)) in a.iter().zip(&x).enumerate() {
                        assert!(
                            (a - x).abs() <= step * 0.51 + 1e-3,
                            "{width:?} d {d}: channel {c}: {a} vs {x}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 5 * 4 * 20);
    }
}
