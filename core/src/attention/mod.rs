//! Attention over a [`Cache`]: decode (one position, all query heads) and prefill (a causal chunk).
//!
//! The packed codes are read in place; no full-precision copy of the history is made. For each KV head,
//! the query heads of its GQA group (`q_head / (q_heads / kv_heads)`, as KIVI's GEMV maps them) are scored
//! together so each code is read once:
//!
//! ```text
//! scores[h][t] = scale * q_h . k_t         over sinks, quantized body, full-precision window (token order)
//! p[h]         = softmax(scores[h])        max-subtracted, in f32
//! out[h]       = sum_t p[h][t] * v_t
//! ```
//!
//! Kernels come in twins: [`Kernel::PORTABLE`] (scalar, `libm::expf`; what Miri and the firmware run),
//! [`Kernel::avx2`] (AVX2 + FMA + F16C, chosen at run time where the CPU has them) and [`Kernel::avx512`]
//! (the AVX2 set with 64-byte kernels where they pay: the int8 path's keys and values with VNNI, the
//! generic per-channel keys' lookups and the f32 value tiles; the same bits as the AVX2 kernels). The probabilities
//! stay in the caller's scratch and are handed back ([`AttnProbs`]) for policies that rank tokens by them.
//!
//! By default every product is f32, so attention over the cache equals attention over the dequantized cache
//! to float rounding. [`Kernel::with_int8`] turns on the int8 path for bodies of codes up to 2 bits and of 4
//! bits, and for 3-bit values: the f32 kernels there are bound by arithmetic (3 x 64 x 2 multiply-adds per
//! token and KV head), not by the bytes they read, and `vpmaddubsw` does 32 of them per instruction against
//! an FMA's 8. Per key group
//! the query with the group's scales folded in is rounded to integers, per value tile of [`Q8_TILE`] tokens
//! the weights `p_t s_t`; the integer sums are exact, and the rounding moves each score and output by a bound
//! the tests derive (`int8_attention_is_within_its_bound`), well under the 2-bit quantizer's own error. Both
//! twins give the same bits on this path. Value bodies with codebook levels (KVQuant's) join it on AVX-512
//! and the portable twin: each code is read as its level rounded to a 7-bit integer, a
//! further bound the tests derive (`codebook_int8_values_equal_their_twin_and_stay_within_their_bound`).

#[cfg(target_arch = "x86_64")]
mod avx2;
pub(crate) mod generic;
mod portable;

use crate::cache::layout::KEY_BLOCK;
use crate::cache::tier::TierView;
use crate::cache::{Axis, Cache, CacheConfig, Precision, Stream, StreamView, window::ring_runs};
use crate::error::{Error, Result, need};
use crate::pack::Width;

/// Which kernels to run: the portable scalar twins, or AVX2 + FMA + F16C on x86-64, with AVX-512 where the
/// CPU has it.
///
/// A `Kernel` that uses AVX2 can only be made where the CPU has the features ([`Kernel::avx2`] checks at
/// run time with the `std` feature, or at compile time without it), so choosing one is always sound.
/// Shapes the vector kernels do not cover (`head_dim % 8 != 0`, 1- or 3-bit codes, groups not a multiple
/// of 16) run the portable twins either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Kernel {
    avx2: bool,
    /// AVX-512 (F, BW, VL, VNNI, VBMI) as well, for the int8 path's key tiles ([`Kernel::avx512`]).
    avx512: bool,
    int8: bool,
}

impl Kernel {
    /// Scalar code, any target.
    pub const PORTABLE: Self = Self { avx2: false, avx512: false, int8: false };

    /// The same kernels with the int8 path on or off (off by default). On it, bodies of codes up to 2 bits
    /// (`B1`, `B2`, `Ternary`) and of 4 bits, and value bodies of 3 bits, are read with integer dot
    /// products: per key group, the query
    /// with the group's scales folded in is rounded to integers of at most [`q8_key_max`] (127 for `head_dim`
    /// up to 85, and at 4 bits), and per tile of [`Q8_TILE`] tokens the value weights `p_t s_t` to integers
    /// of at most [`Q8_VALUE_MAX`] (127), each on its own scale `delta`. Each score then
    /// moves by at most `delta / 2` per unit of code summed over the channels, each output by `delta / 2`
    /// per unit of code summed over a tile's tokens (the tests derive the attention bound from this); zero
    /// points, the softmax and everything in f16 stay in f32. AVX2 reads 32 codes per `vpmaddubsw`; the
    /// portable twin gives the same bits. Per-token value bodies with codebook levels (2, 3 and 4 bits,
    /// ternary) take it too on the AVX-512 kernels and the portable twin (AVX2 keeps their f32 path),
    /// each level rounded to the nearest of 128 steps over the codebook's span.
    pub const fn with_int8(self, on: bool) -> Self {
        Self { int8: on, ..self }
    }

    /// Whether the int8 path is on.
    pub const fn int8(&self) -> bool {
        self.int8
    }

    /// The AVX2 kernels, if this CPU runs them.
    pub fn avx2() -> Option<Self> {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Some(Self { avx2: true, avx512: false, int8: false });
            }
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        {
            return Some(Self { avx2: true, avx512: false, int8: false });
        }
        #[allow(unreachable_code)]
        None
    }

    /// The AVX2 kernels with AVX-512 where it pays, if this CPU runs them: the int8 path's key tiles
    /// multiply with `vpdpbusd` (VNNI) on 64-byte vectors, four channels of 32 tokens by a query in two
    /// instructions, after `vpermb` (VBMI) has put each token's four codes in one dword. Needs AVX-512 F,
    /// BW, VL, VNNI and VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later) beside the AVX2 set. The results
    /// are the same bits as [`Kernel::avx2`]'s and the portable twins'.
    pub fn avx512() -> Option<Self> {
        let base = Self::avx2()?;
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vbmi")
            {
                return Some(Self { avx512: true, ..base });
            }
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vl",
            target_feature = "avx512vnni",
            target_feature = "avx512vbmi"
        ))]
        {
            return Some(Self { avx512: true, ..base });
        }
        #[allow(unreachable_code)]
        {
            let _ = base;
            None
        }
    }

    /// The fastest kernels this CPU runs.
    pub fn detect() -> Self {
        Self::avx512().or_else(Self::avx2).unwrap_or(Self::PORTABLE)
    }

    /// `"avx512"`, `"avx2"` or `"portable"`, with `"+int8"` where the int8 path is on.
    pub fn name(&self) -> &'static str {
        match (self.avx512, self.avx2, self.int8) {
            (true, _, false) => "avx512",
            (true, _, true) => "avx512+int8",
            (false, true, false) => "avx2",
            (false, true, true) => "avx2+int8",
            (false, false, false) => "portable",
            (false, false, true) => "portable+int8",
        }
    }

    /// Whether the vector path is usable for a head dimension.
    fn vector(self, d: usize) -> bool {
        self.avx2 && d.is_multiple_of(8)
    }
}

/// `nq` query rows of `d`, already multiplied by the softmax scale.
pub(crate) struct Queries<'q> {
    pub(crate) q: &'q [f32],
    pub(crate) nq: usize,
    pub(crate) d: usize,
}

impl Queries<'_> {
    #[inline]
    pub(crate) fn row(&self, i: usize) -> &[f32] {
        &self.q[i * self.d..][..self.d]
    }
}

/// Score rows: query `qi`, token `t` of the current run, at `data[qi * stride + pos + t]`.
pub(crate) struct Scores<'s> {
    pub(crate) data: &'s mut [f32],
    pub(crate) stride: usize,
    pub(crate) pos: usize,
}

impl Scores<'_> {
    #[inline]
    pub(crate) fn at(&mut self, qi: usize, t: usize) -> &mut f32 {
        &mut self.data[qi * self.stride + self.pos + t]
    }
}

/// Probability rows, laid out as [`Scores`].
#[derive(Clone, Copy)]
pub(crate) struct Probs<'p> {
    pub(crate) data: &'p [f32],
    pub(crate) stride: usize,
    pub(crate) pos: usize,
}

impl Probs<'_> {
    #[inline]
    pub(crate) fn at(&self, qi: usize, t: usize) -> f32 {
        self.data[qi * self.stride + self.pos + t]
    }
}

/// One head of a per-channel quantized body, in key blocks (`cache::layout`).
pub(crate) struct ChannelBody<'c> {
    pub(crate) codes: &'c [u32],
    /// Tokens per block (a power of two, `cache::layout::key_block`).
    pub(crate) block: usize,
    /// Words of one channel's row within a block.
    pub(crate) block_words: usize,
    pub(crate) scale: &'c [u16],
    pub(crate) zero: &'c [u16],
    pub(crate) width: Width,
    pub(crate) group: usize,
}

impl ChannelBody<'_> {
    /// Scales and zero points of token group `gi`, one per channel of `d`.
    #[inline]
    pub(crate) fn group_params(&self, gi: usize, d: usize) -> (&[u16], &[u16]) {
        (&self.scale[gi * d..][..d], &self.zero[gi * d..][..d])
    }
}

/// One head of a per-token quantized body.
#[derive(Clone, Copy)]
pub(crate) struct TokenBody<'c> {
    pub(crate) codes: &'c [u32],
    pub(crate) row_words: usize,
    pub(crate) scale: &'c [u16],
    pub(crate) zero: &'c [u16],
    pub(crate) ring: usize,
    pub(crate) width: Width,
    pub(crate) group: usize,
    /// A codebook's levels as integers, which the int8 kernels read each code as (AVX-512 and the
    /// portable twin; `None`: the code itself).
    pub(crate) levels: Option<&'c Q8Levels>,
    /// The channels `a..b` of the sums its caller reads, where it reads only those (SKVQ's group passes,
    /// [`grouped_token_values`]): the AVX2 int8 kernels then skip the 32-channel runs outside them, whose
    /// sums are left unspecified. `None`: every channel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) reads: Option<(usize, usize)>,
}

/// Largest integer level of [`Q8Levels`]: with [`Q8_VALUE_MAX`], a product of at most 127 * 127 and a tile's
/// sum below `Q8_TILE * 127 * 127` (2,064,512), exact in f32 and in AVX-512's dwords.
#[cfg(target_arch = "x86_64")]
pub(crate) const Q8_LEVEL_MAX: f32 = 127.0;

/// A codebook's reconstruction levels on the int8 value path: level `k` is read as `base + step * bytes[k]`,
/// with `bytes[k] = rint((level_k - base) / step)`, `base` the lowest level and `step` the span over
/// [`Q8_LEVEL_MAX`], so each is off by at most `step / 2` (entries past the codebook's levels repeat
/// its last, as codes never reach them). A value `s * level + z` is then
/// `(s * step) * bytes[code] + (z + s * base)`: the kernels sum the integer levels as they sum uniform codes,
/// with `step` folded into each tile's scale, and the zero points are staged with `s * base` added.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Q8Levels {
    pub(crate) bytes: [u8; 16],
    pub(crate) step: f32,
    pub(crate) base: f32,
}

#[cfg(target_arch = "x86_64")]
impl Q8Levels {
    /// The integer levels of codebook reconstruction levels `dec` (1 to 16 of them), or `None` where one
    /// is not finite or their span overflows.
    pub(crate) fn of(dec: &[f32]) -> Option<Self> {
        if dec.is_empty() || dec.len() > 16 || dec.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let (lo, hi) = dec.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let span = hi - lo;
        // An infinite span (finite levels far apart) or a subnormal step: no integer levels.
        let step = if span > 0.0 { span / Q8_LEVEL_MAX } else { 1.0 };
        if !step.is_normal() {
            return None;
        }
        let bytes = core::array::from_fn(|k| {
            let x = libm::rintf((dec[k.min(dec.len() - 1)] - lo) / step);
            x.clamp(0.0, Q8_LEVEL_MAX) as u8
        });
        Some(Self { bytes, step, base: lo })
    }
}

/// Widths the vector kernels unpack (ternary codes are stored as 2-bit).
#[cfg(target_arch = "x86_64")]
fn vector_width(w: Width) -> bool {
    matches!(w, Width::B2 | Width::Ternary | Width::B4 | Width::B8)
}

/// The probabilities an attention call left in the scratch: row `h` holds query head `h`'s weights over the
/// held tokens in order (sinks, then body oldest first).
///
/// Decode leaves each row as the softmax's numerators `exp(x - max)` with the inverse of their sum beside
/// it, and [`AttnProbs::head`] divides a row the first time it is asked for: a step that only needs the
/// output never pays the pass.
#[derive(Debug)]
pub struct AttnProbs<'s> {
    data: &'s mut [f32],
    /// Per row, the factor still to apply (1 once applied).
    inv: &'s mut [f32],
    tokens: usize,
}

impl AttnProbs<'_> {
    /// Tokens per row.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Query head `h`'s probabilities (empty past the last head).
    pub fn head(&mut self, h: usize) -> &[f32] {
        let Some(row) = self.data.get_mut(h * self.tokens..(h + 1) * self.tokens) else {
            return &[];
        };
        if let Some(k) = self.inv.get_mut(h)
            && *k != 1.0
        {
            portable::scale(row, *k);
            *k = 1.0;
        }
        row
    }
}

/// Scratch floats the kernels need for `nq` query rows of `d`: folded queries and biases (per-channel
/// keys), per-token probability products and zero-point partial sums (per-token values), the int8
/// path's sums, rounded weights and scales ([`q8_value_work`] with groups of 16 channels, the smallest a
/// quantized per-token stream has), and its folded keys for a key block of 32-token groups
/// ([`q8_key_work`]).
const fn work_len(nq: usize, d: usize) -> usize {
    let q8 = q8_value_work(nq, d, d / 16 + 1);
    let k8 = q8_key_work(nq, d, KEY_BLOCK / 32);
    let f = nq * (3 * d + 64);
    let m = if q8 > f { q8 } else { f };
    if k8 > m { k8 } else { m }
}

/// Floats of work the int8 key path needs to fold `groups` key groups at once: per group and query the
/// scaled query (`d`), its rounded pairs (`d / 2`), and `delta`, bias and inverse scale.
pub(crate) const fn q8_key_work(nq: usize, d: usize, groups: usize) -> usize {
    groups * nq * (d + d / 2 + 3)
}

/// Tokens per tile of the int8 value path: the weights of one tile share a scale.
///
/// 128 tokens rather than 64: each tile pays a reduction, two divisions and a rounding per channel group
/// and query, and these serial steps were the costliest part of the value kernel per instruction. Halving
/// their count took the int8 decode step at 16k tokens on one thread from 14.1 to 13.9 ms (best of six
/// alternating runs; medians 15.3 and 14.3).
pub const Q8_TILE: usize = 128;

/// Largest rounded value weight of the int8 path (7 bits and sign-free, `vpmaddubsw`'s unsigned side).
///
/// AVX2 sums 2-bit codes in 16 bits and widens them to dwords every 32 token pairs (at most
/// `32 * 2 * 3 * 127` = 24,384), 3-bit codes every 16 (`16 * 2 * 7 * 127` = 28,448), 4-bit codes every 8
/// (`8 * 2 * 15 * 127` = 30,480); AVX-512 VNNI sums in dwords. Until 2026-12-07 2-bit weights were rounded
/// to 85 levels, which let a whole tile's 64 pairs stay in 16 bits: on `kvq2`'s values that lost `kvq
/// demo`'s planted fact, which 127 levels find (SmolLM2, Zen 4); on `kivi4` 85 levels added half again the
/// KL divergence its keys did.
pub const Q8_VALUE_MAX: f32 = 127.0;

/// Largest integer of the int8 path's folded queries over `d` channels of `width` codes: 127, or less
/// where `d * max_code * 127` would pass the 16-bit sums AVX2 accumulates (`head_dim` above 85 at 2 bits).
/// 4-bit codes keep 127: their sums are dwords (AVX-512 VNNI; AVX2 widens its 16-bit sums every 8 channel
/// pairs, at most `8 * 2 * 15 * 127` = 30,480), and `d * 15 * 127` stays exact in f32 up to `head_dim` 8,800.
pub fn q8_key_max(d: usize, width: Width) -> f32 {
    if width == Width::B4 {
        return 127.0;
    }
    let cmax = (1usize << width.bits()) - 1;
    (i16::MAX as usize / (d * cmax).max(1)).clamp(1, 127) as f32
}

/// Floats of work the int8 value path needs: sums `l` and integer sums (`nq * d` each), zero-point lanes
/// (`nq * groups * 8`), rounded weights and scales (`groups * nq * (Q8_TILE + 1)`), the AVX2 twin's
/// channel-permuted sums and paired weights (`nq * d`, `groups * nq * Q8_TILE / 2`), and the vector
/// kernels' copy of a last, partial tile: code rows (`d / 8` words a token at 4 bits) and f16 scales and
/// zero points (`groups` floats a token).
const fn q8_value_work(nq: usize, d: usize, groups: usize) -> usize {
    3 * nq * d
        + nq * groups * 8
        + groups * nq * (Q8_TILE + 1)
        + groups * nq * Q8_TILE / 2
        + Q8_TILE * (d / 8 + groups)
}

/// Whether the int8 path reads a key body of `width` codes: up to 2 bits, and 4.
fn q8_width(kernel: Kernel, width: Width) -> bool {
    kernel.int8 && matches!(width, Width::B1 | Width::B2 | Width::Ternary | Width::B4)
}

/// Whether the int8 path reads a value body of `width` codes: the key widths and 3 bits (`kvq3`). 3-bit
/// keys stay off it: no preset stores them per channel, and their folded queries would round to fewer
/// levels ([`q8_key_max`]).
fn q8_value_width(kernel: Kernel, width: Width) -> bool {
    q8_width(kernel, width) || kernel.int8 && width == Width::B3
}

/// Whether the vector int8 key kernels unpack codes of `width` (2-bit and ternary, 4-bit); 1-bit bodies
/// run the portable twin.
#[cfg(target_arch = "x86_64")]
fn q8_vector_width(width: Width) -> bool {
    width.bits() == 2 || width == Width::B4
}

/// Whether the vector int8 value kernels unpack codes of `width`: the key kernels' widths and 3 bits.
#[cfg(target_arch = "x86_64")]
fn q8_vector_value_width(width: Width) -> bool {
    q8_vector_width(width) || width == Width::B3
}

/// Scratch floats a decode needs over `tokens` held tokens (pass the capacity to size it once): the
/// scores of every query head and their softmax denominators, which come back as [`AttnProbs`], plus
/// working space.
pub const fn decode_scratch_len(tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> usize {
    let ratio = match q_heads.checked_div(kv_heads) {
        Some(r) => r,
        None => 0,
    };
    q_heads * (tokens + 1) + ratio * head_dim + work_len(ratio, head_dim)
}

/// Scratch floats a prefill of `chunk` tokens needs over `tokens` held tokens (pass the capacity to size
/// it once): one KV head's scores, scaled queries and output sums at a time, plus working space.
pub const fn prefill_scratch_len(
    tokens: usize,
    chunk: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> usize {
    let ratio = match q_heads.checked_div(kv_heads) {
        Some(r) => r,
        None => 0,
    };
    let nq = ratio * chunk;
    nq * (tokens + chunk) + 2 * nq * head_dim + work_len(nq, head_dim)
}

/// Floats the generic formats need for `nq` query rows of one KV head, beyond the KIVI kernels' scratch,
/// as `[queries, rows, acc, params]`: the transformed queries of a rotated or balanced plain key body; for a
/// generic per-channel key body, the score accumulators (`[nq][G]`), the queries per offset within a key
/// group (`[nq][d][G]`) and their biases (`[nq][G]`); the stored-basis value sums of a transformed or
/// generic value body; FP8 group parameters decoded to f16 (two to a float) for the KIVI kernels, a key
/// block's ([`fp8_key_scores`]) or a value tile's ([`staged_token_values`]).
const fn generic_parts(cfg: &CacheConfig, nq: usize) -> [usize; 4] {
    let d = cfg.head_dim;
    // The KIVI kernels read FP8 per-channel keys on x86-64 only ([`fp8_key_scores`]).
    let kivi_keys = cfg.plain_keys() || cfg!(target_arch = "x86_64") && fp8_channel_keys(cfg);
    let queries = if cfg.transform.keys() && kivi_keys { nq * d } else { 0 };
    let rows = match cfg.keys {
        Precision::Quant(q) if !cfg.plain_keys() && matches!(q.axis, Axis::PerChannel) => {
            q.group * nq * (d + 2)
        }
        _ => 0,
    };
    let acc = if cfg.generic(true) { nq * d } else { 0 };
    let keys = match cfg.keys {
        Precision::Quant(q) if fp8_channel_keys(cfg) => KEY_BLOCK / q.group * d,
        _ => 0,
    };
    // FP8 and codebook value bodies stage a tile's parameters ([`staged_token_values`],
    // [`codebook_token_values`]).
    // Permuted ones (SKVQ's) stage one group's at a time, beside their sums ([`grouped_token_values`]).
    let values = match cfg.values {
        Precision::Quant(q) if matches!(q.axis, Axis::PerToken) && q.permuted => GROUPED_TILE + nq * d,
        Precision::Quant(q)
            if matches!(q.axis, Axis::PerToken)
                && (matches!(q.params, crate::quant::param::ParamFormat::Fp8E4M3) || q.codebook) =>
        {
            FP8_TILE * d.div_ceil(q.group)
        }
        _ => 0,
    };
    // Only x86-64 reads FP8 and codebook bodies through the KIVI kernels; elsewhere (the firmware) they
    // take the generic path, and the scratch stays as it was.
    let params = if !cfg!(target_arch = "x86_64") {
        0
    } else if keys > values {
        keys
    } else {
        values
    };
    [queries, rows, acc, params]
}

/// Whether the key body is KIVI's per-channel format but for FP8 (E4M3) group parameters, with at most
/// the transforms and tiers the KIVI kernels take around it: balancing and rotation (stored-basis
/// queries) and MiKV's tiers (corrections added to the scores). No RoPE by offset, centring, codebook,
/// outliers or permutation; groups of a multiple of 16 tokens. On x86-64 such a body is read by the KIVI
/// kernels a block at a time ([`fp8_key_scores`]); elsewhere by the generic path.
const fn fp8_channel_keys(cfg: &CacheConfig) -> bool {
    match cfg.keys {
        Precision::Quant(q) => {
            matches!(q.axis, Axis::PerChannel)
                && matches!(q.params, crate::quant::param::ParamFormat::Fp8E4M3)
                && crate::cache::QuantSpec { params: crate::quant::param::ParamFormat::F16, ..q }.plain()
                && cfg.transform.rope.is_none()
                && !cfg.transform.center_keys
                && q.group.is_multiple_of(16)
        }
        Precision::F16 => false,
    }
}

/// The total of [`generic_parts`].
const fn generic_work(cfg: &CacheConfig, nq: usize) -> usize {
    let [queries, rows, acc, params] = generic_parts(cfg, nq);
    queries + rows + acc + params
}

impl CacheConfig {
    /// Scratch floats a decode over this cache needs ([`decode_scratch_len`] at the capacity, plus what
    /// the generic formats need).
    pub const fn decode_scratch_len(&self, q_heads: usize) -> usize {
        let ratio = match q_heads.checked_div(self.kv_heads) {
            Some(r) => r,
            None => 0,
        };
        decode_scratch_len(self.capacity, q_heads, self.kv_heads, self.head_dim) + generic_work(self, ratio)
    }

    /// Scratch floats a prefill of `chunk` tokens over this cache needs ([`prefill_scratch_len`] at the
    /// capacity, plus what the generic formats need).
    pub const fn prefill_scratch_len(&self, chunk: usize, q_heads: usize) -> usize {
        let ratio = match q_heads.checked_div(self.kv_heads) {
            Some(r) => r,
            None => 0,
        };
        prefill_scratch_len(self.capacity, chunk, q_heads, self.kv_heads, self.head_dim)
            + generic_work(self, ratio * chunk)
    }
}

/// The generic formats' parts of the scratch (see [`generic_work`]); empty where unused.
struct GenericWork<'w> {
    /// Queries in the stored basis of a rotated or balanced plain key body.
    queries: &'w mut [f32],
    /// A key group's rows.
    rows: &'w mut [f32],
    /// Stored-basis value sums.
    acc: &'w mut [f32],
    /// FP8 parameters decoded to f16 (two to a float; x86-64 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    params: &'w mut [f32],
}

impl<'w> GenericWork<'w> {
    /// Splits the generic parts off the end of `work` (whose front stays the KIVI kernels' work).
    fn split(cfg: &CacheConfig, nq: usize, work: &'w mut [f32]) -> (&'w mut [f32], Self) {
        let [nqueries, nrows, nacc, _] = generic_parts(cfg, nq);
        let at = work.len() - generic_work(cfg, nq);
        let (front, rest) = work.split_at_mut(at);
        let (queries, rest) = rest.split_at_mut(nqueries);
        let (acc, rest) = rest.split_at_mut(nacc);
        let (rows, params) = rest.split_at_mut(nrows);
        (front, Self { queries, rows, acc, params })
    }

    /// The stored-basis queries of a rotated or balanced plain key body: `H (q / b)` per row.
    fn stored_queries(&mut self, cache: &Cache<'_>, h: usize, q: &[f32], d: usize) {
        let cfg = cache.config();
        if self.queries.is_empty() {
            return;
        }
        let t = cfg.transform;
        self.queries.copy_from_slice(q);
        let balance = cache.view(Stream::Keys).tables.balance;
        for row in self.queries.chunks_exact_mut(d) {
            if t.balance_keys {
                for (x, &b) in row.iter_mut().zip(&balance[h * d..][..d]) {
                    *x /= b;
                }
            }
            if t.rotate_keys {
                crate::transform::hadamard(row);
            }
        }
    }
}

struct Shape {
    kv_heads: usize,
    d: usize,
    ratio: usize,
}

fn check_shape(cache: &Cache<'_>, q_heads: usize, scale: f32) -> Result<Shape> {
    let cfg = cache.config();
    if q_heads == 0 || !q_heads.is_multiple_of(cfg.kv_heads) {
        return Err(Error::ShapeMismatch {
            what: "q_heads (a multiple of kv_heads)",
            expected: cfg.kv_heads,
            got: q_heads,
        });
    }
    if !scale.is_finite() {
        return Err(Error::NonFinite { index: 0 });
    }
    Ok(Shape { kv_heads: cfg.kv_heads, d: cfg.head_dim, ratio: q_heads / cfg.kv_heads })
}

fn check_finite(x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { index }),
        None => Ok(()),
    }
}

/// Decode attention of one position over everything the cache holds.
///
/// `q` is `[q_heads][head_dim]`, `out` receives `[q_heads][head_dim]`; `scale` multiplies the scores
/// (usually `1/sqrt(head_dim)`). The caller appends the position's key and value first. `scratch` needs
/// [`decode_scratch_len`] floats for the cache's capacity.
///
/// # Errors
/// [`Error::ShapeMismatch`] for lengths that do not fit the cache; [`Error::NonFinite`] for a NaN or
/// infinite query or scale; [`Error::BufferTooSmall`] for a short scratch; [`Error::EmptyInput`] if the
/// cache holds no token.
pub fn decode<'s>(
    cache: &Cache<'_>,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &'s mut [f32],
    kernel: Kernel,
) -> Result<AttnProbs<'s>> {
    decode_heads(cache, 0..cache.config().kv_heads, q, q_heads, scale, out, scratch, kernel)
}

fn check_heads(heads: &core::ops::Range<usize>, kv_heads: usize) -> Result<()> {
    if heads.start >= heads.end || heads.end > kv_heads {
        return Err(Error::ShapeMismatch {
            what: "KV head range (non-empty, within kv_heads)",
            expected: kv_heads,
            got: heads.end,
        });
    }
    Ok(())
}

/// [`decode`] for the KV heads in `heads` only (and their query heads), so that callers can run head
/// groups on different threads, each with its own `out` and `scratch`. Rows of `out` (and of the returned
/// probabilities) that belong to other heads are left as they were.
///
/// # Errors
/// As [`decode`], and [`Error::ShapeMismatch`] for an empty range or one past the cache's heads.
#[allow(clippy::too_many_arguments)]
pub fn decode_heads<'s>(
    cache: &Cache<'_>,
    heads: core::ops::Range<usize>,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &'s mut [f32],
    kernel: Kernel,
) -> Result<AttnProbs<'s>> {
    let sh = check_shape(cache, q_heads, scale)?;
    check_heads(&heads, sh.kv_heads)?;
    let d = sh.d;
    if q.len() != q_heads * d {
        return Err(Error::ShapeMismatch { what: "query length", expected: q_heads * d, got: q.len() });
    }
    if out.len() != q_heads * d {
        return Err(Error::ShapeMismatch { what: "output length", expected: q_heads * d, got: out.len() });
    }
    check_finite(q)?;
    let held = cache.held();
    if held == 0 {
        return Err(Error::EmptyInput { what: "cache" });
    }
    let cfg = cache.config();
    let generic_len = generic_work(cfg, sh.ratio);
    need(
        "attention scratch",
        decode_scratch_len(held, q_heads, sh.kv_heads, d) + generic_len,
        scratch.len(),
    )?;
    let (scores, rest) = scratch.split_at_mut(q_heads * held);
    let (inv, rest) = rest.split_at_mut(q_heads);
    let (qs, work) = rest.split_at_mut(sh.ratio * d);
    let (work, mut gw) = GenericWork::split(cfg, sh.ratio, work);
    // Rows of other heads are handed back as they are.
    inv.fill(1.0);
    let keys = cache.view(Stream::Keys);
    let values = cache.view(Stream::Values);
    for h in heads {
        let rows = h * sh.ratio..(h + 1) * sh.ratio;
        for (o, &x) in qs.iter_mut().zip(&q[rows.start * d..rows.end * d]) {
            *o = x * scale;
        }
        gw.stored_queries(cache, h, qs, d);
        let qv = Queries { q: qs, nq: sh.ratio, d };
        let sc = &mut scores[rows.start * held..rows.end * held];
        key_scores(cache, &keys, h, &qv, sc, held, work, &mut gw, kernel);
        // The values take the softmax's numerators and the outputs its denominators (a pass over the
        // scores fewer); `AttnProbs` divides a row only when it is asked for.
        for (row, iv) in sc.chunks_exact_mut(held).zip(&mut inv[rows.clone()]) {
            *iv = 1.0 / exp_shifted(row, kernel);
        }
        let o = &mut out[rows.start * d..rows.end * d];
        o.fill(0.0);
        let pr = Probs { data: sc, stride: held, pos: 0 };
        value_sums(cache, &values, h, &pr, sh.ratio, o, work, &mut gw, kernel);
        for (orow, &iv) in o.chunks_exact_mut(d).zip(&inv[rows]) {
            scale_row(orow, iv, kernel);
        }
    }
    Ok(AttnProbs { data: scores, inv, tokens: held })
}

/// Prefill attention of a chunk of `n` positions that follow what the cache holds.
///
/// `q` is `[n][q_heads][head_dim]`; `k` and `v` are the chunk's keys and values `[n][kv_heads][head_dim]`
/// in full precision (as KIVI's prefill attends); `out` receives `[n][q_heads][head_dim]`. Position `i`
/// attends to every held token and to chunk positions `0..=i`. The caller appends `k` and `v` to the cache
/// afterwards. `scratch` needs [`prefill_scratch_len`] floats.
///
/// # Errors
/// As [`decode`], and [`Error::ShapeMismatch`] if `k`, `v` or `out` do not match `q`.
#[allow(clippy::too_many_arguments)]
pub fn prefill(
    cache: &Cache<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_heads: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
    kernel: Kernel,
) -> Result<()> {
    prefill_heads(cache, 0..cache.config().kv_heads, q, k, v, q_heads, scale, out, scratch, kernel)
}

/// [`prefill`] for the KV heads in `heads` only (see [`decode_heads`]); rows of `out` that belong to
/// other heads are left as they were.
///
/// # Errors
/// As [`prefill`], and [`Error::ShapeMismatch`] for an empty range or one past the cache's heads.
#[allow(clippy::too_many_arguments)]
pub fn prefill_heads(
    cache: &Cache<'_>,
    heads: core::ops::Range<usize>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_heads: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
    kernel: Kernel,
) -> Result<()> {
    let sh = check_shape(cache, q_heads, scale)?;
    check_heads(&heads, sh.kv_heads)?;
    let d = sh.d;
    let n = q.len() / (q_heads * d);
    if n == 0 || q.len() != n * q_heads * d {
        return Err(Error::ShapeMismatch {
            what: "query length (n * q_heads * head_dim)",
            expected: q_heads * d,
            got: q.len(),
        });
    }
    let kv = n * sh.kv_heads * d;
    if k.len() != kv || v.len() != kv {
        return Err(Error::ShapeMismatch {
            what: "chunk key/value length",
            expected: kv,
            got: k.len().min(v.len()),
        });
    }
    if out.len() != q.len() {
        return Err(Error::ShapeMismatch { what: "output length", expected: q.len(), got: out.len() });
    }
    check_finite(q)?;
    check_finite(k)?;
    check_finite(v)?;
    let held = cache.held();
    let nq = sh.ratio * n;
    let cfg = cache.config();
    let generic_len = generic_work(cfg, nq);
    need(
        "attention scratch",
        prefill_scratch_len(held, n, q_heads, sh.kv_heads, d) + generic_len,
        scratch.len(),
    )?;
    let stride = held + n;
    let (scores, rest) = scratch.split_at_mut(nq * stride);
    let (qs, rest) = rest.split_at_mut(nq * d);
    let (acc, work) = rest.split_at_mut(nq * d);
    let (work, mut gw) = GenericWork::split(cfg, nq, work);
    let keys = cache.view(Stream::Keys);
    let values = cache.view(Stream::Values);
    for h in heads {
        // Query rows in order (position i, head r of the group) -> row i * ratio + r.
        for i in 0..n {
            for r in 0..sh.ratio {
                let src = &q[(i * q_heads + h * sh.ratio + r) * d..][..d];
                for (o, &x) in qs[(i * sh.ratio + r) * d..][..d].iter_mut().zip(src) {
                    *o = x * scale;
                }
            }
        }
        gw.stored_queries(cache, h, qs, d);
        let qv = Queries { q: qs, nq, d };
        if held > 0 {
            key_scores(cache, &keys, h, &qv, scores, stride, work, &mut gw, kernel);
        }
        for (row, qrow) in qs.chunks_exact(d).enumerate() {
            let i = row / sh.ratio;
            let srow = &mut scores[row * stride..][..stride];
            for (j, s) in srow[held..].iter_mut().enumerate() {
                *s = if j <= i { dot(qrow, &k[(j * sh.kv_heads + h) * d..][..d]) } else { f32::NEG_INFINITY };
            }
            softmax(&mut srow[..held + i + 1], kernel);
            srow[held + i + 1..].fill(0.0);
        }
        acc.fill(0.0);
        if held > 0 {
            let pr = Probs { data: scores, stride, pos: 0 };
            value_sums(cache, &values, h, &pr, nq, acc, work, &mut gw, kernel);
        }
        for (row, a) in acc.chunks_exact_mut(d).enumerate() {
            let i = row / sh.ratio;
            for j in 0..=i {
                let p = scores[row * stride + held + j];
                for (o, &x) in a.iter_mut().zip(&v[(j * sh.kv_heads + h) * d..][..d]) {
                    *o += p * x;
                }
            }
            let r = row % sh.ratio;
            out[(i * q_heads + h * sh.ratio + r) * d..][..d].copy_from_slice(a);
        }
    }
    Ok(())
}

/// `a · b` with 8 partial sums (the compiler vectorizes them; a single running sum it may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x_i = exp(x_i - max)`; returns their sum (see [`portable::exp_shifted`]).
#[allow(unsafe_code)] // calls into the AVX2 kernels, see the SAFETY notes
fn exp_shifted(x: &mut [f32], kernel: Kernel) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if kernel.avx2 {
        // SAFETY: a `Kernel` with `avx2` set exists only where the CPU has AVX2, FMA and F16C (`Kernel::avx2`).
        return unsafe { avx2::exp_shifted(x) };
    }
    let _ = kernel;
    portable::exp_shifted(x)
}

/// `x *= k`.
#[allow(unsafe_code)] // calls into the AVX2 kernels, see the SAFETY notes
fn scale_row(x: &mut [f32], k: f32, kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if kernel.avx2 {
        // SAFETY: as in `exp_shifted`.
        unsafe { avx2::scale(x, k) };
        return;
    }
    let _ = kernel;
    portable::scale(x, k);
}

/// Numerically stable softmax in place: `x_i = exp(x_i - max) / sum_j exp(x_j - max)`.
fn softmax(x: &mut [f32], kernel: Kernel) {
    let sum = exp_shifted(x, kernel);
    scale_row(x, 1.0 / sum, kernel);
}

/// Which storage a run of held tokens sits in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// f16 sinks, token-major, slot = sink index.
    Sinks,
    /// The quantized (or fp16) body ring.
    Body,
    /// The f16 full-precision window, token-major, slot = body index mod R.
    Window,
}

/// A run of `len` held tokens in slots `start..` of `part`, at position `pos` in token order.
#[derive(Clone, Copy)]
struct Segment {
    part: Part,
    start: usize,
    len: usize,
    pos: usize,
}

/// The held tokens of one stream as runs in token order (sinks, body oldest first, window): the walk over
/// the layout that keys and values share.
fn segments(cache: &Cache<'_>, sv: &StreamView<'_>) -> impl Iterator<Item = Segment> {
    let c = cache.counts();
    let q_end = sv.q_end.max(c.base);
    let body = ring_runs(c.base, q_end, sv.layout.ring).map(move |r| Segment {
        part: Part::Body,
        start: r.start,
        len: r.len,
        pos: c.sinks + r.offset,
    });
    let window_pos = c.sinks + (q_end - c.base);
    let window = ring_runs(q_end, c.n, cache.config().residual).map(move |r| Segment {
        part: Part::Window,
        start: r.start,
        len: r.len,
        pos: window_pos + r.offset,
    });
    core::iter::once(Segment { part: Part::Sinks, start: 0, len: c.sinks, pos: 0 })
        .chain(body)
        .chain(window)
        .filter(|s| s.len > 0)
}

/// The logical body index of a body segment's first token.
fn body_index(cache: &Cache<'_>, seg: Segment) -> usize {
    let c = cache.counts();
    c.base + (seg.pos - c.sinks)
}

/// The f16 token rows of a sinks or window segment of KV head `h`.
fn token_rows<'c>(cache: &Cache<'_>, sv: &StreamView<'c>, h: usize, seg: Segment) -> &'c [u16] {
    let cfg = cache.config();
    let (region, slots) = match seg.part {
        Part::Sinks => (sv.sinks, cfg.sinks),
        _ => (sv.window, cfg.residual),
    };
    let d = cfg.head_dim;
    &region[(h * slots + seg.start) * d..][..seg.len * d]
}

/// Fills `scores[qi * stride + t]` for every held token `t` of KV head `h`.
#[allow(clippy::too_many_arguments)]
fn key_scores(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    h: usize,
    q: &Queries<'_>,
    scores: &mut [f32],
    stride: usize,
    work: &mut [f32],
    gw: &mut GenericWork<'_>,
    kernel: Kernel,
) {
    let (d, l) = (q.d, sv.layout);
    let vector = kernel.vector(d);
    let cfg = cache.config();
    // The body's queries: in the stored basis where a plain body is rotated or balanced.
    let stored = if gw.queries.is_empty() {
        Queries { q: q.q, nq: q.nq, d }
    } else {
        Queries { q: gw.queries, nq: q.nq, d }
    };
    let mut offsets_ready = false;
    for seg in segments(cache, sv) {
        let mut out = Scores { data: scores, stride, pos: seg.pos };
        match (seg.part, sv.precision) {
            (Part::Sinks | Part::Window, _) => {
                dot_rows(token_rows(cache, sv, h, seg), seg.len, q, &mut out, vector)
            }
            #[cfg(target_arch = "x86_64")]
            (Part::Body, Precision::Quant(spec))
                if fp8_channel_keys(cfg)
                    && (vector || q8_width(kernel, spec.width))
                    && l.block.is_multiple_of(spec.group) =>
            {
                fp8_key_scores(sv, spec, h, seg, &stored, &mut out, work, gw.params, vector, kernel);
                if let Some(tv) = TierView::of(cache) {
                    let j0 = body_index(cache, seg);
                    generic::tier_key_scores_flat(&tv, h, j0, seg.len, &stored, &mut out, vector);
                }
            }
            (Part::Body, Precision::Quant(spec)) if !cfg.plain_keys() => match spec.axis {
                Axis::PerChannel if generic::dequant_path(spec, q.nq, vector) => {
                    let tiers = TierView::of(cache).map(|tv| (tv, body_index(cache, seg)));
                    generic::channel_key_scores_dequant(
                        cache, sv, spec, h, seg.start, seg.len, q, &mut out, gw.rows, tiers,
                    );
                }
                Axis::PerChannel => {
                    let (acc, rest) = gw.rows.split_at_mut(spec.group * q.nq);
                    let (oq, bias) = rest.split_at_mut(spec.group * q.nq * d);
                    let avx512 = kernel.avx512 && vector;
                    if !offsets_ready {
                        generic::offset_queries(cache, h, spec.group, q, oq, bias, vector, avx512);
                        offsets_ready = true;
                    }
                    generic::channel_key_scores(
                        sv, spec, h, seg.start, seg.len, q.nq, d, oq, bias, &mut out, acc, vector, avx512,
                    );
                    if let Some(tv) = TierView::of(cache) {
                        let j0 = body_index(cache, seg);
                        generic::tier_key_scores(&tv, h, j0, seg.len, q.nq, d, spec.group, oq, &mut out);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                Axis::PerToken
                    if kernel.int8 && q.nq < generic::DEQUANT_QUERIES && generic::q8_token_keys(spec, d) =>
                {
                    let kernels = match (vector, kernel.avx512) {
                        (false, _) => generic::Q8Keys::Portable,
                        (true, false) => generic::Q8Keys::Avx2,
                        (true, true) => generic::Q8Keys::Avx512,
                    };
                    generic::token_key_scores_q8(cache, sv, spec, h, seg.start, seg.len, q, &mut out, kernels)
                }
                Axis::PerToken => {
                    generic::token_key_scores(cache, sv, spec, h, seg.start, seg.len, q, &mut out, vector)
                }
            },
            (Part::Body, Precision::F16) => {
                let body = &sv.body_f16()[h * d * l.ring..][..d * l.ring];
                f16_keys(body, seg, q, &mut out, vector);
            }
            (Part::Body, Precision::Quant(spec)) if spec.axis == Axis::PerChannel => {
                let gd = l.row_groups * d;
                let words = l.key_head_words(d);
                let b = ChannelBody {
                    codes: &sv.codes[h * words..][..words],
                    block: l.block,
                    block_words: l.row_words,
                    scale: &sv.scale[h * gd..][..gd],
                    zero: &sv.zero[h * gd..][..gd],
                    width: spec.width,
                    group: spec.group,
                };
                let int8 = q8_width(kernel, spec.width);
                channel_keys(&b, seg, &stored, &mut out, work, vector, int8, kernel.avx512);
            }
            (Part::Body, Precision::Quant(spec)) => {
                let b = token_body(sv, h, spec.width, spec.group);
                portable::scores_q_token(&b, seg.start, seg.len, &stored, &mut out);
            }
        }
    }
}

/// KIVI's key kernels over a per-channel body with FP8 group parameters ([`fp8_channel_keys`]), a key block
/// at a time: the block's parameters are decoded and stored as f16 first, which is exact (every E4M3 value
/// is an f16 value), so each block is scored as the plain body with the same parameters would be, on
/// the int8 path where `kernel` takes it (its portable twin as well) and in f32 otherwise. `q` holds the
/// stored-basis queries. Before this, such bodies (MiKV's keys) took the generic per-offset path, with
/// one query per offset of a group although every offset's was the same.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn fp8_key_scores(
    sv: &StreamView<'_>,
    spec: crate::cache::QuantSpec,
    h: usize,
    seg: Segment,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    stage: &mut [f32],
    vector: bool,
    kernel: Kernel,
) {
    let (l, d, g) = (sv.layout, q.d, spec.group);
    let (block, gd, words) = (l.block, l.row_groups * d, l.key_head_words(d));
    debug_assert!(g.is_multiple_of(16) && block.is_multiple_of(g) && block <= KEY_BLOCK);
    let codes = &sv.codes[h * words..][..words];
    let (s8, z8) = (&sv.scale8[h * gd..][..gd], &sv.zero8[h * gd..][..gd]);
    let int8 = q8_width(kernel, spec.width);
    let bg = block / g;
    // The block's parameters (at most `KEY_BLOCK / g * d` floats of the scratch, [`generic_parts`]).
    let (scale, zero) = staged_params(stage, bg * d);
    let mut t = 0;
    while t < seg.len {
        let slot = seg.start + t;
        let b0 = slot - slot % block;
        let n = (b0 + block - slot).min(seg.len - t);
        for gi in slot / g..(slot + n).div_ceil(g) {
            let (src, dst) = (gi * d, (gi - b0 / g) * d);
            fp8_f16(&s8[src..][..d], &mut scale[dst..][..d], kernel);
            fp8_f16(&z8[src..][..d], &mut zero[dst..][..d], kernel);
        }
        let b = ChannelBody {
            codes: &codes[l.key_row(b0, 0, d)..][..d * l.row_words],
            block,
            block_words: l.row_words,
            scale: &*scale,
            zero: &*zero,
            width: spec.width,
            group: g,
        };
        let part = Segment { part: Part::Body, start: slot - b0, len: n, pos: seg.pos + t };
        let mut o = Scores { data: &mut *out.data, stride: out.stride, pos: out.pos + t };
        channel_keys(&b, part, q, &mut o, work, vector, int8, kernel.avx512);
        t += n;
    }
}

/// Adds `sum_t p[qi][t] * v_t` over every held token of KV head `h` into `out[qi]`.
#[allow(clippy::too_many_arguments)]
fn value_sums(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    h: usize,
    p: &Probs<'_>,
    nq: usize,
    out: &mut [f32],
    work: &mut [f32],
    gw: &mut GenericWork<'_>,
    kernel: Kernel,
) {
    let (d, l) = (cache.config().head_dim, sv.layout);
    let vector = kernel.vector(d);
    let out = &mut out[..nq * d];
    // Body sums in the stored basis where the body is transformed or generic, turned back at the end.
    let stored = !gw.acc.is_empty();
    let acc = &mut gw.acc[..if stored { nq * d } else { 0 }];
    acc.fill(0.0);
    for seg in segments(cache, sv) {
        let pr = Probs { pos: seg.pos, ..*p };
        match (seg.part, sv.precision) {
            (Part::Sinks | Part::Window, _) => {
                axpy_rows(token_rows(cache, sv, h, seg), seg.len, &pr, d, out, vector)
            }
            (Part::Body, Precision::F16) => {
                let body = &sv.body_f16()[h * l.ring * d..][..l.ring * d];
                axpy_rows(&body[seg.start * d..][..seg.len * d], seg.len, &pr, d, out, vector);
            }
            #[cfg(target_arch = "x86_64")]
            (Part::Body, Precision::Quant(spec))
                if (vector || q8_value_width(kernel, spec.width)) && fp8_plain(spec) =>
            {
                let dst = if stored { &mut *acc } else { &mut *out };
                staged_token_values(sv, spec, h, seg, &pr, d, dst, work, gw.params, vector, kernel, None);
            }
            #[cfg(target_arch = "x86_64")]
            (Part::Body, Precision::Quant(spec))
                if kernel.int8 && (kernel.avx512 || !vector) && codebook_values(spec, d) =>
            {
                let dst = if stored { &mut *acc } else { &mut *out };
                codebook_token_values(sv, spec, h, seg, &pr, d, dst, work, gw.params, vector, kernel);
            }
            #[cfg(target_arch = "x86_64")]
            (Part::Body, Precision::Quant(spec)) if kernel.int8 && grouped_values(spec, d) => {
                let dst = if stored { &mut *acc } else { &mut *out };
                grouped_token_values(sv, spec, h, seg, &pr, d, dst, work, gw.params, vector, kernel);
            }
            (Part::Body, Precision::Quant(spec)) if !spec.plain() => generic::token_value_sums(
                sv,
                spec,
                h,
                seg.start,
                seg.len,
                &pr,
                d,
                acc,
                vector,
                kernel.avx512 && vector,
            ),
            (Part::Body, Precision::Quant(spec)) => {
                let b = token_body(sv, h, spec.width, spec.group);
                let dst = if stored { &mut *acc } else { &mut *out };
                let int8 = q8_value_width(kernel, spec.width);
                token_values(&b, seg, &pr, d, dst, work, vector, int8, kernel.avx512);
            }
        }
        if seg.part == Part::Body
            && let Some(tv) = TierView::of(cache)
        {
            // Tiers make the value body generic, so its sums are in `acc`.
            generic::tier_value_sums(&tv, h, body_index(cache, seg), seg.len, &pr, d, acc, vector);
        }
    }
    if stored {
        generic::finish_values(cache, sv, h, acc, out);
    }
}

/// Tokens of a per-token body with FP8 parameters or codebook levels whose parameters
/// [`staged_token_values`] turns into f16 at a time.
const FP8_TILE: usize = 256;

/// Tokens of a permuted per-token value body (SKVQ's) that [`grouped_token_values`] stages and sums a
/// group at a time. Each pass ends by putting its sums back in order and scaling them, whose cost is
/// per pass: at 128 tokens a pass (half [`FP8_TILE`], as it was) that and the kernel's set-up were a
/// tenth of `skvq2`'s step at 1k tokens on Zen 3.
const GROUPED_TILE: usize = 512;

/// Whether a per-token value body is KIVI's but for FP8 (E4M3) group parameters: no codebook, outliers or
/// permutation, groups the vector kernels take.
#[cfg(target_arch = "x86_64")]
fn fp8_plain(q: crate::cache::QuantSpec) -> bool {
    q.params == crate::quant::param::ParamFormat::Fp8E4M3
        && crate::cache::QuantSpec { params: crate::quant::param::ParamFormat::F16, ..q }.plain()
        && q.axis == Axis::PerToken
        && q.group.is_multiple_of(16)
}

/// KIVI's value kernels over a per-token body with FP8 group parameters or codebook levels: a tile of
/// [`FP8_TILE`] tokens at a time, its parameters are decoded and stored as f16 first. That is exact (every
/// E4M3 value is an f16 value), so each tile is summed as the plain body with the same parameters would
/// be, on the int8 path where `kernel` takes it (the portable twin as well, so that it gives the vector
/// kernels' bits) and in f32 otherwise. With `levels` (a codebook's, [`codebook_token_values`]) the
/// kernels read each code as its integer level, the zero points are staged shifted by the lowest level
/// ([`shift_zeros`]; a tile that leaves f16's range takes the generic path), and each tile's outliers are
/// added after it, in f32. x86-64 only: elsewhere (the firmware) these bodies take the generic f32 path,
/// which needs no tile of parameters in the scratch. Measured with `decode_bench` at 8k tokens: the
/// generic lookup path this replaced took `kvq2`'s step from 0.74x to 0.46x of fp16's (AVX2); the int8
/// path took it from 17.3-18.3 to 12.5-13.0 ms on AVX-512 and from 20.4-20.9 to 18.6-18.9 ms on AVX2
/// (Zen 4, alternating runs).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn staged_token_values(
    sv: &StreamView<'_>,
    spec: crate::cache::QuantSpec,
    h: usize,
    seg: Segment,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    stage: &mut [f32],
    vector: bool,
    kernel: Kernel,
    levels: Option<&Q8Levels>,
) {
    let l = sv.layout;
    let int8 = levels.is_some() || q8_value_width(kernel, spec.width);
    let avx512 = kernel.avx512 && vector;
    let groups = d / spec.group;
    debug_assert!(l.row_groups == groups);
    // The tile's parameters: `FP8_TILE * groups` floats of the scratch ([`generic_parts`]). They were two
    // stack arrays sized for the largest head, 16 KiB zeroed a call; with the same for FP8 keys, that
    // zeroing was 3.6% of `mikv2`'s decode samples at 1k tokens (`perf`, Zen 4).
    let (scale, zero) = staged_params(stage, FP8_TILE * groups);
    for t0 in (0..seg.len).step_by(FP8_TILE) {
        let nt = FP8_TILE.min(seg.len - t0);
        let pt = Probs { pos: p.pos + t0, ..*p };
        let mut finite = true;
        for gj in 0..groups {
            let at = (h * l.row_groups + gj) * l.ring + seg.start + t0;
            let (s, z) = (&mut scale[gj * FP8_TILE..][..nt], &mut zero[gj * FP8_TILE..][..nt]);
            stage_token_params(sv, spec, at, s, z, kernel);
            if let Some(lv) = levels {
                finite &= shift_zeros(s, z, lv.base, avx512);
            }
        }
        if !finite {
            generic::token_value_sums(sv, spec, h, seg.start + t0, nt, &pt, d, out, vector, avx512);
            continue;
        }
        let b = TokenBody {
            codes: &sv.codes[(h * l.ring + seg.start + t0) * l.row_words..][..nt * l.row_words],
            row_words: l.row_words,
            scale: &*scale,
            zero: &*zero,
            ring: FP8_TILE,
            width: spec.width,
            group: spec.group,
            levels,
            reads: None,
        };
        let tile = Segment { part: Part::Body, start: 0, len: nt, pos: seg.pos + t0 };
        token_values(&b, tile, &pt, d, out, work, vector, int8, kernel.avx512);
        generic::add_token_outliers(sv, spec, h, d, seg.start + t0, nt, &pt, out, avx512);
    }
}

/// Whether a per-token value body is read by [`codebook_token_values`]: codebook levels (outliers and
/// FP8 parameters allowed, no permutation), codes the vector int8 kernels unpack, groups of a multiple of
/// 32 channels over a head_dim of a multiple of 64.
#[cfg(target_arch = "x86_64")]
fn codebook_values(q: crate::cache::QuantSpec, d: usize) -> bool {
    q.codebook
        && !q.permuted
        && q.axis == Axis::PerToken
        && q8_vector_value_width(q.width)
        && q.group.is_multiple_of(32)
        && d.is_multiple_of(64)
}

/// The int8 value kernels over a per-token body with codebook levels ([`codebook_values`]; the AVX-512
/// kernels and their portable twin, which gives the same bits; AVX2 keeps the generic f32 path): the
/// codebook's levels as integers ([`Q8Levels`]), which the kernels read each code as, the tiles staged by
/// [`staged_token_values`]. The result differs from the exact path's by the level rounding (at most
/// `step / 2` of each value's scale), the zero points' f16 rounding (half an ulp) and the int8 weights.
/// A codebook without finite integer levels takes the generic path.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn codebook_token_values(
    sv: &StreamView<'_>,
    spec: crate::cache::QuantSpec,
    h: usize,
    seg: Segment,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    stage: &mut [f32],
    vector: bool,
    kernel: Kernel,
) {
    match sv.coder(spec, h).levels.and_then(|(_, dec)| Q8Levels::of(dec)) {
        Some(lv) => staged_token_values(sv, spec, h, seg, p, d, out, work, stage, vector, kernel, Some(&lv)),
        None => {
            let avx512 = kernel.avx512 && vector;
            generic::token_value_sums(sv, spec, h, seg.start, seg.len, p, d, out, vector, avx512)
        }
    }
}

/// Whether a per-token value body is read by [`grouped_token_values`]: permuted groups (SKVQ's), uniform
/// codes the vector int8 kernels unpack, a head_dim of a multiple of 64.
#[cfg(target_arch = "x86_64")]
fn grouped_values(q: crate::cache::QuantSpec, d: usize) -> bool {
    q.permuted
        && !q.codebook
        && q.axis == Axis::PerToken
        && q8_vector_value_width(q.width)
        && d.is_multiple_of(64)
}

/// The int8 value kernels over a per-token body whose channel groups are a calibrated permutation's, of
/// any sizes (SKVQ's; [`grouped_values`]), on every kernel set: one group at a time, the kernels sum the
/// rows with that group's scales and zero points (staged as f16 [`GROUPED_TILE`] tokens at a time, as
/// [`staged_token_values`] stages them) into `nq * d` floats of the scratch, and the group's channels of
/// those sums are added to `out` (stored order). So each output channel is the int8 path's sum over its
/// own group's parameters, within the bound the int8 path derives for a group, at the cost of a pass per
/// group (the AVX2 kernels sum only the 32-channel runs the group touches, [`TokenBody::reads`]; an empty
/// group takes none). The generic f32 path reconstructs every row and adds each query's products:
/// with its keys on the int8 path too, that was two thirds of `skvq2`'s decode step (`perf`, 8k tokens,
/// Zen 4). Outliers are added after, in f32.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn grouped_token_values(
    sv: &StreamView<'_>,
    spec: crate::cache::QuantSpec,
    h: usize,
    seg: Segment,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    stage: &mut [f32],
    vector: bool,
    kernel: Kernel,
) {
    let l = sv.layout;
    let groups = d / spec.group;
    let nq = out.len() / d;
    let (_, bounds) = sv.tables.order(h, d, groups);
    let (params, sums) = stage.split_at_mut(GROUPED_TILE);
    let sums = &mut sums[..nq * d];
    let (scale, zero) = staged_params(params, GROUPED_TILE);
    for g in 0..groups {
        let (a, b) = (generic::group_start(spec, bounds, g), generic::group_start(spec, bounds, g + 1));
        if a == b {
            continue;
        }
        sums.fill(0.0);
        for t0 in (0..seg.len).step_by(GROUPED_TILE) {
            let nt = GROUPED_TILE.min(seg.len - t0);
            let at = (h * l.row_groups + g) * l.ring + seg.start + t0;
            stage_token_params(sv, spec, at, &mut scale[..nt], &mut zero[..nt], kernel);
            let body = TokenBody {
                codes: &sv.codes[(h * l.ring + seg.start + t0) * l.row_words..][..nt * l.row_words],
                row_words: l.row_words,
                scale: &*scale,
                zero: &*zero,
                ring: GROUPED_TILE,
                width: spec.width,
                group: d,
                levels: None,
                reads: Some((a, b)),
            };
            let tile = Segment { part: Part::Body, start: 0, len: nt, pos: seg.pos + t0 };
            let pt = Probs { pos: p.pos + t0, ..*p };
            token_values(&body, tile, &pt, d, sums, work, vector, true, kernel.avx512);
        }
        for (o, x) in out.chunks_exact_mut(d).zip(sums.chunks_exact(d)) {
            for (o, x) in o[a..b].iter_mut().zip(&x[a..b]) {
                *o += x;
            }
        }
    }
    generic::add_token_outliers(sv, spec, h, d, seg.start, seg.len, p, out, kernel.avx512 && vector);
}

/// A per-token body's group parameters from entry `at` (`scale.len()` consecutive tokens of one group) as
/// f16 bits into `scale` and `zero`: copied, or decoded from FP8 (exact).
#[cfg(target_arch = "x86_64")]
fn stage_token_params(
    sv: &StreamView<'_>,
    spec: crate::cache::QuantSpec,
    at: usize,
    scale: &mut [u16],
    zero: &mut [u16],
    kernel: Kernel,
) {
    let n = scale.len();
    if spec.params == crate::quant::param::ParamFormat::Fp8E4M3 {
        fp8_f16(&sv.scale8[at..][..n], scale, kernel);
        fp8_f16(&sv.zero8[at..][..n], zero, kernel);
    } else {
        scale.copy_from_slice(&sv.scale[at..][..n]);
        zero.copy_from_slice(&sv.zero[at..][..n]);
    }
}

/// Shifts staged zero points by a codebook's lowest level: `zero[i] = f16(fma(scale[i], base, zero[i]))`
/// (round to nearest even), with F16C where `f16c` (AVX-512 kernels), else in software (the same bits).
/// Returns whether every result is finite.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn shift_zeros(scale: &[u16], zero: &mut [u16], base: f32, f16c: bool) -> bool {
    if f16c {
        // SAFETY: AVX-512 kernels exist only where the CPU has AVX2, FMA and F16C (`Kernel::avx512`).
        unsafe { avx2::shift_zeros(scale, zero, base) };
    } else {
        for (z, &s) in zero.iter_mut().zip(scale) {
            let (sf, zf) = (half::f16::from_bits(s).to_f32(), half::f16::from_bits(*z).to_f32());
            *z = half::f16::from_f32(libm::fmaf(sf, base, zf)).to_bits();
        }
    }
    // Exponent all ones: infinite (or NaN).
    zero.iter().all(|&z| z & 0x7c00 != 0x7c00)
}

/// The scratch's FP8 staging (`GenericWork::params`, [`generic_parts`]) as `n` f16 scales and `n` zero
/// points.
#[cfg(target_arch = "x86_64")]
fn staged_params(stage: &mut [f32], n: usize) -> (&mut [u16], &mut [u16]) {
    bytemuck::cast_slice_mut::<f32, u16>(&mut stage[..n]).split_at_mut(n)
}

/// FP8 (E4M3) parameters to their f16 bits (exact, [`crate::quant::param::FP8_E4M3_F16`]): 32 at a time
/// on the AVX-512 kernels, 16 at a time on AVX2 ones, else a table read each.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn fp8_f16(src: &[u8], dst: &mut [u16], kernel: Kernel) {
    if kernel.avx512 {
        // SAFETY: a `Kernel` with `avx512` set exists only where the CPU has AVX-512 F, BW, VL, VNNI and
        // VBMI beside AVX2, FMA and F16C (`Kernel::avx512`).
        return unsafe { avx2::avx512::fp8_to_f16(src, dst) };
    }
    if kernel.avx2 {
        // SAFETY: a `Kernel` with `avx2` set exists only where the CPU has AVX2, FMA and F16C
        // (`Kernel::avx2`).
        return unsafe { avx2::fp8_to_f16(src, dst) };
    }
    let t = &crate::quant::param::FP8_E4M3_F16;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = t[usize::from(x)];
    }
}

fn token_body<'c>(sv: &StreamView<'c>, h: usize, width: Width, group: usize) -> TokenBody<'c> {
    let l = sv.layout;
    let gr = l.row_groups * l.ring;
    TokenBody {
        codes: &sv.codes[h * l.ring * l.row_words..][..l.ring * l.row_words],
        row_words: l.row_words,
        scale: &sv.scale[h * gr..][..gr],
        zero: &sv.zero[h * gr..][..gr],
        ring: l.ring,
        width,
        group,
        levels: None,
        reads: None,
    }
}

// Dispatchers: each runs the AVX2 twin where `vector` (an AVX2 `Kernel` and a head_dim it covers) and the
// shape allow, else the portable one. SAFETY, for every `unsafe` call below: `vector` implies an AVX2
// `Kernel`, which exists only where the CPU has AVX2, FMA and F16C (`Kernel::avx2`).

#[allow(unsafe_code)]
fn dot_rows(rows: &[u16], n: usize, q: &Queries<'_>, out: &mut Scores<'_>, vector: bool) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: see the note above the dispatchers.
        return unsafe { avx2::dot_rows_f16(rows, n, q, out) };
    }
    let _ = vector;
    portable::dot_rows_f16(rows, n, q, out);
}

#[allow(unsafe_code)]
fn axpy_rows(rows: &[u16], n: usize, p: &Probs<'_>, d: usize, out: &mut [f32], vector: bool) {
    #[cfg(target_arch = "x86_64")]
    if vector && d.is_multiple_of(16) {
        // SAFETY: see the note above the dispatchers.
        return unsafe { avx2::axpy_rows_f16(rows, n, p, d, out) };
    }
    let _ = vector;
    portable::axpy_rows_f16(rows, n, p, d, out);
}

#[allow(unsafe_code)]
fn f16_keys(body: &[u16], seg: Segment, q: &Queries<'_>, out: &mut Scores<'_>, vector: bool) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: see the note above the dispatchers.
        return unsafe { avx2::scores_f16_channel(body, seg.start, seg.len, q, out) };
    }
    let _ = vector;
    portable::scores_f16_channel(body, seg.start, seg.len, q, out);
}

#[allow(unsafe_code, clippy::too_many_arguments)]
fn channel_keys(
    b: &ChannelBody<'_>,
    seg: Segment,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    vector: bool,
    int8: bool,
    avx512: bool,
) {
    if int8 {
        #[cfg(target_arch = "x86_64")]
        if vector && q8_vector_width(b.width) && b.group.is_multiple_of(32) && q.d.is_multiple_of(16) {
            if avx512 {
                // SAFETY: a `Kernel` with `avx512` set exists only where the CPU has AVX-512 F, BW, VL,
                // VNNI and VBMI beside AVX2, FMA and F16C (`Kernel::avx512`).
                return unsafe { avx2::avx512::scores_q8_channel(b, seg.start, seg.len, q, out, work) };
            }
            // SAFETY: see the note above the dispatchers.
            return unsafe { avx2::scores_q8_channel(b, seg.start, seg.len, q, out, work) };
        }
        let _ = avx512;
        return portable::scores_q8_channel(b, seg.start, seg.len, q, out, work);
    }
    #[cfg(target_arch = "x86_64")]
    if vector && vector_width(b.width) && b.group.is_multiple_of(16) {
        // SAFETY: see the note above the dispatchers.
        return unsafe { avx2::scores_q_channel(b, seg.start, seg.len, q, out, work, avx512) };
    }
    let _ = vector;
    portable::scores_q_channel(b, seg.start, seg.len, q, out, work);
}

#[allow(unsafe_code, clippy::too_many_arguments)]
fn token_values(
    b: &TokenBody<'_>,
    seg: Segment,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    vector: bool,
    int8: bool,
    avx512: bool,
) {
    if int8 {
        #[cfg(target_arch = "x86_64")]
        if vector
            && q8_vector_value_width(b.width)
            && b.group.is_multiple_of(32)
            && d.is_multiple_of(64)
            && (avx512 || b.levels.is_none())
        {
            if avx512 {
                // SAFETY: a `Kernel` with `avx512` set exists only where the CPU has AVX-512 F, BW, VL,
                // VNNI and VBMI beside AVX2, FMA and F16C (`Kernel::avx512`).
                return unsafe { avx2::avx512::values_q8_token(b, seg.start, seg.len, p, d, out, work) };
            }
            // SAFETY: see the note above the dispatchers.
            return unsafe { avx2::values_q8_token(b, seg.start, seg.len, p, d, out, work) };
        }
        let _ = avx512;
        return portable::values_q8_token(b, seg.start, seg.len, p, d, out, work);
    }
    #[cfg(target_arch = "x86_64")]
    if vector && (vector_width(b.width) || b.width == Width::B3 && d >= 32) && b.group.is_multiple_of(16) {
        // SAFETY: see the note above the dispatchers; `avx512` comes from a `Kernel` with AVX-512 set
        // (`Kernel::avx512`).
        return unsafe { avx2::values_q_token(b, seg.start, seg.len, p, d, out, work, avx512) };
    }
    let _ = (vector, work, avx512);
    debug_assert!(b.levels.is_none(), "integer levels are the int8 path's");
    portable::values_q_token(b, seg.start, seg.len, p, d, out);
}

#[cfg(test)]
mod tests;
