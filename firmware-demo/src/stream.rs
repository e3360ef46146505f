//! The firmware's workload, shared word for word with the host: the `kvq-tests` crate includes this file
//! and runs it over the same stream, so that the two can be compared bit for bit.
//!
//! Per policy, every token of one real layer is streamed through a `kvq-core` cache: its key and value are
//! appended, its query attends to the cache with the portable kernels (decode), and the bits of every
//! output row go into a running FNV-1a hash, reported every [`CHECKPOINT`] tokens and at the end. A tiered
//! cache also takes the attention its window received, as the host runtime hands it over.

use kvq_core::attention::{self, Kernel};
use kvq_core::cache::{Cache, CacheConfig, Overflow, Precision, QuantSpec, Tiers, Transform};
use kvq_core::pack::Width;
use kvq_core::quant::param::ParamFormat;
use kvq_core::transform::Rope;

/// A layer's shape and RoPE, and the stream's length.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Tokens in the stream.
    pub tokens: usize,
    /// The model's RoPE.
    pub rope: Rope,
    /// SKVQ's clipping factor, from the model's calibration.
    pub clip: f32,
}

/// Policies streamed, in order.
pub const POLICIES: usize = 7;

/// Tokens between two reported hashes.
pub const CHECKPOINT: usize = 64;

/// Residual window of the quantized policies: 32 tokens, as small as a 32-token key group allows, since a
/// microcontroller's arena is small (the host presets keep 128).
const R: usize = 32;

/// Policy `i` for `s` at `capacity` tokens: its name (in the `--kv` grammar) and configuration. The
/// sliding KIVI caches hold half the stream, so they slide. The last is KIVI-2 cut to a small arena's
/// size: 16-token key groups and window (the window is the largest fixed cost: 24 KiB at 32 tokens for
/// SmolLM2's layer), 64-channel value groups and FP8 parameters.
pub const fn policy(i: usize, s: &Shape, capacity: usize) -> (&'static str, CacheConfig) {
    let (kv, d) = (s.kv_heads, s.head_dim);
    let kivi2 = CacheConfig::kivi(Width::B2, 32, R, kv, d, capacity).with_sinks(4);
    let fp8 = ParamFormat::Fp8E4M3;
    let kvq2 = CacheConfig {
        keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_params(fp8)),
        values: Precision::Quant(QuantSpec::per_token(Width::B2, 64).with_params(fp8)),
        ..kivi2.with_transform(Transform {
            rope: Some(s.rope),
            rotate_keys: true,
            rotate_values: true,
            ..Transform::NONE
        })
    };
    match i {
        0 => ("f16", CacheConfig::fp16(kv, d, capacity)),
        1 => ("kivi2:r=32:s=4 (sliding)", kivi2.with_overflow(Overflow::Slide)),
        2 => ("kvq2:k=2:kg=32:r=32:p=fp8", kvq2),
        3 => (
            "mikv2:r=32",
            CacheConfig {
                keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_params(fp8)),
                values: Precision::Quant(QuantSpec::per_token(Width::B2, 32).with_params(fp8)),
                ..kivi2
                    .with_transform(Transform { balance_keys: true, ..Transform::NONE })
                    .with_tiers(Tiers { keep: 2, width: Width::B4 })
            },
        ),
        5 => (
            "kvquant2:r=32",
            CacheConfig {
                keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_codebook().with_outliers(
                    // 1% of a key group's elements, rounded as the host's `out=0.01` rounds them.
                    (32 * d + 50) / 100,
                )),
                values: Precision::Quant(
                    QuantSpec::per_token(Width::B2, 32).with_codebook().with_outliers((kv * d + 50) / 100),
                ),
                ..CacheConfig::kivi(Width::B2, 32, R, kv, d, capacity)
                    .with_sinks(1)
                    .with_transform(Transform { rope: Some(s.rope), ..Transform::NONE })
            },
        ),
        6 => (
            "skvq2:r=32",
            CacheConfig {
                keys: Precision::Quant(
                    QuantSpec { permuted: true, clip: s.clip, ..QuantSpec::per_token(Width::B2, 32) }
                        .with_params(fp8),
                ),
                values: Precision::Quant(
                    QuantSpec { permuted: true, clip: s.clip, ..QuantSpec::per_token(Width::Ternary, 32) }
                        .with_params(fp8),
                ),
                ..CacheConfig::kivi(Width::B2, 32, R, kv, d, capacity).with_sinks(5)
            },
        ),
        _ => (
            "kivi2:kg=16:vg=64:r=16:s=4:p=fp8 (sliding)",
            CacheConfig {
                keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 16).with_params(fp8)),
                values: Precision::Quant(QuantSpec::per_token(Width::B2, 64).with_params(fp8)),
                ..CacheConfig::kivi(Width::B2, 16, 16, kv, d, capacity)
                    .with_sinks(4)
                    .with_overflow(Overflow::Slide)
            },
        ),
    }
}

/// The host preset whose calibration tables policy `i` reads (`kvq dump-qkv` writes them into the stream
/// file), if any.
pub const fn calibrated(i: usize) -> Option<&'static str> {
    match i {
        3 => Some("mikv2"),
        5 => Some("kvquant2"),
        6 => Some("skvq2"),
        _ => None,
    }
}

/// The capacity policy `i` streams with.
pub const fn stream_capacity(i: usize, s: &Shape) -> usize {
    if i == 1 || i == 4 { s.tokens / 2 } else { s.tokens }
}

/// The largest capacity of policy `i` whose arena fits in `bytes` (0 if none does).
pub const fn max_context(i: usize, s: &Shape, bytes: usize) -> usize {
    let (mut lo, mut hi) = (0usize, 1usize << 24);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let b = policy(i, s, mid).1.arena_bytes();
        if b != 0 && b <= bytes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Words of the largest arena any policy streams with.
pub const fn arena_words(s: &Shape) -> usize {
    let mut i = 0;
    let mut m = 0;
    while i < POLICIES {
        let b = policy(i, s, stream_capacity(i, s)).1.arena_bytes();
        if b > m {
            m = b;
        }
        i += 1;
    }
    m / 4
}

/// Floats of the largest decode scratch any policy needs.
pub const fn scratch_len(s: &Shape) -> usize {
    let mut i = 0;
    let mut m = 0;
    while i < POLICIES {
        let n = policy(i, s, stream_capacity(i, s)).1.decode_scratch_len(s.q_heads);
        if n > m {
            m = n;
        }
        i += 1;
    }
    m
}

/// 64-bit FNV-1a over bytes: any single changed bit changes it, since every
/// step is a bijection of the state for a fixed input byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hash(pub u64);

impl Default for Hash {
    fn default() -> Self {
        Self::new()
    }
}

impl Hash {
    /// The empty hash.
    pub const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Adds the little-endian bits of `xs`.
    pub fn add(&mut self, xs: &[f32]) {
        for x in xs {
            for b in x.to_bits().to_le_bytes() {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
}

/// What a policy's run reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    /// Tokens streamed.
    pub tokens: usize,
    /// Tokens held at the end.
    pub held: usize,
    /// Bytes of the policy's arena.
    pub arena_bytes: usize,
    /// Bits per element held at the end (everything counted).
    pub bits_per_element: f64,
    /// Hash of every output row.
    pub hash: u64,
}

/// Buffers a run needs: `q` (`q_heads * head_dim`), `k` and `v` (`kv_heads * head_dim`), `out` (as `q`),
/// `scratch` ([`scratch_len`]) and `received` (`kv_heads * R`).
pub struct Buffers<'b> {
    /// Query row.
    pub q: &'b mut [f32],
    /// Key row.
    pub k: &'b mut [f32],
    /// Value row.
    pub v: &'b mut [f32],
    /// Attention output.
    pub out: &'b mut [f32],
    /// Attention scratch.
    pub scratch: &'b mut [f32],
    /// Attention received by a tiered cache's window, per KV head.
    pub received: &'b mut [f32],
}

/// Floats `Buffers::received` needs.
pub const fn received_len(s: &Shape) -> usize {
    s.kv_heads * R
}

/// Streams `s.tokens` tokens through policy `i` over `arena`: `tables` is the policy's calibration blob
/// ([`calibrated`]; empty for the others), loaded into the cache first; `fill(t, q, k, v)` writes token
/// `t`'s rows, `output(row)` sees each output row as it is hashed, `checkpoint(t, hash)` the hash after
/// every [`CHECKPOINT`] tokens.
///
/// # Errors
/// The cache's and attention's errors, and the blob's ([`kvq_core::cache::blob::load_tables`]).
#[allow(clippy::too_many_arguments)]
pub fn run(
    i: usize,
    s: &Shape,
    arena: &mut [u32],
    tables: &[u32],
    b: Buffers<'_>,
    mut fill: impl FnMut(usize, &mut [f32], &mut [f32], &mut [f32]),
    mut output: impl FnMut(&[f32]),
    mut checkpoint: impl FnMut(usize, u64),
) -> kvq_core::Result<Report> {
    let (_, cfg) = policy(i, s, stream_capacity(i, s));
    let words = cfg.layout()?.total_words;
    let arena = arena.get_mut(..words).ok_or(kvq_core::Error::ArenaTooSmall { needed: words * 4, got: 0 })?;
    let mut cache = Cache::new(cfg, arena)?;
    if !tables.is_empty() {
        kvq_core::cache::blob::load_tables(&mut cache, tables)?;
    }
    let ratio = s.q_heads / s.kv_heads;
    let scale = 1.0 / libm::sqrtf(s.head_dim as f32);
    let mut hash = Hash::new();
    for t in 0..s.tokens {
        fill(t, b.q, b.k, b.v);
        cache.append(b.k, b.v)?;
        let w = cache.tier_window();
        {
            let mut probs =
                attention::decode(&cache, b.q, s.q_heads, scale, b.out, b.scratch, Kernel::PORTABLE)?;
            let held = probs.tokens();
            for h in 0..s.kv_heads {
                let recv = &mut b.received[h * R..h * R + w];
                recv.fill(0.0);
                for r in h * ratio..(h + 1) * ratio {
                    for (a, &p) in recv.iter_mut().zip(&probs.head(r)[held - w..]) {
                        *a += p;
                    }
                }
            }
        }
        for h in 0..s.kv_heads {
            cache.observe(h, &b.received[h * R..h * R + w])?;
        }
        output(b.out);
        hash.add(b.out);
        if (t + 1) % CHECKPOINT == 0 {
            checkpoint(t + 1, hash.0);
        }
    }
    let u = cache.usage();
    Ok(Report {
        tokens: s.tokens,
        held: cache.held(),
        arena_bytes: cache.layout().total_bytes,
        bits_per_element: u.bits_per_element(&cfg),
        hash: hash.0,
    })
}
