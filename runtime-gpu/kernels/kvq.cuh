// kvq's cache layout on the device: the one header every kernel includes.
//
// The arena is the same run of 32-bit words as kvq-core's `Cache` (core/src/cache/layout.rs): per
// stream, f16 sinks [kv_heads][S][d], an f16 window [kv_heads][R][d], then the body:
//   fp16 keys       f16 [kv_heads][ring/32][d][32]          blocks of 32 tokens, one line per channel
//   fp16 values     f16 [kv_heads][ring][d]                 token-major
//   per-channel     codes [kv_heads][ring/block][d][block*b/32 words], scale/zero f16 [kv_heads][ring/G][d]
//   per-token       codes [kv_heads][ring][d*b/32 words],    scale/zero f16 [kv_heads][d/G][ring]
// Codes are one little-endian bitstream per row: code i at bits i*b .. i*b+b.
//
// The structs below are the kernels' arguments. The Rust side (`kvq_gpu::abi`) declares them with
// #[repr(C)] and fills them from kvq-core's `Layout`; `tests/header.rs` compiles this header with the
// host C compiler and checks every field and every index rule against kvq-core. The functions marked
// KVQ_FN compile both as device code (NVRTC) and as host C, so that test runs them on the CPU.
#ifndef KVQ_CUH
#define KVQ_CUH

#ifdef __CUDACC__
#define KVQ_FN __device__ __forceinline__
#else
#define KVQ_FN static inline
#include <string.h>
#endif

// Parameter formats (kvq-core `ParamFormat`).
#define KVQ_PARAMS_F16 0u
#define KVQ_PARAMS_FP8 1u
// RoPE pairings of group-relative keys (kvq-core `Pairing`); NONE: keys stored as handed in.
#define KVQ_ROPE_NONE 0u
#define KVQ_ROPE_ADJACENT 1u
#define KVQ_ROPE_HALVES 2u
// An outlier slot with no outlier (kvq-core `EMPTY_SLOT`), a tier slot with no token (`EMPTY_TOKEN`).
#define KVQ_EMPTY_SLOT 0xffffu
#define KVQ_EMPTY_TOKEN 0xffffffffu

// Body kinds of a stream.
#define KVQ_F16 0u
#define KVQ_PER_CHANNEL 1u
#define KVQ_PER_TOKEN 2u

// Tokens per fp16 key block (kvq-core `KEY_BLOCK_F16`).
#define KVQ_KEY_BLOCK_F16 32u
// Largest tokens per quantized key block (kvq-core `KEY_BLOCK`).
#define KVQ_KEY_BLOCK 256u
// Largest group the cache takes (kvq-core `MAX_GROUP`).
#define KVQ_MAX_GROUP 256u
// Largest head_dim the attention kernels take (8 channels a lane).
#define KVQ_MAX_HEAD_DIM 256u
// Largest query heads per KV head.
#define KVQ_MAX_RATIO 8u

// One stream's regions, in words from the start of the arena, and its shape.
typedef struct {
    unsigned kind;          // KVQ_F16, KVQ_PER_CHANNEL or KVQ_PER_TOKEN
    unsigned bits;          // bits a code occupies (quantized streams)
    unsigned max_code;      // largest code (2^bits - 1; 2 for ternary)
    unsigned group;         // G: tokens (per-channel) or channels (per-token) per group
    unsigned ring;          // body slots
    unsigned block;         // tokens per key block (per-channel and fp16 keys)
    unsigned row_words;     // words of one code row
    unsigned row_groups;    // groups per row (ring/G per channel, d/G per token)
    unsigned window_tokens; // R for quantized streams, 0 for fp16
    unsigned sinks;         // word offset of the f16 sinks
    unsigned window;        // word offset of the f16 window
    unsigned codes;         // word offset of the body
    unsigned scale;         // word offset of the group scales (f16)
    unsigned zero;          // word offset of the group zero points (f16, or FP8 bytes)
    // The generic reader's fields (kvq_generic_row); zero for KIVI's plain formats.
    unsigned generic;    // 1: read through kvq_generic_row (calibrated formats, transforms, tiers)
    unsigned params;     // KVQ_PARAMS_F16 or KVQ_PARAMS_FP8
    unsigned levels_n;   // levels per codebook unit (0: the uniform grid)
    unsigned levels;     // word offset of the codebooks: [unit][encode, decode][levels_n] f32
    unsigned outliers_n; // outlier slots per unit (key group and head, or token)
    unsigned outliers;   // word offset of the slots: index (low 16 bits), f16 correction (high 16)
    unsigned permuted;   // 1: per-token groups over a channel permutation with variable bounds
    unsigned perm;       // word offset of the permutation [kv_heads][d] u16
    unsigned bounds;     // word offset of the group bounds [kv_heads][d/G + 1] u16
} KvqStream;

// A layer cache: its shape and both streams.
typedef struct {
    unsigned kv_heads;
    unsigned head_dim;
    unsigned capacity;
    unsigned sinks;     // S
    unsigned residual;  // R
    unsigned total_words;
    KvqStream keys;
    KvqStream values;
    // Transforms of the stored body (kvq-core `Transform`) and MiKV's tiers.
    unsigned rope;          // KVQ_ROPE_*: keys stored turned back to their key group's first position
    unsigned rotate_keys;   // 1: keys Hadamard-rotated
    unsigned rotate_values; // 1: values Hadamard-rotated
    unsigned center_keys;   // 1: calibrated key means subtracted
    unsigned balance_keys;  // 1: keys scaled by calibrated factors
    unsigned rope_table;    // word offset of [G][d/2][cos, sin] f32
    unsigned center;        // word offset of [kv_heads][d] f32
    unsigned balance;       // word offset of [kv_heads][d] f32
    unsigned tier_keep;     // promoted tokens per key group and head (0: no tiers)
    unsigned tier_bits;     // bits of the corrections
    unsigned tier_slot_words;
    unsigned tier_slots;    // word offset of the slots
} KvqLayout;

// The cache's token counts (kvq-core `Counts`) and where each stream's quantized run ends.
typedef struct {
    unsigned sinks;       // sinks held
    unsigned n;           // body tokens appended since the start
    unsigned base;        // first body token still held
    unsigned key_q_end;   // body tokens before this one are in the key body, the rest in the window
    unsigned value_q_end; // the same for values
} KvqCounts;

// One append: `sink_new` sink tokens then `tokens` body tokens, rows [token][kv_heads][d] of the input.
typedef struct {
    unsigned sink0;    // sinks held before
    unsigned sink_new; // input rows that become sinks
    unsigned n0;       // body tokens appended before
    unsigned tokens;   // body tokens in this append
    unsigned key_blocks0; // first key window block (of R tokens) flushed by this append
    unsigned key_blocks;  // key window blocks flushed
    unsigned value_q0;    // first body token whose value is quantized by this append
    unsigned value_q;     // values quantized
} KvqAppend;

// ---- bits and halves ----

KVQ_FN unsigned kvq_float_bits(float f) {
#ifdef __CUDACC__
    return __float_as_uint(f);
#else
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

KVQ_FN float kvq_bits_float(unsigned u) {
#ifdef __CUDACC__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// f16 bits to f32 (exact).
KVQ_FN float kvq_h2f(unsigned short h) {
#ifdef __CUDACC__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned s = ((unsigned)h & 0x8000u) << 16, e = ((unsigned)h >> 10) & 0x1fu, m = (unsigned)h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; // m * 2^-24, exact
        return kvq_bits_float(kvq_float_bits(v) | s);
    }
    if (e == 31) return kvq_bits_float(s | 0x7f800000u | (m << 13));
    return kvq_bits_float(s | ((e + 112u) << 23) | (m << 13));
#endif
}

// f32 to f16 bits, rounding to nearest, ties to even (as the `half` crate does).
KVQ_FN unsigned short kvq_f2h(float f) {
#ifdef __CUDACC__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned x = kvq_float_bits(f);
    unsigned sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u); // 65520 and up round to infinity
    if (a < 0x38800000u) {                                         // below 2^-14: an f16 subnormal
        unsigned e = a >> 23, shift = 126u - e;
        if (shift > 24u) return (unsigned short)sign;
        unsigned full = (a & 0x7fffffu) | 0x800000u, h = full >> shift;
        unsigned rem = full & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (unsigned short)(sign | h);
    }
    unsigned h = (a - 0x38000000u) >> 13, rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (unsigned short)(sign | h);
#endif
}

KVQ_FN unsigned short kvq_half_at(const unsigned *arena, unsigned word_offset, unsigned index) {
    return ((const unsigned short *)(arena + word_offset))[index];
}

KVQ_FN void kvq_set_half(unsigned *arena, unsigned word_offset, unsigned index, unsigned short h) {
    ((unsigned short *)(arena + word_offset))[index] = h;
}

// Code `i` of the bitstream at `row` (codes may straddle two words, as 3-bit ones do).
KVQ_FN unsigned kvq_code(const unsigned *row, unsigned i, unsigned bits) {
    unsigned bit = i * bits, w = bit >> 5, sh = bit & 31u, mask = (1u << bits) - 1u;
    unsigned v = row[w] >> sh;
    if (sh + bits > 32u) v |= row[w + 1] << (32u - sh);
    return v & mask;
}

// The value of `code` under (scale, zero): a multiply and an add, each rounded, as kvq-core's
// `GroupParams::decode` (not contracted into one fused multiply-add, as NVRTC would by default).
KVQ_FN float kvq_deq(unsigned code, float scale, float zero) {
#ifdef __CUDACC__
    return __fadd_rn(__fmul_rn((float)code, scale), zero);
#else
    return (float)code * scale + zero;
#endif
}

// ---- where things are ----

// Index, within one head's fp16 key body, of ring slot `slot`, channel `c` (kvq-core `key_f16`).
KVQ_FN unsigned kvq_key_f16(unsigned slot, unsigned c, unsigned d) {
    return ((slot / KVQ_KEY_BLOCK_F16) * d + c) * KVQ_KEY_BLOCK_F16 + slot % KVQ_KEY_BLOCK_F16;
}

// Word offset, within one head's per-channel key codes, of channel c's row in the block holding `slot`
// (kvq-core `key_row`).
KVQ_FN unsigned kvq_key_row(const KvqStream *s, unsigned slot, unsigned c, unsigned d) {
    return ((slot / s->block) * d + c) * s->row_words;
}

// Words of one head's per-channel key codes.
KVQ_FN unsigned kvq_key_head_words(const KvqStream *s, unsigned d) {
    return d * (s->ring / s->block) * s->row_words;
}

// Parameter index of per-channel key group holding `slot`, channel c, head h.
KVQ_FN unsigned kvq_key_param(const KvqStream *s, unsigned h, unsigned slot, unsigned c, unsigned d) {
    return (h * s->row_groups + slot / s->group) * d + c;
}

// Parameter index of per-token value group g of ring slot `slot`, head h.
KVQ_FN unsigned kvq_value_param(const KvqStream *s, unsigned h, unsigned g, unsigned slot) {
    return (h * s->row_groups + g) * s->ring + slot;
}

// Where held token t of a stream sits: 0 sink row, 1 window slot, 2 body slot; `*at` gets the row or slot.
KVQ_FN unsigned kvq_locate(const KvqLayout *l, const KvqCounts *k, unsigned q_end, const KvqStream *s,
                           unsigned t, unsigned *at) {
    if (t < k->sinks) {
        *at = t;
        return 0u;
    }
    unsigned j = k->base + (t - k->sinks);
    if (j >= q_end) {
        *at = j % l->residual;
        return 1u;
    }
    *at = j % s->ring;
    return 2u;
}

// Channel c of held token t of head h, for keys (`keys` non-zero) or values, as kvq-core reconstructs it.
KVQ_FN float kvq_element(const unsigned *arena, const KvqLayout *l, const KvqCounts *k, int keys, unsigned h,
                         unsigned t, unsigned c) {
    const KvqStream *s = keys ? &l->keys : &l->values;
    unsigned d = l->head_dim, at;
    unsigned where = kvq_locate(l, k, keys ? k->key_q_end : k->value_q_end, s, t, &at);
    if (where == 0u) return kvq_h2f(kvq_half_at(arena, s->sinks, (h * l->sinks + at) * d + c));
    if (where == 1u) return kvq_h2f(kvq_half_at(arena, s->window, (h * l->residual + at) * d + c));
    if (s->kind == KVQ_F16) {
        unsigned i = keys ? h * d * s->ring + kvq_key_f16(at, c, d) : (h * s->ring + at) * d + c;
        return kvq_h2f(kvq_half_at(arena, s->codes, i));
    }
    unsigned code, p;
    if (s->kind == KVQ_PER_CHANNEL) {
        const unsigned *row = arena + s->codes + h * kvq_key_head_words(s, d) + kvq_key_row(s, at, c, d);
        code = kvq_code(row, at & (s->block - 1u), s->bits);
        p = kvq_key_param(s, h, at, c, d);
    } else {
        code = kvq_code(arena + s->codes + (h * s->ring + at) * s->row_words, c, s->bits);
        p = kvq_value_param(s, h, c / s->group, at);
    }
    return kvq_deq(code, kvq_h2f(kvq_half_at(arena, s->scale, p)), kvq_h2f(kvq_half_at(arena, s->zero, p)));
}

// ---- the generic reader (kvq-core `Cache::dequantize_generic`) ----
//
// Every calibrated format reconstructs a body row in its stored basis, then turns it back: codes under
// each group's parameters (f16 or FP8) on the uniform grid or a calibrated codebook, plus outlier and tier
// corrections, channels permuted back; then the inverse transforms (centres, Hadamard, balance, RoPE by
// the token's offset in its key group). The arithmetic is kvq-core's operation for operation, each
// rounded on its own (no contraction), so the rows are the same bits; tests/header.rs checks them.

KVQ_FN float kvq_mul(float a, float b) {
#ifdef __CUDACC__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

KVQ_FN float kvq_add(float a, float b) {
#ifdef __CUDACC__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

KVQ_FN float kvq_sub(float a, float b) {
#ifdef __CUDACC__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

KVQ_FN float kvq_div(float a, float b) {
#ifdef __CUDACC__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// The value of an FP8 E4M3 byte (kvq-core `fp8_e4m3_value`): m * 2^-9 for exponent field 0, else
// (8 + m) * 2^(e - 10); e = 15, m = 7 is NaN. Every product is exact.
KVQ_FN float kvq_fp8(unsigned raw) {
    unsigned e = (raw >> 3) & 15u, m = raw & 7u, sign = (raw & 0x80u) << 24;
    float v;
    if (e == 15u && m == 7u) return kvq_bits_float(0x7fc00000u | sign);
    if (e == 0u)
        v = kvq_mul((float)m, 0.001953125f);
    else
        v = kvq_mul((float)(8u + m), kvq_bits_float((e - 10u + 127u) << 23));
    return kvq_bits_float(kvq_float_bits(v) | sign);
}

// The parameters at index i of a stream's parameter regions.
KVQ_FN void kvq_params(const unsigned *arena, const KvqStream *s, unsigned i, float *scale, float *zero) {
    if (s->params == KVQ_PARAMS_FP8) {
        *scale = kvq_fp8(((const unsigned char *)(arena + s->scale))[i]);
        *zero = kvq_fp8(((const unsigned char *)(arena + s->zero))[i]);
    } else {
        *scale = kvq_h2f(kvq_half_at(arena, s->scale, i));
        *zero = kvq_h2f(kvq_half_at(arena, s->zero, i));
    }
}

// The reconstruction of `code` in codebook unit `unit` (a head, or head * d + channel for per-channel
// keys): zero + scale * level for a codebook, code * scale + zero on the uniform grid.
KVQ_FN float kvq_decode(const unsigned *arena, const KvqStream *s, unsigned unit, unsigned code, float scale,
                        float zero) {
    if (s->levels_n == 0u) return kvq_deq(code, scale, zero);
    const float *dec = (const float *)(arena + s->levels) + (unit * 2u + 1u) * s->levels_n;
    return kvq_add(zero, kvq_mul(scale, dec[code]));
}

// The normalized Walsh-Hadamard transform of x[0..n] in place (kvq-core `transform::hadamard`).
KVQ_FN void kvq_hadamard(float *x, unsigned n) {
    for (unsigned h = 1u; h < n; h *= 2u)
        for (unsigned b = 0u; b < n; b += 2u * h)
            for (unsigned i = b; i < b + h; i++) {
                float u = x[i], v = x[i + h];
                x[i] = kvq_add(u, v);
                x[i + h] = kvq_sub(u, v);
            }
#ifdef __CUDACC__
    float k = __fdiv_rn(1.0f, __fsqrt_rn((float)n));
#else
    float k = 1.0f / __builtin_sqrtf((float)n);
#endif
    for (unsigned i = 0u; i < n; i++) x[i] = kvq_mul(x[i], k);
}

// Adds tier correction `keys` (or values) of body token j of head h to row[map(i)], if j is promoted
// (kvq-core `TierView::find` and `correction`). `perm`: the stored-to-row permutation or null.
KVQ_FN void kvq_tier_add(const unsigned *arena, const KvqLayout *l, int keys, unsigned h, unsigned j,
                         const unsigned short *perm, float *row) {
    if (l->tier_keep == 0u) return;
    unsigned d = l->head_dim, kg = l->keys.group, groups = l->keys.ring / kg, gi = (j % l->keys.ring) / kg;
    for (unsigned k = 0u; k < l->tier_keep; k++) {
        const unsigned *slot = arena + l->tier_slots + ((h * groups + gi) * l->tier_keep + k) * l->tier_slot_words;
        if (slot[0] != j) continue;
        unsigned tg = d % 64u == 0u ? 64u : d, bits = l->tier_bits;
        unsigned pw = d / tg + d * bits / 32u;
        const unsigned *part = slot + 1u + (keys ? 0u : pw);
        for (unsigned c = 0u; c < d; c++) {
            unsigned w = part[c / tg];
            float v = kvq_deq(kvq_code(part + d / tg, c, bits), kvq_h2f((unsigned short)(w & 0xffffu)),
                              kvq_h2f((unsigned short)(w >> 16)));
            unsigned at = perm ? perm[c] : c;
            row[at] = kvq_add(row[at], v);
        }
        return;
    }
}

// The inverse transforms of a stored-basis row of head h (kvq-core `Cache::inverse`); `offset` is the
// token's position in its key group (RoPE offsets).
KVQ_FN void kvq_inverse(const unsigned *arena, const KvqLayout *l, int keys, unsigned h, unsigned offset,
                        float *row) {
    unsigned d = l->head_dim;
    if (!keys) {
        if (l->rotate_values) kvq_hadamard(row, d);
        return;
    }
    if (l->center_keys) {
        const float *m = (const float *)(arena + l->center) + h * d;
        for (unsigned c = 0u; c < d; c++) row[c] = kvq_add(row[c], m[c]);
    }
    if (l->rotate_keys) kvq_hadamard(row, d);
    if (l->balance_keys) {
        const float *b = (const float *)(arena + l->balance) + h * d;
        for (unsigned c = 0u; c < d; c++) row[c] = kvq_div(row[c], b[c]);
    }
    if (l->rope != KVQ_ROPE_NONE) {
        const float *cs = (const float *)(arena + l->rope_table) + offset * d;
        for (unsigned i = 0u; i < d / 2u; i++) {
            unsigned a = l->rope == KVQ_ROPE_ADJACENT ? 2u * i : i;
            unsigned b = l->rope == KVQ_ROPE_ADJACENT ? 2u * i + 1u : i + d / 2u;
            float c = cs[2u * i], s = cs[2u * i + 1u], x0 = row[a], x1 = row[b];
            row[a] = kvq_sub(kvq_mul(x0, c), kvq_mul(x1, s));
            row[b] = kvq_add(kvq_mul(x0, s), kvq_mul(x1, c));
        }
    }
}

// Body token j (logical index, held in the quantized body) of head h, reconstructed into row[0..d] as
// kvq-core's `Cache::dequantize` reconstructs it.
KVQ_FN void kvq_generic_row(const unsigned *arena, const KvqLayout *l, int keys, unsigned h, unsigned j,
                            float *row) {
    const KvqStream *s = keys ? &l->keys : &l->values;
    unsigned d = l->head_dim, slot = j % s->ring;
    const unsigned *outl = arena + s->outliers;
    float scale, zero;
    if (s->kind == KVQ_PER_CHANNEL) {
        unsigned gi = slot / s->group, col = slot & (s->block - 1u);
        const unsigned *head = arena + s->codes + h * kvq_key_head_words(s, d);
        for (unsigned c = 0u; c < d; c++) {
            unsigned code = kvq_code(head + kvq_key_row(s, slot, c, d), col, s->bits);
            kvq_params(arena, s, (h * s->row_groups + gi) * d + c, &scale, &zero);
            row[c] = kvq_decode(arena, s, h * d + c, code, scale, zero);
        }
        for (unsigned k = 0u; k < s->outliers_n; k++) {
            unsigned w = outl[(h * s->row_groups + gi) * s->outliers_n + k], i = w & 0xffffu;
            if (i != KVQ_EMPTY_SLOT && i / d == slot % s->group)
                row[i % d] = kvq_add(row[i % d], kvq_h2f((unsigned short)(w >> 16)));
        }
        kvq_tier_add(arena, l, keys, h, j, 0, row);
        kvq_inverse(arena, l, keys, h, slot % s->group, row);
        return;
    }
    // Per token: stored channel i lands in row[perm[i]]; outliers and tier corrections are indexed in
    // the stored order and follow it.
    const unsigned short *perm = s->permuted ? (const unsigned short *)(arena + s->perm) + h * d : 0;
    const unsigned *words = arena + s->codes + (h * s->ring + slot) * s->row_words;
    unsigned groups = d / s->group;
    for (unsigned g = 0u; g < groups; g++) {
        unsigned lo = g * s->group, hi = lo + s->group;
        if (s->permuted) {
            const unsigned short *b = (const unsigned short *)(arena + s->bounds) + h * (groups + 1u);
            lo = b[g];
            hi = b[g + 1u];
        }
        kvq_params(arena, s, (h * s->row_groups + g) * s->ring + slot, &scale, &zero);
        for (unsigned i = lo; i < hi; i++)
            row[perm ? perm[i] : i] = kvq_decode(arena, s, h, kvq_code(words, i, s->bits), scale, zero);
    }
    for (unsigned k = 0u; k < s->outliers_n; k++) {
        unsigned w = outl[slot * s->outliers_n + k], i = w & 0xffffu;
        if (i != KVQ_EMPTY_SLOT && i / d == h) {
            unsigned at = perm ? perm[i % d] : i % d;
            row[at] = kvq_add(row[at], kvq_h2f((unsigned short)(w >> 16)));
        }
    }
    kvq_tier_add(arena, l, keys, h, j, perm, row);
    kvq_inverse(arena, l, keys, h, 0u, row);
}

// Held token t of head h, a whole row (sinks, window, fp16 or coded body, any format), as kvq-core's
// `Cache::dequantize` gives it.
KVQ_FN void kvq_read_row(const unsigned *arena, const KvqLayout *l, const KvqCounts *k, int keys, unsigned h,
                         unsigned t, float *row) {
    const KvqStream *s = keys ? &l->keys : &l->values;
    unsigned at, q_end = keys ? k->key_q_end : k->value_q_end;
    if (s->generic && kvq_locate(l, k, q_end, s, t, &at) == 2u) {
        kvq_generic_row(arena, l, keys, h, k->base + (t - k->sinks), row);
        return;
    }
    for (unsigned c = 0u; c < l->head_dim; c++) row[c] = kvq_element(arena, l, k, keys, h, t, c);
}

// ---- the quantizer (kvq-core `UniformSpec` with f16 parameters, no clipping) ----

// `v` rounded to the f16 grid toward -inf (`up` zero) or +inf, in double as kvq-core's `round_f64`.
KVQ_FN double kvq_round_f16(double v, int up) {
    if (v == 0.0) return 0.0;
    unsigned long long b;
#ifdef __CUDACC__
    b = (unsigned long long)__double_as_longlong(v);
#else
    memcpy(&b, &v, 8);
#endif
    int field = (int)((b >> 52) & 0x7ffull);
    int e = field - 1023;
    if (field == 0 || e < -14) e = -14;
    unsigned long long qb = (unsigned long long)(e - 10 + 1023) << 52; // 2^(e-10): exact
    double quantum;
#ifdef __CUDACC__
    quantum = __longlong_as_double((long long)qb);
    double t = v / quantum;
    double k = up ? ceil(t) : floor(t);
#else
    memcpy(&quantum, &qb, 8);
    double t = v / quantum;
    double k = up ? __builtin_ceil(t) : __builtin_floor(t);
#endif
    return k * quantum;
}

// The stored parameters of a group with extremes mn <= mx: zero rounded down, step rounded up.
KVQ_FN void kvq_fit(float mn, float mx, unsigned max_code, float *scale, float *zero) {
    float z = (float)kvq_round_f16((double)mn, 0);
    double span = (double)mx - (double)z;
    *zero = z;
    *scale = (float)kvq_round_f16(span / (double)max_code, 1);
}

// The code of x under (scale, zero): clamp, then round half up.
KVQ_FN unsigned kvq_encode(float x, float scale, float zero, unsigned max_code) {
    if (scale == 0.0f) return 0u;
    float t = (x - zero) / scale;
    t = t < 0.0f ? 0.0f : t;
    t = t > (float)max_code ? (float)max_code : t;
    return (unsigned)(t + 0.5f);
}

// Writes code `v` at position i of the bitstream `row`, keeping the other bits.
KVQ_FN void kvq_put_code(unsigned *row, unsigned i, unsigned bits, unsigned v) {
    unsigned bit = i * bits, w = bit >> 5, sh = bit & 31u, mask = (1u << bits) - 1u;
    row[w] = (row[w] & ~(mask << sh)) | (v << sh);
    if (sh + bits > 32u) {
        unsigned hi = 32u - sh;
        row[w + 1] = (row[w + 1] & ~(mask >> hi)) | (v >> hi);
    }
}

// ---- the append's work items ----
//
// An append runs in two passes, each a flat range of independent items (one thread each on the device,
// a loop on the host): `kvq_append_quantize` codes every group that the append completes, reading the
// window as it was; `kvq_append_store` then writes the sinks, the fp16 bodies and the windows. Body token
// j of the append is input row `sink_new + j - n0`; a token older than the append comes from the window.
// Each item writes whole code words of its own group (G*b is a multiple of 32), so no two items share a word.

// Body token j of a stream as the window holds it (or would: f16-rounded input).
KVQ_FN float kvq_source(const unsigned *arena, const KvqLayout *l, const KvqStream *s, const KvqAppend *a,
                        const float *input, unsigned h, unsigned j, unsigned c) {
    unsigned d = l->head_dim;
    if (j < a->n0) return kvq_h2f(kvq_half_at(arena, s->window, (h * l->residual + j % l->residual) * d + c));
    float x = input[((a->sink_new + j - a->n0) * l->kv_heads + h) * d + c];
    return l->residual > 0u ? kvq_h2f(kvq_f2h(x)) : x;
}

// Items of the quantize pass: key groups (blocks * R/G groups * heads * d channels), then value groups
// (tokens * heads * d/G groups).
KVQ_FN unsigned kvq_quantize_items(const KvqLayout *l, const KvqAppend *a) {
    unsigned n = 0;
    if (l->keys.kind == KVQ_PER_CHANNEL)
        n += a->key_blocks * (l->residual / l->keys.group) * l->kv_heads * l->head_dim;
    if (l->values.kind == KVQ_PER_TOKEN) n += a->value_q * l->kv_heads * (l->head_dim / l->values.group);
    return n;
}

KVQ_FN void kvq_quantize_item(unsigned *arena, const KvqLayout *l, const KvqAppend *a, const float *keys,
                              const float *values, unsigned item) {
    unsigned d = l->head_dim, heads = l->kv_heads;
    if (l->keys.kind == KVQ_PER_CHANNEL) {
        const KvqStream *s = &l->keys;
        unsigned per_block = (l->residual / s->group) * heads * d;
        unsigned n = a->key_blocks * per_block;
        if (item < n) {
            unsigned blk = item / per_block, r = item % per_block;
            unsigned g = r / (heads * d), h = (r / d) % heads, c = r % d;
            unsigned gs = (a->key_blocks0 + blk) * l->residual + g * s->group, slot = gs % s->ring;
            float mn = 0.0f, mx = 0.0f;
            for (unsigned i = 0; i < s->group; i++) {
                float x = kvq_source(arena, l, s, a, keys, h, gs + i, c);
                if (i == 0u || x < mn) mn = x;
                if (i == 0u || x > mx) mx = x;
            }
            float scale, zero;
            kvq_fit(mn, mx, s->max_code, &scale, &zero);
            unsigned *row = arena + s->codes + h * kvq_key_head_words(s, d) + kvq_key_row(s, slot, c, d);
            unsigned col = slot & (s->block - 1u);
            for (unsigned i = 0; i < s->group; i++) {
                float x = kvq_source(arena, l, s, a, keys, h, gs + i, c);
                kvq_put_code(row, col + i, s->bits, kvq_encode(x, scale, zero, s->max_code));
            }
            unsigned p = kvq_key_param(s, h, slot, c, d);
            kvq_set_half(arena, s->scale, p, kvq_f2h(scale));
            kvq_set_half(arena, s->zero, p, kvq_f2h(zero));
            return;
        }
        item -= n;
    }
    if (l->values.kind == KVQ_PER_TOKEN) {
        const KvqStream *s = &l->values;
        unsigned groups = d / s->group;
        unsigned t = item / (heads * groups), h = (item / groups) % heads, g = item % groups;
        unsigned j = a->value_q0 + t, slot = j % s->ring, c0 = g * s->group;
        float mn = 0.0f, mx = 0.0f;
        for (unsigned i = 0; i < s->group; i++) {
            float x = kvq_source(arena, l, s, a, values, h, j, c0 + i);
            if (i == 0u || x < mn) mn = x;
            if (i == 0u || x > mx) mx = x;
        }
        float scale, zero;
        kvq_fit(mn, mx, s->max_code, &scale, &zero);
        unsigned *row = arena + s->codes + (h * s->ring + slot) * s->row_words;
        for (unsigned i = 0; i < s->group; i++) {
            float x = kvq_source(arena, l, s, a, values, h, j, c0 + i);
            kvq_put_code(row, c0 + i, s->bits, kvq_encode(x, scale, zero, s->max_code));
        }
        unsigned p = kvq_value_param(s, h, g, slot);
        kvq_set_half(arena, s->scale, p, kvq_f2h(scale));
        kvq_set_half(arena, s->zero, p, kvq_f2h(zero));
    }
}

// Items of the store pass: one per element of the sinks, the fp16 bodies and the windows, both streams:
// [stream][sink rows + body tokens][heads][d]. The windows take the append's last R tokens only (each the
// last writer of its slot, as a token-by-token append leaves them).
KVQ_FN unsigned kvq_store_items(const KvqLayout *l, const KvqAppend *a) {
    return 2u * (a->sink_new + a->tokens) * l->kv_heads * l->head_dim;
}

KVQ_FN void kvq_store_item(unsigned *arena, const KvqLayout *l, const KvqAppend *a, const float *keys,
                           const float *values, unsigned item) {
    unsigned d = l->head_dim, heads = l->kv_heads, hd = heads * d;
    unsigned per_stream = (a->sink_new + a->tokens) * hd;
    int is_keys = item < per_stream;
    unsigned e = is_keys ? item : item - per_stream;
    unsigned row = e / hd, h = (e / d) % heads, c = e % d;
    const KvqStream *s = is_keys ? &l->keys : &l->values;
    float x = (is_keys ? keys : values)[e];
    if (row < a->sink_new) {
        kvq_set_half(arena, s->sinks, (h * l->sinks + a->sink0 + row) * d + c, kvq_f2h(x));
        return;
    }
    unsigned j = a->n0 + (row - a->sink_new);
    if (s->kind == KVQ_F16) {
        unsigned slot = j % s->ring;
        unsigned i = is_keys ? h * d * s->ring + kvq_key_f16(slot, c, d) : (h * s->ring + slot) * d + c;
        kvq_set_half(arena, s->codes, i, kvq_f2h(x));
        return;
    }
    unsigned end = a->n0 + a->tokens;
    if (l->residual > 0u && j + l->residual >= end)
        kvq_set_half(arena, s->window, (h * l->residual + j % l->residual) * d + c, kvq_f2h(x));
}

#endif
